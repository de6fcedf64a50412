"""Do the pieces of a pipeline fit together? `check_pipeline` compares the recorded configurations of stage 1, the
stage-2 decoder and the VQ tokenizer and refuses mismatches with a one-line reason, before any weights are loaded or
any sampling starts (`digit generate`, `Pipeline.from_pretrained`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digit.data.tokens import same_tokenizer as _same_tokenizer
from digit.errors import DigitError


def _read_run_config(run: Path) -> dict[str, Any]:
    from digit.models import read_run_config

    return read_run_config(run)[0]  # validated: model keys and types checked


def _tok_meta(run_cfg: dict[str, Any], key: str) -> dict[str, Any] | None:
    meta = (run_cfg.get("data") or {}).get(key) or {}
    tok = meta.get("tokenizer")
    return tok if isinstance(tok, dict) else None


def _grid(x: Any) -> tuple[int, int] | None:
    return None if x is None else (int(x[0]), int(x[1]))


def check_pipeline(stage1: dict[str, Any], vq: dict[str, Any], decoder: dict[str, Any] | None = None) -> str:
    """Raise DigitError unless the pieces fit together. ``stage1`` / ``decoder``: run ``config.json`` dicts; ``vq``:
    the VQ ``tokenizer.json``. Returns the path name: ``"digit-ar"``, ``"digit-nar"`` or ``"llamagen"``."""
    if vq.get("type") != "vq":
        raise DigitError(f"--vq holds a {vq.get('type')!r} tokenizer, not a VQ tokenizer")
    s1 = stage1["model"]
    vq_grid, vq_vocab = _grid(vq["grid"]), int(vq["vocab_size"])
    if s1.get("cond") == "prefix":
        raise DigitError("--stage1 is a prefix-conditioned decoder, not a stage-1 model")
    s1_tok = _tok_meta(stage1, "meta")
    if decoder is None:
        if s1_tok is not None and s1_tok.get("type") != "vq":
            raise DigitError(
                f"--stage1 was trained on {s1_tok.get('type')} tokens: pass a --decoder to turn them into VQ tokens"
            )
        if _grid(s1["grid"]) != vq_grid:
            raise DigitError(f"--stage1 samples a {tuple(s1['grid'])} grid but the VQ decodes {vq_grid}")
        if int(s1["vocab_size"]) != vq_vocab:
            raise DigitError(f"--stage1 has {s1['vocab_size']} token ids but the VQ codebook has {vq_vocab}")
        if s1_tok is not None and not _same_tokenizer(s1_tok, vq):
            raise DigitError("--stage1 was trained on tokens of another VQ codebook than --vq")
        return "llamagen"
    d = decoder["model"]
    if d.get("cond") != "prefix":
        raise DigitError(
            f"--decoder is not prefix-conditioned (cond={d.get('cond')!r}); it cannot decode stage-1 tokens"
        )
    if int(d.get("prefix_vocab_size") or 0) != int(s1["vocab_size"]) or _grid(d.get("prefix_grid")) != _grid(
        s1["grid"]
    ):
        raise DigitError(
            f"--decoder is conditioned on {d.get('prefix_vocab_size')} ids x {d.get('prefix_grid')} grid, "
            f"stage 1 samples {s1['vocab_size']} ids x {list(s1['grid'])}: not the stage-1 codebook"
        )
    prefix_tok = _tok_meta(decoder, "prefix_meta")
    if prefix_tok is not None and s1_tok is not None and not _same_tokenizer(prefix_tok, s1_tok):
        raise DigitError("--decoder was trained on prefix tokens of another tokenizer than stage 1's codebook")
    if _grid(d["grid"]) != vq_grid:
        raise DigitError(f"--vq has a {vq_grid} grid but the decoder predicts {tuple(d['grid'])}")
    if int(d["vocab_size"]) != vq_vocab:
        raise DigitError(f"--decoder predicts {d['vocab_size']} ids but the VQ codebook has {vq_vocab}")
    target_tok = _tok_meta(decoder, "meta")
    if target_tok is not None and (target_tok.get("type") != "vq" or not _same_tokenizer(target_tok, vq)):
        raise DigitError("--decoder was trained on another VQ codebook than --vq")
    return "digit-ar" if d.get("causal", True) else "digit-nar"
