"""Parallelism applied from outside, in place (torchtitan's ``parallelize``): models never know about it.

Order, as torchtitan: (optional) per-block ``torch.compile``, then data parallelism.
- ``ddp``: the composable ``replicate`` (DDP's reducer installed on the module in place, the API torchtitan uses), so
  ``task.model(...)`` keeps working; gradients are averaged across ranks during backward.
- ``fsdp``: FSDP2 ``fully_shard`` on every shard unit (transformer block) and then on the root (FULL_SHARD per block,
  as LlamaGen's ``train_c2i_fsdp.py`` shards GPT-XXL/3B); parameters become DTensors sharded on dim 0.
Modules that no optimizer trains are sharded too under FSDP (so EMA teachers line up shard by shard with their student)
and left alone under DDP. Process groups use gloo on CPU, nccl on CUDA (``digit.utils.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODES = ("none", "ddp", "fsdp")


def compile_blocks(module: nn.Module, units: list[nn.Module]) -> None:
    """Compile each block's forward in place (torchtitan compiles per block: smaller graphs, shared across layers)."""
    for u in units or [module]:
        u.compile()


def apply_parallel(
    modules: dict[str, nn.Module],
    trained: set[str],
    mode: str,
    shard_units: Callable[[str, nn.Module], list[nn.Module]],
    device: torch.device,
) -> None:
    """Wrap ``modules`` in place for ``mode`` (a no-op for ``none`` or a world of one)."""
    import torch.distributed as dist

    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}")
    if mode == "none" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if mode == "ddp":
        from torch.distributed._composable.replicate import replicate

        for name in trained:
            m = modules[name]
            if any(p.requires_grad for p in m.parameters()):
                replicate(m, device_ids=[device.index] if device.type == "cuda" else None)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # fp32 master weights and reductions; bf16 compute comes from autocast in the trainer.
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for name, m in modules.items():
        if not list(m.parameters()):
            continue
        for unit in shard_units(name, m):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(m, mesh=mesh, mp_policy=mp)


def is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in module.parameters())
