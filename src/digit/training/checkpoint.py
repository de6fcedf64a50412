"""The resume checkpoint ``train_state.pt``: full (unsharded) state, written atomically by rank 0, loadable with
``torch.load(weights_only=True)``.

Layout: ``{"format", "version", "step", "epoch", "batch_in_epoch", "config", "modules": {name: state_dict},
"optimizers": {name: {"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}}, "ema": {name: state_dict},
"task": task.state_dict(), "rng": [per-rank {"python", "numpy", "torch", "cuda"}]}``. Optimizer state is keyed by
parameter names (as ``torch.distributed.checkpoint.state_dict`` does), so the file does not depend on the parallel
layout. RNG states are plain tensors / tuples (numpy's key array is stored as an int64 tensor).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digit.training.parallel import is_sharded
from digit.utils.io import atomic_torch_save
from digit.utils.safe_pickle import load_weights

FORMAT = "digit.train_state"
VERSION = 1


# ---------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- modules
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the module's whole state; a collective under FSDP2 (call on every rank; rank 0 gets the tensors)."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


# ---------------------------------------------------------------- optimizers
def optimizer_state(container: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Name-keyed full optimizer state (collective under FSDP2)."""
    if is_sharded(container):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            container, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    names = {id(p): n for n, p in container.named_parameters()}
    sd = opt.state_dict()
    flat = [p for g in opt.param_groups for p in g["params"]]
    idx_to_name = {i: names[id(p)] for i, p in enumerate(flat)}
    state = {
        idx_to_name[i]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    groups = [{**g, "params": [idx_to_name[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(container: nn.Module, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    if is_sharded(container):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # a parameter may have no state (it never had a gradient: DINO's prototypes while frozen); loading it strictly
        # fails, and the loader initialises every state first, so drop what the checkpoint did not have
        set_optimizer_state_dict(container, opt, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        names = {id(p): n for n, p in container.named_parameters()}
        for g in opt.param_groups:
            for p in g["params"]:
                if names.get(id(p)) not in saved["state"]:
                    opt.state.pop(p, None)
        return
    names = {id(p): n for n, p in container.named_parameters()}
    flat = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    name_to_idx = {n: i for i, n in enumerate(flat)}
    saved_names = [n for g in saved["param_groups"] for n in g["params"]]
    if saved_names != flat:
        from digit.errors import DigitError

        raise DigitError("the optimizer's parameters differ from the checkpoint's")
    state = {name_to_idx[n]: s for n, s in saved["state"].items()}
    groups = [{**g, "params": [name_to_idx[n] for n in g["params"]]} for g in saved["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- file
# The keys a resume reads, and what each must be.
STATE_KINDS = {
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "config": dict,
    "modules": dict,
    "optimizers": dict,
    "ema": dict,
    "rng": list,
}


def save_train_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the state with the sha256 of its contents (``load_train_state`` recomputes it: flipped bytes are caught)."""
    from digit.utils.artifacts import object_sha256

    body = {"format": FORMAT, "version": VERSION, **state}
    return atomic_torch_save(path, {**body, "sha256": object_sha256(body)})


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    from digit.errors import DigitError
    from digit.utils.artifacts import object_sha256, verify_enabled

    state = load_weights(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DigitError(f"{path} is not a digit training state")
    for key, kind in STATE_KINDS.items():
        if key not in state:
            raise DigitError(f"{path}: missing key '{key}'; the training state is incomplete")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise DigitError(f"{path}: '{key}' must be a {kind.__name__}, got {type(state[key]).__name__}")
    if not state["rng"]:
        raise DigitError(f"{path}: 'rng' holds no random-number states")
    digest = state.pop("sha256", None)
    if digest is not None and verify_enabled() and object_sha256(state) != digest:
        raise DigitError(
            f"{path}: the contents' sha256 differs from the one recorded when it was written; corrupt file"
        )
    return state


def check_module_state(path: str | os.PathLike, name: str, module: nn.Module, state: Any) -> None:
    """Refuse (naming the file) a saved state dict whose keys or shapes do not fit ``module``."""
    from digit.errors import DigitError

    if not isinstance(state, dict):
        raise DigitError(f"{path}: no state for module '{name}'")
    expected = module.state_dict() if not is_sharded(module) else None
    if expected is None:  # sharded: shapes are checked by set_model_state_dict against the full shapes
        return
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DigitError(f"{path}: module '{name}' does not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if not torch.is_tensor(v) or tuple(v.shape) != tuple(expected[k].shape):
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise DigitError(f"{path}: module '{name}' {k} is {got}, the model has {tuple(expected[k].shape)}")
