"""The numeric precision sampling runs at: ``fp32`` (the default, bit-reproducible), ``bf16`` (weights and KV cache in
bfloat16; the head's matmul too, as in LlamaGen, then its logits are cast to float32 for guidance, filtering and the
draw), or ``auto`` (bf16 where the hardware computes it
natively: a CUDA device that supports it, or a CPU with avx512_bf16 / AMX; fp32 elsewhere, where bf16 would be emulated
and slower than fp32).

On a CPU with avx512_bf16 the decode step is bound by reading the weights, so halving them is the main CPU speed-up
(`benchmarks/sample.py --precision`). bf16 tokens are not fp32 tokens: the logits differ by rounding, so a draw near
a tie can go the other way (tests/test_precision.py states the agreement measured on a tiny model).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from digit.errors import DigitError

PRECISIONS = ("fp32", "bf16", "auto")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo; Linux x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def sampling_dtype(precision: str, device: Any = "cpu") -> torch.dtype:
    """``precision`` ("fp32" | "bf16" | "auto") on ``device`` -> the dtype for the model's weights and cache."""
    if precision not in PRECISIONS:
        raise DigitError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if precision != "auto":
        return _DTYPES[precision]
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_bf16() else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def cast_for_sampling(model: torch.nn.Module, precision: str) -> str:
    """Cast ``model`` (in place, with any cache it holds) to the sampling precision; returns "fp32" or "bf16", the
    precision actually used (``auto`` resolved), for provenance."""
    dtype = sampling_dtype(precision, next(model.parameters()).device)
    clear = getattr(model, "clear_cache", None)
    if clear is not None:
        clear()  # a cache of the old dtype would be reallocated anyway; free it first
    model.to(dtype)
    return precision_name(dtype)


def add_precision_arg(p: Any) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="weights and KV cache while sampling: fp32 (default, reproducible), bf16, or auto (bf16 where the "
        "CPU has avx512_bf16/AMX or the GPU supports it, else fp32); logits and sampling stay fp32",
    )
