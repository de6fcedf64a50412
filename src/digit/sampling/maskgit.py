"""MaskGIT-style non-autoregressive decoding for a ``causal=False`` GPT (DiGIT's "+MaskGIT" stage-2 decoder).

Following MaskGIT (Chang et al., 2022) as DiGIT's ``model_nar.py`` runs it (reference section 4): start from an
all-masked grid; at step ``t`` of ``steps`` (r = (t+1)/steps) predict every position, sample a token at each masked one,
score it by ``log p + choice_temperature * (1 - r) * Gumbel``, then re-mask the ``floor(T * cos(pi/2 * r))`` least
confident of the newly sampled tokens (tokens fixed earlier are never re-masked). The last step re-masks nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from digit.sampling.filters import Generators, filter_logits, sample_from_logits
from digit.sampling.params import DIGIT_NAR_STEPS, SamplingParams

__all__ = ["CHOICE_TEMPERATURE", "DIGIT_NAR_STEPS", "gumbel_noise", "mask_schedule", "maskgit_decode", "remask_count"]

CHOICE_TEMPERATURE = SamplingParams().nar_temperature  # MaskGIT / DiGIT default Gumbel noise scale on the confidence


def mask_schedule(num_tokens: int, steps: int) -> list[int]:
    """Tokens left masked after each step: ``floor(T * cos(pi/2 * (t+1)/steps))``; 256 tokens, 8 steps ->
    [251, 236, 212, 181, 142, 97, 49, 0]."""
    if num_tokens < 1 or steps < 1:
        raise ValueError("num_tokens and steps must be >= 1")
    out = []
    for t in range(steps):
        r = (t + 1) / steps
        out.append(0 if t == steps - 1 else int(math.floor(num_tokens * math.cos(math.pi / 2 * r))))
    return out


def remask_count(scheduled: int, num_masked: int, last: bool) -> int:
    """How many to re-mask this step: the schedule, kept in [1, masked - 1] so every step fixes at least one token and
    leaves at least one for later (MaskGIT's clamp); 0 at the last step."""
    if last:
        return 0
    return max(1, min(num_masked - 1, scheduled))


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: Generators, device) -> torch.Tensor:
    """Gumbel(0, 1) noise of ``shape``; with one generator per row, row ``i`` (dim 0) comes from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    else:
        u = torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=torch.float64) for g in generator])
    u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    return -torch.log(-torch.log(u)).float()


@torch.no_grad()
def maskgit_decode(
    model: torch.nn.Module,
    cond: torch.Tensor | None,
    *,
    n: int | None = None,
    params: SamplingParams | None = None,
    generator: Generators = None,
    **settings: Any,
) -> torch.Tensor:
    """Fill a ``causal=False`` GPT's whole grid in ``params.nar_steps`` forward passes. Returns LongTensor [B, h, w].

    ``params`` (or keyword settings: ``nar_steps=8, top_k=1, nar_temperature=0.0``): temperature / top-k / top-p
    filter the token draw, ``nar_temperature`` scales the confidence noise. ``generator``: one, or one per row.
    ``model(tokens [B, T], cond) -> logits [B, T, vocab]`` with masked positions holding ``model.mask_token_id``.
    """
    params = (params or SamplingParams()).replace(**settings) if settings else (params or SamplingParams())
    cfg = model.config
    if getattr(cfg, "causal", True):
        raise ValueError("maskgit_decode needs a causal=False (NAR) model")
    h, w = cfg.grid
    total = h * w
    batch = int(cond.shape[0]) if cond is not None else int(n or 1)
    device = next(model.parameters()).device
    mask_id = model.mask_token_id
    schedule = mask_schedule(total, params.nar_steps)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, cond, batch, total, mask_id, schedule, params, generator, device).view(batch, h, w)
    finally:
        model.train(was_training)


def _decode(model, cond, batch, total, mask_id, schedule, params, generator, device):
    steps = len(schedule)
    tokens = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    for t in range(steps):
        masked = tokens == mask_id  # (B, T)
        raw = model(tokens, cond).float()  # (B, T, V)
        filtered = filter_logits(raw, params.temperature, params.top_k, params.top_p)
        sampled = sample_from_logits(filtered, generator)  # (B, T)
        # confidence from the model's own (unfiltered) distribution, as MaskGIT and DiGIT score it; with top-k 1
        # the filtered one would rate every choice 1.0
        log_probs = torch.log_softmax(raw, dim=-1)
        tokens = torch.where(masked, sampled, tokens)
        n_masked = int(masked[0].sum())
        k = remask_count(schedule[t], n_masked, last=t == steps - 1)
        if k == 0:
            continue
        r = (t + 1) / steps
        chosen_logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        noise = gumbel_noise(chosen_logp.shape, generator, device)
        confidence = chosen_logp + params.nar_temperature * (1.0 - r) * noise
        confidence = confidence.masked_fill(~masked, float("inf"))  # fixed tokens stay
        remask = torch.topk(confidence, k, dim=-1, largest=False).indices  # (B, k) least confident
        tokens = tokens.scatter(1, remask, mask_id)
    return tokens
