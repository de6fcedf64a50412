"""fairseq's sampling semantics for converted DiGIT models, where they differ from `digit.sampling.filters`.

DiGIT samples with fairseq's ``SequenceGenerator`` + ``Sampling`` search (DiGIT ``generator.py``; reference
digit-official.md sections 3-4). Per step:

1. ``lprobs = log_softmax(logits / T)`` over the WHOLE dictionary, the 5 special symbols included;
2. ``<pad>``, ``<unk>``, ``<s>``, ``<n>`` are set to -inf, and ``</s>`` (EOS) too while fewer than ``--min-len 256``
   tokens exist (so every image token is a codebook id; the EOS step after the grid is not sampled here);
3. top-p (when > 0 it replaces top-k): sort the probabilities ``exp(lprobs)``, keep the tokens whose cumulative
   probability is ``< p`` plus the first one reaching it. The probabilities are NOT renormalised after step 2, so the
   special symbols' mass counts against nobody and the nucleus is wider than `filters.top_p_filter`'s;
   top-k: the k largest (exactly k, ``torch.topk``);
4. ``torch.multinomial`` on the kept probabilities (it normalises them itself).

With top-k only (stage 1), slicing the specials away is exact and `filters` already matches. Top-p needs the special
rows' logits: the converter keeps them in ``official_head.safetensors`` and :func:`generate_official` appends them
to the head for the duration of sampling. MaskGIT decoding sets the specials to -inf before a plain softmax, which
the sliced model reproduces without help.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from digit.errors import DigitError


def fairseq_log_probs(logits: torch.Tensor, n_codes: int, temperature: float = 1.0) -> torch.Tensor:
    """``logits`` [B, n_codes + S] (codebook rows first, then the S special rows) -> log-probabilities [B, n_codes + S]
    normalised over all rows, specials then banned (-inf); the code rows are NOT renormalised."""
    # temperature 0 means greedy elsewhere; dividing by it here would give NaN rows that always draw code 0
    lprobs = torch.log_softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    lprobs[..., n_codes:] = float("-inf")
    return lprobs


def fairseq_top_p_keep(probs: torch.Tensor, p: float) -> torch.Tensor:
    """fairseq ``Sampling._sample_topp`` as a boolean keep-mask over ``probs`` [B, V] (probabilities as given,
    not renormalised): sorted cumulative mass ``< p``, plus the first token reaching ``p``."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mask = sorted_probs.cumsum(dim=-1) < p
    last = mask.sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    mask = mask.scatter(-1, last, True)
    return torch.zeros_like(mask).scatter(-1, order, mask)


def fairseq_filter(
    logits: torch.Tensor, *, n_codes: int, temperature: float = 1.0, top_k: int = 0, top_p: float = -1.0
) -> torch.Tensor:
    """The logits to sample from under fairseq's rules (module docstring); entries never sampled are -inf.
    ``top_p`` <= 0 means off (fairseq's default -1); ``top_p`` >= the kept mass keeps every code."""
    lprobs = fairseq_log_probs(logits, n_codes, temperature)
    if top_p > 0:
        keep = fairseq_top_p_keep(lprobs.exp(), top_p)
    elif top_k > 0:
        idx = torch.topk(lprobs, min(top_k, n_codes), dim=-1).indices
        keep = torch.zeros_like(lprobs, dtype=torch.bool).scatter(-1, idx, True)
    else:
        return lprobs
    return lprobs.masked_fill(~keep, float("-inf"))


def load_special_rows(run_dir: str | os.PathLike) -> torch.Tensor:
    """The special-symbol output rows [S, dim] a converted DiGIT run keeps beside its weights."""
    from digit.convert import SPECIALS_FILE
    from digit.utils.artifacts import load_safetensors

    path = Path(run_dir) / SPECIALS_FILE
    if not path.is_file():
        raise DigitError(f"{run_dir} has no {SPECIALS_FILE}: official sampling needs a run from `digit convert digit`")
    rows = load_safetensors(path).get("output_special.weight")
    if rows is None or rows.ndim != 2:
        raise DigitError(f"{path}: expected an 'output_special.weight' matrix")
    return rows


@contextmanager
def special_rows_appended(model: torch.nn.Module, special: torch.Tensor) -> Iterator[int]:
    """Temporarily give a fairseq-arch GPT the head ``[codes; specials]``; yields the number of code rows."""
    if model.config.arch != "fairseq":
        raise DigitError("official (fairseq) sampling applies to converted DiGIT models (the fairseq layout)")
    head = model.head
    if special.shape[1] != head.weight.shape[1]:
        raise DigitError(f"special rows have width {special.shape[1]}, the model {head.weight.shape[1]}")
    full = torch.nn.Linear(head.in_features, head.out_features + special.shape[0], bias=False)
    full = full.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        full.weight.copy_(torch.cat([head.weight, special.to(head.weight)]))
    model.head = full
    try:
        yield head.out_features
    finally:
        model.head = head


def generate_official(
    model: torch.nn.Module,
    special: torch.Tensor,
    cond: torch.Tensor | None = None,
    n: int | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = -1.0,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Autoregressive sampling of a converted DiGIT model as fairseq does it -> LongTensor [B, h, w] of code ids.

    E.g. stage 2 as published: ``generate_official(dec, load_special_rows(run), prefix, top_p=0.8)``; stage 1:
    ``top_k=200`` (equal to ``generate(model, top_k=200)`` up to exact ties)."""
    from digit.sampling.generate import generate

    if not model.config.causal:
        raise DigitError("MaskGIT decoding already matches the original: use digit.sampling.generate")
    with special_rows_appended(model, special) as n_codes:
        filt = partial(fairseq_filter, n_codes=n_codes, temperature=temperature, top_k=top_k, top_p=top_p)
        return generate(model, cond=cond, n=n, generator=generator, logits_filter=filt, **kwargs)
