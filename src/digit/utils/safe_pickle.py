"""Loading torch checkpoints that are not plain tensors, without executing arbitrary code.

``torch.load(weights_only=True)`` is the first choice. Checkpoints from other projects (fairseq's config objects, LlamaGen's
pickled ``argparse.Namespace``) need a little more: an allow-list of harmless globals. Anything else is refused.
"""

from __future__ import annotations

import os
from typing import Any

from digit.errors import DigitError


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
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DigitError(f"refusing to load {path}: not a plain weights file ({msg})") from e
