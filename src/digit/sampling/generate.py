"""Token-grid generation with a static KV cache (gpt-fast's structure, LlamaGen's CFG layout).

Autoregressive models: the condition is prefilled once, then one token per step through ``model.decode_step``;
the cache, the output buffer, the fed-back token buffer and the position tensor are allocated before the loop, and
nothing in the loop reads a value back to the host (sampling is the exponential race, not ``torch.multinomial``).
With classifier-free guidance the batch is doubled once as [cond; null] (LlamaGen), guidance is applied to raw logits,
and both halves are fed the token sampled from the guided logits.

Bidirectional (``causal=False``) models decode MaskGIT-style through `digit.sampling.maskgit`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from digit.errors import DigitError
from digit.sampling.filters import SCHEDULES, cfg, cfg_scale_at, filter_logits, sample_from_logits
from digit.sampling.maskgit import DIGIT_NAR_STEPS


def _batch_size(model, cond: torch.Tensor | None, n: int | None) -> int:
    if model.config.cond == "none":
        if n is None or n < 1:
            raise DigitError("an unconditional model needs n >= 1 samples")
        return int(n)
    if cond is None:
        raise DigitError(f"a {model.config.cond}-conditioned model needs cond")
    if n is not None and n != cond.shape[0]:
        raise DigitError(f"n = {n} but cond has {cond.shape[0]} rows")
    return int(cond.shape[0])


def check_sampling_args(model, top_k: int, top_p: float, cfg_scale: float, cfg_schedule: str) -> None:
    if top_k < 0:
        raise DigitError(f"top-k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise DigitError(f"top-p must be in (0, 1], got {top_p}")
    if cfg_schedule not in SCHEDULES:
        raise DigitError(f"unknown cfg schedule {cfg_schedule!r} (choose from {', '.join(SCHEDULES)})")
    if cfg_scale != 1.0 and model.config.cond != "class":
        raise DigitError("classifier-free guidance needs a class-conditional model")


@torch.inference_mode()
def generate(
    model,
    cond: torch.Tensor | None = None,
    n: int | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    cfg_schedule: str = "constant",
    generator: torch.Generator | None = None,
    compile: bool = False,
    nar_steps: int = DIGIT_NAR_STEPS,
    nar_temperature: float = 4.5,
    on_step: Callable[[int], None] | None = None,
    logits_filter: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample token grids ``[B, h, w]`` (long). ``cond``: labels [B] | prefix [B, P] | None with ``n`` samples.

    Filters and guidance are documented in `digit.sampling.filters`. ``compile`` wraps the decode step in
    torch.compile (CUDA graphs on GPU). The KV cache stays allocated on the model for the next call with the same
    batch size; ``model.clear_cache()`` frees it. ``logits_filter`` (autoregressive models) replaces temperature /
    top-k / top-p: it maps the (guided) logits [B, V] to the logits to sample from (`digit.sampling.official`).
    """
    check_sampling_args(model, top_k, top_p, cfg_scale, cfg_schedule)
    B = _batch_size(model, cond, n)
    was_training = model.training
    model.eval()
    try:
        if not model.config.causal:
            out = _generate_nar(model, cond, B, temperature, top_k, top_p, generator, nar_steps, nar_temperature)
        else:
            out = _generate_ar(
                model,
                cond,
                B,
                temperature,
                top_k,
                top_p,
                cfg_scale,
                cfg_interval,
                cfg_schedule,
                generator,
                compile,
                on_step,
                logits_filter,
            )
    finally:
        model.train(was_training)
    return out.view(B, *model.config.grid)


def _generate_ar(
    model,
    cond,
    B,
    temperature,
    top_k,
    top_p,
    cfg_scale,
    cfg_interval,
    cfg_schedule,
    generator,
    compile,
    on_step,
    logits_filter=None,
):
    cfg_ = model.config
    T, C = cfg_.seq_len, cfg_.cond_len
    device = next(model.parameters()).device
    guided = cfg_scale != 1.0
    rows = 2 * B if guided else B
    if guided:
        cond = torch.cat([cond, model.condition.null(cond)])  # LlamaGen layout [cond; uncond]
    model.setup_cache(rows)
    decode = model.decode_step
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        decode = torch.compile(model.decode_step, mode=mode, fullgraph=True)
    out = torch.empty(B, T, dtype=torch.long, device=device)
    fed = torch.empty(rows, 1, dtype=torch.long, device=device)  # the token fed back to every row
    positions = torch.arange(C, C + T - 1, device=device)  # sequence position of image token i is C + i
    logits = model.prefill(cond, rows)  # [rows, V]
    for i in range(T):
        if i:
            # eager: attend to the C + i filled cache entries; compiled: fixed shapes through the mask
            logits = decode(fed, positions[i - 1 : i]) if compile else decode(fed, positions[i - 1 : i], C + i)
        if guided:
            scale = cfg_scale_at(i, T, cfg_scale, cfg_interval, cfg_schedule)
            logits = cfg(logits[:B], logits[B:], scale) if scale != 1.0 else logits[:B]
        filtered = (
            logits_filter(logits) if logits_filter is not None else filter_logits(logits, temperature, top_k, top_p)
        )
        token = sample_from_logits(filtered, generator)  # [B]
        out[:, i] = token
        fed.view(-1, B).copy_(token.expand(rows // B, B))  # cond and null rows get the same token
        if on_step is not None:
            on_step(i)
    return out


def _generate_nar(model, cond, B, temperature, top_k, top_p, generator, steps, choice_temperature):
    # MaskGIT decoding lives in digit.sampling.maskgit (DiGIT's NAR schedule)
    from digit.sampling.maskgit import maskgit_decode

    return maskgit_decode(
        model,
        cond,
        n=B,
        steps=steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        choice_temperature=choice_temperature,
        generator=generator,
    ).flatten(1)
