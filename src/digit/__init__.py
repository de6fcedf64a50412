"""digit: autoregressive image generation and understanding over a stable, discriminative latent space.

``from digit import Pipeline`` is the Python API (`digit.pipeline`); it is imported on first use so that ``import
digit`` (and ``digit --help``) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from digit.errors import DigitError  # noqa: E402

if TYPE_CHECKING:
    from digit.pipeline import Pipeline, PipelineOutput
    from digit.sampling.params import SamplingParams

_LAZY = {"Pipeline": "digit.pipeline", "PipelineOutput": "digit.pipeline", "SamplingParams": "digit.sampling.params"}

__all__ = ["DigitError", "Pipeline", "PipelineOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'digit' has no attribute {name!r}")
