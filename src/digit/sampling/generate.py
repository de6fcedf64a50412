"""Token-grid generation with a static KV cache (gpt-fast's structure, LlamaGen's CFG layout).

The sampler owns the whole decode step: :func:`decode_step` is the model's forward over the fed-back token, guidance,
filtering and the draw, as one function; with ``compile=True`` it is compiled once per process and mode (not per call)
and reused for every batch and model (torch.compile guards and recompiles only when a model or a static setting
changes). The model is used only through the :class:`CachedDecoder` protocol.

Autoregressive models: the condition is prefilled once, then one token per step; the cache, the output buffer, the
fed-back token buffer, the noise buffer and the position tensor are allocated before the loop, and nothing in the loop
reads a value back to the host (sampling is the exponential race on pre-drawn Exp(1) noise, not ``torch.multinomial``;
drawing the noise outside the step keeps ``torch.Generator`` out of the compiled graph and lets each row have its own
generator). With classifier-free guidance the batch is doubled once as [cond; null] (LlamaGen), guidance is applied to
raw logits, and both halves are fed the token sampled from the guided logits.

Bidirectional (``causal=False``) models decode MaskGIT-style through `digit.sampling.maskgit`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from digit.errors import DigitError
from digit.models.conditions import cond_rows, join_conditions
from digit.sampling.filters import Generators, cfg, cfg_scale_at, fill_exponential, filter_logits_rows
from digit.sampling.filters import sample_with_noise as _draw
from digit.sampling.params import SamplingParams

LogitsFilter = Callable[[torch.Tensor], torch.Tensor]


class CachedDecoder(Protocol):
    """What the sampler needs of a model (`digit.models.GPT` is one).

    ``config``: ``causal``, ``cond`` ("none" | "class" | "prefix"), ``seq_len``, ``cond_len``, ``grid``, ``vocab_size``;
    ``condition.null(cond)``: the unconditional counterpart of ``cond`` (CFG)."""

    config: Any
    condition: Any
    training: bool

    def parameters(self, recurse: bool = True) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, device: Any = None) -> None: ...
    def clear_cache(self) -> None: ...
    def prefill(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor: ...
    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor: ...


@dataclass
class Sampled:
    tokens: torch.Tensor  # [B, h, w] long
    forward_passes: int  # model forward passes (prefill included) that produced them


@dataclass
class RowSettings:
    """Per-row sampling settings as tensors [B] plus the static facts the step compiles on."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    kmax: int  # largest active top-k (0: none)
    nucleus: bool  # any row with top-p < 1

    @classmethod
    def build(cls, params: list[SamplingParams], vocab: int, device: Any) -> RowSettings:
        ks = [p.top_k for p in params if 0 < p.top_k < vocab]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            kmax=max(ks, default=0),
            nucleus=any(p.top_p < 1.0 for p in params),
        )


def choose(
    logits: torch.Tensor,
    scale: torch.Tensor | None,
    rows: RowSettings,
    noise: torch.Tensor,
    logits_filter: LogitsFilter | None = None,
) -> torch.Tensor:
    """Guidance (``scale`` [B] per pair, None = unguided), filtering and the draw: logits [B or 2B, V] -> tokens [B]."""
    if scale is not None:
        B = noise.shape[0]
        c, u = logits[:B], logits[B:]
        # a scale of exactly 1 takes the conditional logits as they are (LlamaGen past cfg_interval)
        logits = torch.where((scale == 1.0)[:, None], c, cfg(c, u, scale[:, None]))
    if logits_filter is not None:
        filtered = logits_filter(logits)
    else:
        filtered = filter_logits_rows(
            logits, rows.temperature, rows.top_k, rows.top_p, kmax=rows.kmax, nucleus=rows.nucleus
        )
    return _draw(filtered, noise)


def decode_step(
    model: CachedDecoder,
    fed: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int | None,
    scale: torch.Tensor | None,
    rows: RowSettings,
    noise: torch.Tensor,
    logits_filter: LogitsFilter | None = None,
) -> torch.Tensor:
    """One whole decode step: forward the fed-back tokens [rows, 1] at ``input_pos``, guide, filter, draw -> [B]."""
    return choose(model.decode_step(fed, input_pos, kv_len), scale, rows, noise, logits_filter)


@functools.cache
def compiled_decode_step(mode: str) -> Callable[..., torch.Tensor]:
    """`decode_step` compiled once per process and mode ("default" on CPU, "reduce-overhead": CUDA graphs)."""
    return torch.compile(decode_step, mode=mode, fullgraph=True)


def step_function(compile: bool, device: torch.device) -> Callable[..., torch.Tensor]:
    if not compile:
        return decode_step
    return compiled_decode_step("reduce-overhead" if device.type == "cuda" else "default")


def check_params(model: CachedDecoder, params: SamplingParams) -> None:
    """What depends on the model (the values themselves were validated by SamplingParams)."""
    if params.cfg_scale == 1.0:
        return
    if model.config.cond not in ("class", "text"):
        raise DigitError("classifier-free guidance needs a class-conditional or text-conditional model")
    if model.config.class_dropout == 0.0:  # e.g. DiGIT's converted stage 1: its null row was never trained
        raise DigitError("classifier-free guidance needs a model trained with class dropout (this one has 0)")
    if not model.config.causal:
        raise DigitError("classifier-free guidance is implemented for autoregressive models, not MaskGIT-style ones")


def batch_size(model: CachedDecoder, cond: torch.Tensor | None, n: int | None) -> int:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise DigitError(f"n must be an int (the number of samples), got {type(n).__name__}")
    if model.config.cond == "none":
        if n is None or n < 1:
            raise DigitError("an unconditional model needs n >= 1 samples")
        return int(n)
    if cond is None:
        raise DigitError(f"a {model.config.cond}-conditioned model needs cond")
    rows = cond_rows(cond)
    if n is not None and n != rows:
        raise DigitError(f"n = {n} but cond has {rows} rows")
    return rows


@torch.inference_mode()
def sample(
    model: CachedDecoder,
    cond: torch.Tensor | None = None,
    n: int | None = None,
    params: SamplingParams | None = None,
    *,
    generator: Generators = None,
    compile: bool = False,
    on_step: Callable[[int], None] | None = None,
    logits_filter: LogitsFilter | None = None,
) -> Sampled:
    """Sample token grids ``[B, h, w]`` (long). ``cond``: labels [B] | prefix [B, P] | Caption | None with ``n`` samples.

    ``generator``: one for the batch, or one per row (then a row's tokens depend only on its own generator).
    ``compile``: use the compiled decode step. The KV cache stays allocated on the model for the next call with the
    same batch size; ``model.clear_cache()`` frees it. ``logits_filter`` (autoregressive models) replaces temperature /
    top-k / top-p: it maps the (guided) logits [B, V] to the logits to sample from (`digit.sampling.official`)."""
    params = params or SamplingParams()
    check_params(model, params)
    B = batch_size(model, cond, n)
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != B:
        raise DigitError(f"{len(generator)} generators for {B} samples")
    was_training = model.training
    model.train(False)
    try:
        if not model.config.causal:
            from digit.sampling.maskgit import maskgit_decode

            tokens = maskgit_decode(model, cond, n=B, params=params, generator=generator)
            return Sampled(tokens, params.nar_steps)
        if params.decode == "jacobi":
            out, passes = _sample_jacobi(model, cond, B, params, generator, compile, on_step, logits_filter)
        else:
            out, passes = _sample_ar(model, cond, B, params, generator, compile, on_step, logits_filter)
    finally:
        model.train(was_training)
    return Sampled(out.view(B, *model.config.grid), passes)


def generate(
    model: CachedDecoder,
    cond: torch.Tensor | None = None,
    n: int | None = None,
    params: SamplingParams | None = None,
    *,
    generator: Generators = None,
    compile: bool = False,
    on_step: Callable[[int], None] | None = None,
    logits_filter: LogitsFilter | None = None,
    **settings: Any,
) -> torch.Tensor:
    """`sample`'s tokens only. Sampling settings as ``params`` or as keywords (``temperature=0.7, top_k=100``)."""
    if settings:
        params = (params or SamplingParams()).replace(**settings)
    return sample(
        model, cond, n, params, generator=generator, compile=compile, on_step=on_step, logits_filter=logits_filter
    ).tokens


def _sample_jacobi(model, cond, B, params, generator, compile, on_step, logits_filter):
    """Speculative Jacobi decoding (`digit.sampling.jacobi`), per-image generators included; an image's tokens still
    depend on its batch (the window follows the slowest row), its distribution does not."""
    from digit.sampling.jacobi import jacobi_generate

    if logits_filter is not None or compile:
        raise DigitError("Jacobi decoding takes the standard filters and runs eager (no logits_filter, no compile)")
    done = [0]

    def advance(k: int) -> None:
        if on_step is not None:
            for i in range(done[0], done[0] + k):
                on_step(i)
        done[0] += k

    return jacobi_generate(model, cond, B, params, generator, on_advance=advance)


def _sample_ar(model, cond, B, params, generator, compile, on_step, logits_filter):
    cfg_ = model.config
    T, C, V = cfg_.seq_len, cfg_.cond_len, cfg_.vocab_size
    device = next(model.parameters()).device
    guided = params.guided
    rows = 2 * B if guided else B
    if guided:
        cond = join_conditions(cond, model.condition.null(cond))  # LlamaGen layout [cond; uncond]
    model.setup_cache(rows)
    step = step_function(compile, device)
    settings = RowSettings.build([params] * B, V, device)
    scales = [cfg_scale_at(i, T, params.cfg_scale, params.cfg_interval, params.cfg_schedule) for i in range(T)]
    scale_t = torch.tensor(scales, dtype=torch.float32, device=device)[:, None].expand(T, B)
    out = torch.empty(B, T, dtype=torch.long, device=device)
    fed = torch.empty(rows, 1, dtype=torch.long, device=device)  # the token fed back to every row
    positions = torch.arange(C, C + T - 1, device=device)  # sequence position of image token i is C + i
    logits = model.prefill(cond, rows)
    # the head's width, not the vocabulary: official sampling appends fairseq's special rows to the head
    noise = torch.empty(B, logits.shape[-1], dtype=torch.float32, device=device)
    for i in range(T):
        fill_exponential(noise, generator)
        scale = scale_t[i] if guided else None
        if i == 0:
            token = choose(logits, scale, settings, noise, logits_filter)
        else:
            # eager: attend to the C + i filled cache entries; compiled: fixed shapes through the mask
            kv_len = None if compile else C + i
            token = step(model, fed, positions[i - 1 : i], kv_len, scale, settings, noise, logits_filter)
        out[:, i] = token
        fed.view(-1, B).copy_(token.expand(rows // B, B))  # cond and null rows get the same token
        if on_step is not None:
            on_step(i)
    return out, T  # the prefill and T - 1 decode steps
