"""digit: autoregressive image generation and understanding over a stable, discriminative latent space."""

__version__ = "0.1.0"

from digit.errors import DigitError  # noqa: E402

__all__ = ["DigitError", "__version__"]
