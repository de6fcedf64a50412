"""Running a `digit.pipeline.Pipeline` over a list of conditions: stage 1 -> (stage-2 decoder) -> VQ decode, in
batches, with image ``i`` drawing from its own generator seeded from (seed, i) through both stages, so its pixels do
not depend on the batch size or on the torchrun shard that made it (`digit generate`, the Python API, the benchmarks).

A class or unconditional pipeline is driven by ``labels``; a text-conditional one by ``prompts`` (image ``i``'s
caption, encoded per batch by the pipeline's text encoder: `digit.prompts`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from digit.errors import DigitError
from digit.sampling.params import SamplingParams
from digit.utils.images import to_uint8

if TYPE_CHECKING:
    from digit.pipeline import Pipeline


def decoder_defaults(kind: str) -> SamplingParams:
    """The stage-2 decoder's sampling defaults: top-p 0.8 for an AR decoder (DiGIT), no filter for MaskGIT."""
    return SamplingParams(top_p=0.8 if kind == "digit-ar" else 1.0)


@dataclass
class GenerationResult:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N], -1 unconditional
    tokens: np.ndarray  # stage-1 tokens [N, h, w]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: stage1, stage2, vq
    forward_passes: dict[str, int] = field(default_factory=dict)  # model forward passes per stage, all batches
    indices: np.ndarray | None = None  # which images of the run these are (all of them in one process)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_images(
    pipe: Pipeline,
    labels: np.ndarray,
    stage1: SamplingParams | None = None,
    decoder: SamplingParams | None = None,
    *,
    prompts: Sequence[str] | None = None,
    decoder_official: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    compile: bool = False,
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> GenerationResult:
    """Run the whole pipeline over ``labels`` in batches. Image ``i`` draws from its own generator seeded from
    (seed, i) through both stages (`digit.sampling.seeds`), so its pixels do not depend on the batch size.

    ``labels``: int64 [N] (-1 for unconditional and text-conditional images); ``prompts``: image ``i``'s caption, for
    a text-conditional stage 1 (required there, refused elsewhere).

    ``decoder``: the stage-2 decoder's parameters (default `decoder_defaults`); ``decoder_official``: fairseq's rules
    for a converted DiGIT AR decoder (`digit.sampling.official`: specials banned after normalising, top-p on
    probabilities that are not renormalised; needs the run's official_head.safetensors).
    ``shard=(rank, world_size)``: only the batches ``b`` with ``b % world_size == rank`` (torchrun); the result holds
    those images (``indices``), and `merge_results` of every rank's result is the single-process result."""
    from tqdm import tqdm

    from digit.sampling.generate import check_params, sample
    from digit.sampling.seeds import batch_ranges, image_generators

    s1 = stage1 or SamplingParams()
    dec = decoder or decoder_defaults(pipe.kind)
    check_params(pipe.stage1, s1)
    if pipe.decoder is not None:
        check_params(pipe.decoder, dec)
    if decoder_official and pipe.decoder_special_rows is None:
        raise DigitError("official sampling needs a converted DiGIT decoder (official_head.safetensors)")
    if pipe.is_text:
        if prompts is None or len(prompts) != len(labels):
            raise DigitError(f"a text-conditional pipeline needs one prompt per image ({len(labels)})")
    elif prompts is not None:
        raise DigitError(f"prompts given but stage 1 is {pipe.stage1.config.cond!r}-conditioned, not text")
    dev = pipe.device
    n = len(labels)
    images, tokens = [], []
    secs = {"stage1": 0.0, "stage2": 0.0, "vq": 0.0}
    passes = {"stage1": 0, "stage2": 0}
    mine = batch_ranges(n, batch_size, *shard)
    bar = tqdm(total=sum(e - s for s, e in mine), desc="generate", unit="img", disable=not progress)
    for start, end in mine:
        lab = labels[start:end]
        g = image_generators(seed, range(start, end), dev)
        if pipe.is_text:
            cond = pipe.encode_prompts(prompts[start:end]).to(dev)
        else:
            cond = torch.as_tensor(lab, device=dev) if pipe.num_classes else None
        t0 = time.perf_counter()
        out = sample(pipe.stage1, cond, len(lab), s1, generator=g, compile=compile)
        ids = out.tokens
        passes["stage1"] += out.forward_passes
        _sync(dev)
        t1 = time.perf_counter()
        vq_ids = ids
        if pipe.decoder is not None:
            prefix = ids.reshape(len(lab), -1)
            if decoder_official:
                from digit.sampling.official import generate_official

                vq_ids = generate_official(
                    pipe.decoder,
                    pipe.decoder_special_rows,
                    cond=prefix,
                    temperature=dec.temperature,
                    top_k=dec.top_k,
                    top_p=dec.top_p,
                    generator=g,
                )
                passes["stage2"] += pipe.decoder.config.seq_len
            else:
                out = sample(pipe.decoder, prefix, None, dec, generator=g, compile=compile)
                vq_ids = out.tokens
                passes["stage2"] += out.forward_passes
        _sync(dev)
        t2 = time.perf_counter()
        images.append(to_uint8(pipe.vq.decode(vq_ids)))
        _sync(dev)
        t3 = time.perf_counter()
        secs["stage1"] += t1 - t0
        secs["stage2"] += t2 - t1
        secs["vq"] += t3 - t2
        tokens.append(ids.cpu().numpy())
        bar.update(len(lab))
    bar.close()
    for m in (pipe.stage1, pipe.decoder):
        if m is not None and hasattr(m, "clear_cache"):
            m.clear_cache()
    indices = np.concatenate([np.arange(s, e) for s, e in mine]) if mine else np.zeros(0, dtype=np.int64)
    if not mine:  # a rank with no batch (more ranks than batches)
        return GenerationResult(
            np.zeros((0, 0, 0, 3), np.uint8), labels[:0], np.zeros((0, 0, 0)), secs, passes, indices
        )
    return GenerationResult(
        np.concatenate(images),
        np.asarray(labels, dtype=np.int64)[indices],
        np.concatenate(tokens),
        secs,
        passes,
        indices,
    )


def merge_results(parts: list[GenerationResult]) -> GenerationResult:
    """Every rank's `generate_images` result -> the whole run's, in image order (seconds: the slowest rank's)."""
    parts = [p for p in parts if len(p.indices)]
    order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])[order]  # noqa: E731
    seconds = {k: max(p.seconds[k] for p in parts) for k in parts[0].seconds}
    passes = {k: sum(p.forward_passes[k] for p in parts) for k in parts[0].forward_passes}
    return GenerationResult(cat("images"), cat("labels"), cat("tokens"), seconds, passes, cat("indices"))
