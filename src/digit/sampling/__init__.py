"""Sampling: one parameter set (`params`), pure logit filters (`filters`), the cached sampler (`generate`) and the
continuous-batching engine (`engine`). Exports resolve lazily so `digit.sampling.params` imports without torch (the
CLI registers its flags before torch is loaded). The sampling function is `digit.sampling.generate.generate` (the
submodule of the same name would shadow a lazy export)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SamplingParams": "digit.sampling.params",
    "apply_temperature": "digit.sampling.filters",
    "cfg": "digit.sampling.filters",
    "cfg_scale_at": "digit.sampling.filters",
    "filter_logits": "digit.sampling.filters",
    "sample_from_logits": "digit.sampling.filters",
    "top_k_filter": "digit.sampling.filters",
    "top_p_filter": "digit.sampling.filters",
    "CachedDecoder": "digit.sampling.generate",
    "Sampled": "digit.sampling.generate",
    "sample": "digit.sampling.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'digit.sampling' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
