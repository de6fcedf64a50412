"""Sampling: pure logit filters (`filters`) and cached generation (`generate`)."""

from digit.sampling.filters import (
    apply_temperature,
    cfg,
    cfg_scale_at,
    filter_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)
from digit.sampling.generate import generate

__all__ = [
    "apply_temperature",
    "cfg",
    "cfg_scale_at",
    "filter_logits",
    "generate",
    "sample_from_logits",
    "top_k_filter",
    "top_p_filter",
]
