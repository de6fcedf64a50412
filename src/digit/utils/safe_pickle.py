"""Loading torch checkpoints that are not plain tensors, without executing arbitrary code.

``torch.load(weights_only=True)`` is the first choice. Checkpoints from other projects (fairseq's config objects, LlamaGen's
pickled ``argparse.Namespace``) need a little more: an allow-list of harmless globals. Anything else is refused.
"""

from __future__ import annotations

import os
import re
from typing import Any

from digit.errors import DigitError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# torch's refusal wraps the reason in paragraphs of advice, including "re-run with weights_only=False": never passed on
_ADVICE = re.compile(
    r"weights_only|trust|torch\.serialization|documentation|file an issue|Weights only load failed", re.I
)


def torch_load_reason(e: BaseException) -> str:
    """One line saying why ``torch.load`` refused a file: the offending global when the weights-only unpickler names
    one, otherwise torch's own reason, without ANSI escapes and without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    text = _ANSI.sub("", str(e))
    found = _GLOBAL.search(text)
    if found:
        return f"it asks to unpickle the global {found.group(1)}, which is not a tensor, a plain container or an allowed type"
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not _ADVICE.search(line):
            return line
    return type(e).__name__


def load_weights(path: str | os.PathLike, extra_safe_globals: list | None = None) -> Any:
    """torch.load with ``weights_only=True`` (plus explicitly allowed globals); refuse anything that would run code."""
    import argparse

    import torch

    allowed = [argparse.Namespace, *(extra_safe_globals or [])]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DigitError(f"file not found: {path}") from e
    except Exception as e:  # torch raises UnpicklingError with a long explanation
        raise DigitError(f"refusing to load {path}: not a plain weights file ({torch_load_reason(e)})") from e
