"""Decoding that never crashes a long run: every PIL mode becomes RGB, EXIF orientation is applied, and anything that
is not a complete, reasonably sized image raises ``BadImage`` (the caller skips and counts it)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# PIL's own bomb threshold (~89 MP) warns; we refuse instead. Twice the limit already raises DecompressionBombError.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class BadImage(Exception):
    """The bytes are not a usable image (truncated, undecodable, not an image, or a decompression bomb)."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips at 255, so rescale to 8 bits by the value range's top.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        a8 = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour; composite on white so they look like what a viewer shows.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes) -> Image.Image:
    """bytes -> an RGB PIL image with EXIF orientation applied, or ``BadImage``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(f"decompression bomb refused ({im.width}x{im.height} pixels)")
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb refused: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise BadImage("not an image") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as e:
        raise BadImage(f"undecodable ({type(e).__name__}: {e})") from e
