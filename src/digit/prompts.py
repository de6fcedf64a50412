"""Prompts for text-conditional GPTs: one code path for `digit sample --prompt`, `digit generate --prompt`, the Python
API (``pipe(prompts=[...])``) and `digit serve` (``"prompt"``).

- :func:`read_prompts`: ``--prompt`` values and a ``--prompts`` file (one per line, blank lines skipped), checked;
- :func:`spread_prompts`: ``n`` images round-robin over the prompts (as ``-n`` spreads over classes); fewer images
  than prompts is refused, no ``n`` gives one image per prompt;
- :func:`load_prompt_encoder`: a text encoder directory (`digit.data.text_features.load_text_encoder`) checked against
  the identity (sha256) the run recorded when it was trained on stored caption features;
- :func:`encode_prompts`: captions -> a `digit.models.Caption` in LlamaGen's sampler layout (left-padded), at the
  caption length and feature size the model takes. Each row depends on its own caption only, so image ``i``'s
  condition is the same whatever batch it is encoded in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from digit.errors import DigitError

MAX_PROMPT_CHARS = 4096  # far beyond any caption length a text encoder reads (LlamaGen: 120 T5 tokens)


def check_prompt(prompt: Any, what: str = "a prompt") -> str:
    """One caption: a non-empty string of printable text (no control characters but tabs)."""
    if not isinstance(prompt, str):
        raise DigitError(f"{what} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DigitError(f"{what} must be non-empty text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DigitError(f"{what} is {len(prompt)} characters long (at most {MAX_PROMPT_CHARS})")
    if any(ord(c) < 32 and c != "\t" for c in prompt):
        raise DigitError(f"{what} holds a control character (one prompt per line in a prompts file)")
    return prompt


def read_prompts(prompts: Sequence[str] | None = None, prompts_file: str | os.PathLike | None = None) -> list[str]:
    """The ``--prompt`` values, then the ``--prompts`` file's non-blank lines (stripped); at least one."""
    out = [check_prompt(p, "--prompt") for p in (prompts or [])]
    if prompts_file is not None:
        path = Path(prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DigitError(f"--prompts {path}: {e}") from e
        out += [
            check_prompt(line.strip(), f"--prompts {path} line {i}") for i, line in enumerate(lines, 1) if line.strip()
        ]
        if not out:
            raise DigitError(f"--prompts {path} holds no prompt")
    if not out:
        raise DigitError("give --prompt TEXT (repeatable) or --prompts FILE")
    return out


def spread_prompts(prompts: Sequence[str], n: int | None, n_name: str = "-n") -> list[str]:
    """Image ``i``'s caption: ``prompts[i % len(prompts)]`` for ``n`` images (default one per prompt)."""
    prompts = list(prompts)
    if not prompts:
        raise DigitError("no prompts given")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DigitError(f"{n_name} must be a positive integer, got {n!r}")
        if n < len(prompts):
            raise DigitError(f"{n_name} {n} is fewer than the {len(prompts)} prompts")
    count = len(prompts) if n is None else n
    return [prompts[i % len(prompts)] for i in range(count)]


def recorded_encoder(run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The text encoder identity a run recorded at training (None: a converted run, which records none)."""
    want = (run_config.get("data") or {}).get("text_encoder")
    return want if isinstance(want, dict) and isinstance(want.get("sha256"), str) else None


def describe_encoder(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "the encoder it was trained with"
    return f"the encoder it was trained with: {identity.get('name')!r}, sha256 {str(identity.get('sha256'))[:12]}"


def load_prompt_encoder(directory: str | os.PathLike, model_config: Any, run_config: dict[str, Any], flag: str) -> Any:
    """The text encoder in ``directory`` for a text model (caption length from the model), refused when the run
    recorded another encoder (``flag``: how the caller names the directory in messages)."""
    from digit.data.text_features import load_text_encoder

    if not Path(directory).is_dir():
        raise DigitError(f"{flag} {directory}: not a directory")
    encoder = load_text_encoder(directory, max_length=model_config.caption_len)
    want, have = recorded_encoder(run_config), encoder.identity()
    if want is not None and want["sha256"] != have.get("sha256"):
        raise DigitError(
            f"{flag} {directory} ({str(have.get('sha256', ''))[:12]}) is not the encoder this run was trained with "
            f"({want.get('name')!r}, {want['sha256'][:12]})"
        )
    return encoder


def encode_prompts(encoder: Any, prompts: Sequence[str], model_config: Any) -> Any:
    """Captions -> `Caption` (features float32 [N, L, D] left-padded, mask [N, L]) as the model reads them."""
    import torch

    from digit.models.conditions import left_pad_captions

    features, mask = encoder.encode(list(prompts))
    if tuple(features.shape[1:]) != (model_config.caption_len, model_config.caption_dim):
        raise DigitError(
            f"the text encoder gives {list(features.shape[1:])} features, the model takes "
            f"[{model_config.caption_len}, {model_config.caption_dim}]"
        )
    # float32 as training read the stored features (stored at float16 they differ only by that rounding)
    return left_pad_captions(torch.from_numpy(features).float(), torch.from_numpy(mask))
