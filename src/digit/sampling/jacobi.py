"""Speculative Jacobi decoding (SJD; Teng et al., ICLR 2025): fewer forward passes, the same output distribution.

Training-free parallel decoding for the autoregressive GPT. Besides the accepted prefix, every row keeps draft tokens
for the next ``window`` positions, each with the distribution ``q`` it was drawn from. One iteration is one model
forward over ``[last accepted token, drafts...]`` (`GPT.decode_block`, causal inside the block, the prefix from the
KV cache); it yields the target distribution ``p`` at every window position (CFG on raw logits, then temperature,
top-k, top-p: exactly what `digit.sampling.generate` samples from). Drafts are then checked left to right with the
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023):

- draft ``x`` at position ``t`` is accepted with probability ``min(1, p_t(x) / q_t(x))``;
- at the first rejection, token ``t`` is drawn from the residual ``max(0, p_t - q_t)`` normalised, and the row stops;
- the positions after it get fresh drafts drawn from this iteration's ``p`` (computed behind the rejected draft, so
  they are only proposals), which become their ``q`` for the next iteration (the Jacobi update).

Every token is therefore an exact sample of ``p_t(. | accepted prefix)``: a draft was drawn from ``q_t`` before the
checks to its left, which depend on tokens to its left only, so the classic lemma applies position by position and the
output has the distribution of standard ancestral sampling (tested by a chi-square against exact sequence
probabilities). Each iteration fixes at least one token, so a grid of T tokens never needs more than T forwards
(1 prefill + T - 1 iterations, the same count as standard decoding).

New draft positions start as uniform random tokens (``init="random"``, the paper's initialisation) whose ``q`` is taken
as the uniform distribution they were drawn from (acceptance probability ``sum min(p, 1/V)``; the authors' code treats
a random draft as a point mass, which accepts with the lower ``E[p(x)] = 1/V``), or as a copy of the token on their
left with ``q`` a point mass (``init="repeat"``, the scheme of the authors' LlamaGen script; a row's first column
stays random). Greedy settings
(``temperature == 0`` or ``top_k == 1``) make ``p`` one-hot at the argmax: a draft is accepted iff it is the argmax and
a rejection resamples the argmax, so the tokens are exactly those of greedy standard decoding.

Batches: rows accept different numbers of tokens. Each row keeps its own accepted count; the window starts at the
slowest row's first open position, and tokens a faster row has already accepted are fed again and not re-checked
(the authors' code instead cuts every row back to the batch's shortest accepted prefix). A batch therefore needs at
least the forwards of its slowest row, and ``n_forward`` counts forwards of the whole batch.

Model interface: ``config`` (seq_len, cond_len, vocab_size, grid, causal, cond), ``condition.null``,
``setup_cache(rows)``, ``prefill(cond, rows) -> [rows, V]``, ``decode_block(tokens, input_pos) -> [rows, T, V]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from digit.errors import DigitError
from digit.models.conditions import join_conditions
from digit.sampling.filters import Generators, cfg, cfg_scale_at, fill_exponential, filter_logits
from digit.sampling.generate import batch_size, check_params
from digit.sampling.params import check_value

INITS = ("random", "repeat")
DEFAULT_WINDOW = 16  # the authors' LlamaGen setting (16 draft tokens per iteration)


class SamplingParamsLike(Protocol):
    temperature: float
    top_k: int
    top_p: float
    cfg_scale: float
    cfg_interval: int
    cfg_schedule: str


def is_greedy(params: SamplingParamsLike) -> bool:
    return params.temperature == 0 or params.top_k == 1


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised residual ``max(0, p - q)`` to resample from after a rejection; ``p`` where it is all zero (a
    rejection then has probability zero, so this only guards against rounding)."""
    r = (p - q).clamp(min=0.0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def fill(out: torch.Tensor, generator: Generators, draw: Callable[[torch.Tensor, torch.Generator | None], None]):
    """``draw(tensor, generator)`` in place over ``out``: with one generator, or row ``i`` (dim 0) from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        draw(out, generator)
    else:
        for row, g in zip(out, generator, strict=True):
            draw(row, g)
    return out


def sample_weights(weights: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One categorical draw per row from non-negative (unnormalised) weights: argmax(w / Exp(1)) (exponential race)."""
    noise = fill_exponential(torch.empty_like(weights), generator)
    return torch.argmax(weights / noise, dim=-1)


def target_probs(
    logits: torch.Tensor, batch: int, scales: torch.Tensor | None, params: SamplingParamsLike
) -> torch.Tensor:
    """Raw logits [rows, L, V] (rows = [cond; null] when ``scales`` [L] is given) -> sampling distribution [B, L, V]."""
    if scales is not None:
        c, u = logits[:batch], logits[batch:]
        # scale 1 takes the conditional logits unchanged, as standard decoding does
        logits = torch.where((scales == 1.0)[:, None], c, cfg(c, u, scales[:, None]))
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    if is_greedy(params):
        return torch.nn.functional.one_hot(filtered.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return filtered.softmax(-1)


def verify(
    seq: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    accepted: torch.Tensor,
    start: int,
    generator: Generators,
) -> torch.Tensor:
    """Check the drafts ``seq[:, start:start+L]`` (drawn from ``q[:, :L]``) against ``p`` [B, L, V]; update ``seq`` and
    ``q`` in place (resampled token, fresh drafts and their distributions); return the new accepted counts [B]."""
    B, L, _ = p.shape
    k = torch.arange(L, device=p.device)
    drafts = seq[:, start : start + L]
    qw = q[:, :L]
    px = p.gather(-1, drafts[..., None])[..., 0]
    qx = qw.gather(-1, drafts[..., None])[..., 0]
    u = fill(p.new_empty(B, L), generator, lambda t, g: t.uniform_(0.0, 1.0, generator=g))
    # accept iff u < p/q; positions a row has already accepted (it is ahead of the window start) are not checked
    fail = (u * qx >= px) & (k[None] >= (accepted - start)[:, None])
    has_fail = fail.any(-1)
    first = torch.where(has_fail, fail.int().argmax(-1), L)  # first rejected position, L: none
    at = first.clamp(max=L - 1)
    rows = torch.arange(B, device=p.device)
    resampled = sample_weights(residual(p[rows, at], qw[rows, at]), generator)
    fresh = sample_weights(p, generator)  # the Jacobi update: new drafts behind the rejection
    after = k[None] > first[:, None]
    new = torch.where(after, fresh, drafts)
    seq[:, start : start + L] = torch.where(k[None] == first[:, None], resampled[:, None], new)
    qw.copy_(torch.where(after[..., None], p, qw))
    return torch.maximum(accepted, start + first + has_fail.long())


@torch.inference_mode()
def jacobi_generate(
    model,
    cond: torch.Tensor | None,
    batch: int | None,
    params: SamplingParamsLike,
    generator: Generators = None,
    *,
    window: int = DEFAULT_WINDOW,
    init: str = "random",
    on_advance: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample token sequences ``[B, h*w]`` (long) with speculative Jacobi decoding; returns them and the number of
    model forward passes (prefill included). ``cond``: labels [B] | prefix [B, P] | Caption | None with ``batch`` samples.
    ``generator``: one for the batch or one per row (a row's tokens still depend on the batch: the window follows the
    slowest row, which sets how many draws each row makes).
    ``window``: draft tokens per iteration; ``init``: "random" | "repeat" (module docstring). ``on_advance(k)`` is
    called with the number of positions every row has newly accepted."""
    for name in SamplingParamsLike.__annotations__:  # the SamplingParams rules, also for a look-alike object
        check_value(name, getattr(params, name))
    check_params(model, params)
    if not model.config.causal:
        raise DigitError("Jacobi decoding needs an autoregressive (causal) model")
    if int(window) < 1:
        raise DigitError(f"the Jacobi window must be >= 1 draft token, got {window}")
    if init not in INITS:
        raise DigitError(f"unknown draft initialisation {init!r} (choose from {', '.join(INITS)})")
    B = batch_size(model, cond, batch)
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != B:
        raise DigitError(f"{len(generator)} generators for {B} samples")
    was_training = model.training
    model.eval()
    try:
        return _decode(model, cond, B, params, generator, int(window), init, on_advance)
    finally:
        model.train(was_training)


def _decode(model, cond, B, params, generator, window, init, on_advance):
    mc = model.config
    T, C, V, width = mc.seq_len, mc.cond_len, mc.vocab_size, mc.grid[1]
    device = next(model.parameters()).device
    guided = params.cfg_scale != 1.0
    rows = 2 * B if guided else B
    if guided:
        cond = join_conditions(cond, model.condition.null(cond))  # LlamaGen layout [cond; uncond], as standard decoding
    scales = None
    if guided:
        s = [cfg_scale_at(i, T, params.cfg_scale, params.cfg_interval, params.cfg_schedule) for i in range(T)]
        scales = torch.tensor(s, device=device)
    model.setup_cache(rows)
    # every position starts as a uniform random draft
    seq = fill(torch.empty(B, T, dtype=torch.long, device=device), generator, lambda t, g: t.random_(0, V, generator=g))
    q = torch.full((B, window + 1, V), 1.0 / V, device=device)  # q[:, k]: the draft distribution of token start + k
    accepted = torch.zeros(B, dtype=torch.long, device=device)
    start, end, n_forward = 0, 0, 0  # window = tokens start..end; start = the slowest row's first open position
    while start < T:
        if start == 0:  # the prefill gives p for token 0 only
            logits = model.prefill(cond, rows)[:, None]
        else:
            fed = seq[:, start - 1 : end]  # the last accepted token, then the drafts (its logits predict token start)
            pos = torch.arange(C + start - 1, C + end, device=device)
            logits = model.decode_block(fed.repeat(rows // B, 1), pos)
        n_forward += 1
        p = target_probs(logits, B, scales[start : end + 1] if guided else None, params)
        accepted = verify(seq, q, p, accepted, start, generator)
        new_start = int(accepted.min())
        shift = new_start - start
        q = torch.cat([q[:, shift:], q.new_full((B, shift, V), 1.0 / V)], dim=1)
        new_end = min(new_start + window, T - 1)
        if init == "repeat":
            for t in range(end + 1, new_end + 1):  # positions entering the window copy their left neighbour
                if t % width:
                    seq[:, t] = seq[:, t - 1]
                    q[:, t - new_start] = torch.nn.functional.one_hot(seq[:, t], V).to(q.dtype)
        if on_advance is not None and shift:
            on_advance(shift)
        start, end = new_start, new_end
    return seq, n_forward
