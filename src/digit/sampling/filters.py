"""Pure logit transforms for sampling. Order (LlamaGen `generate.py`, HF warpers): CFG on raw logits, then
temperature, then top-k, then top-p, then softmax and a categorical draw.

Exact semantics:
- ``cfg(cond, uncond, s) = uncond + s * (cond - uncond)`` on raw logits (s = 1: conditional logits unchanged).
- ``apply_temperature(logits, T) = logits / max(T, 1e-5)`` (T -> 0 tends to greedy; LlamaGen's clamp).
- ``top_k_filter(logits, k)``: k = 0 (or k >= vocab) keeps everything; else every logit strictly below the k-th largest
  becomes -inf (HF `TopKLogitsWarper`: ties with the k-th value are kept, so more than k may survive on exact ties).
- ``top_p_filter(logits, p)``: sort by probability (descending, softmax of the given logits, i.e. renormalised after
  any earlier filter); keep token j iff the total probability of the tokens ranked before it is < p. This is the
  smallest prefix whose cumulative probability reaches p (HF `TopPLogitsWarper`); the top token is always kept;
  p = 1 keeps everything. (fairseq's DiGIT sampler differs: see digit-official.md section 4.)
- ``cfg_scale_at(step, n_steps, s, interval, schedule)``: the guidance scale for the token at index ``step``:
  "constant" gives s; "linear" gives 1 + (s - 1) * step / n_steps (MAR's schedule: no guidance on the first token,
  rising to s); with ``interval >= 0`` (LlamaGen ``cfg_interval``) tokens with index > interval + 1 get no guidance
  (exactly LlamaGen's loop: token 0 comes from the prefill, decode step i makes token i + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from digit.sampling.params import SCHEDULES

# one generator for the whole batch, or one per row (per-image seeds: a row's draws do not depend on the others)
Generators = torch.Generator | Sequence[torch.Generator] | None


def cfg(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw logits: uncond + scale * (cond - uncond)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / max(float(temperature), 1e-5)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (to -inf) logits below the k-th largest along the last dim; k = 0 is a no-op. torch.topk, no full sort."""
    if k < 0:
        raise ValueError(f"top_k must be >= 0, got {k}")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-probable set whose probability reaches p (always the top token)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked strictly before each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the logits whose softmax is the sampling distribution."""
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


def fill_exponential(out: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Fill ``out`` with Exp(1) noise in place: from one generator, or row ``i`` (dim 0) from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return out.exponential_(1.0, generator=generator)
    if len(generator) != out.shape[0]:
        raise ValueError(f"{len(generator)} generators for {out.shape[0]} rows")
    for row, g in zip(out, generator, strict=True):
        row.exponential_(1.0, generator=g)
    return out


def sample_with_noise(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: argmax(softmax(logits) / noise) with Exp(1) ``noise`` is a categorical draw (no sync)."""
    return torch.argmax(logits.softmax(dim=-1) / noise, dim=-1)


def sample_from_logits(logits: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One categorical draw per row without a host sync (gpt-fast): argmax(probs / Exp(1) noise). -> [B, ...] long."""
    return sample_with_noise(logits, fill_exponential(torch.empty_like(logits, dtype=torch.float32), generator))


def filter_logits_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    kmax: int,
    nucleus: bool,
) -> torch.Tensor:
    """`filter_logits` with per-row settings (``temperature`` / ``top_k`` / ``top_p``: [B]) on ``logits`` [B, V];
    row ``b`` equals ``filter_logits(logits[b], temperature[b], top_k[b], top_p[b])``. ``kmax`` (a Python int) is the
    largest active k (0 when no row filters by top-k: one torch.topk of that size, no full sort); ``nucleus`` whether
    any row has top-p < 1. Both are static so the function compiles to one graph."""
    logits = logits / temperature.clamp(min=1e-5)[:, None]
    V = logits.shape[-1]
    if 0 < kmax < V:
        values = torch.topk(logits, kmax, dim=-1).values  # [B, kmax], descending
        active = (top_k > 0) & (top_k < V)
        kth = values.gather(-1, (top_k.clamp(1, kmax) - 1)[:, None])
        kth = torch.where(active[:, None], kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if nucleus:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = (before >= top_p[:, None]) & (top_p < 1.0)[:, None]
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cfg_scale_at(step: int, n_steps: int, scale: float, interval: int = -1, schedule: str = "constant") -> float:
    """The guidance scale for the token at index ``step`` of ``n_steps`` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown cfg schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    # LlamaGen: prefill makes token 0 guided; its decode step i makes token i + 1 and drops guidance once i > interval,
    # so tokens 0 .. interval + 1 are guided.
    if interval >= 0 and step > interval + 1:
        return 1.0
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * step / n_steps
    return float(scale)
