"""Bytes → RGB pixels the way a viewer shows the photo, or a status saying why not.

Pillow decodes (libjpeg-turbo; every format and mode we accept) because it reads the
header without the pixels: the pixel limit is enforced before any allocation, and large
JPEGs are decoded straight at 1/2, 1/4 or 1/8 size by DCT scaling (``Image.draft``).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.settings import Settings

DEFAULT_MAX_PIXELS = Settings.model_fields["max_pixels"].default
_ROTATES = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageError(Exception):
    """A photo that cannot be used; ``status`` is the prediction table's status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


@dataclass
class DecodedImage:
    rgb: np.ndarray   # H×W×3 uint8 RGB, EXIF orientation applied (maybe a reduced decode)
    width: int        # the photo's own size after EXIF orientation
    height: int
    scale: float      # rgb pixels per photo pixel


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 min_long_side: int | None = 1280) -> DecodedImage:
    """Decode ``data``; JPEGs whose long side exceeds 2×``min_long_side`` are decoded at the
    largest DCT reduction that keeps the long side ≥ ``min_long_side`` (None: full size).

    A truncated file is a ``decode_error``, not a half-grey photo: faces found in the
    missing part would be inventions.  Transparent pixels are composited onto white.
    """
    if not data:
        raise ImageError("decode_error", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("decode_error", "not an image (format not recognised)") from None
    except Exception as exc:  # malformed headers raise all sorts of errors
        raise ImageError("decode_error", f"unreadable header: {exc}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError("decode_error", f"invalid size {w}×{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("too_large", f"{w}×{h} = {w * h} pixels, limit {max_pixels}")
    orientation = _orientation(im)
    if im.format == "JPEG" and min_long_side and max(w, h) > 2 * min_long_side:
        f = min_long_side / max(w, h)
        im.draft(im.mode, (max(1, int(w * f + 0.999)), max(1, int(h * f + 0.999))))
    try:
        im.load()
        rgb = _to_rgb(im)
    except Exception as exc:
        raise ImageError("decode_error", f"corrupt or truncated {im.format or 'image'}: {exc}") from None
    scale = rgb.shape[1] / w
    if orientation > 1:
        rgb = np.ascontiguousarray(_orient(rgb, orientation))
        if orientation in _ROTATES:
            w, h = h, w
    return DecodedImage(rgb, int(w), int(h), float(scale))


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to lose the photo
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an H×W×C array, as ImageOps.exif_transpose does."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    return ops[orientation](rgb)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → H×W×3 uint8 RGB."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if a.dtype == np.float32 or mode == "F":
            a = np.clip(a, 0, 1) * 255 if a.max() <= 1.0 else np.clip(a, 0, 255)
        elif a.max() > 255:  # 16-bit samples: keep the full range, not the clipped low byte
            a = a / 257.0
        g = np.clip(a + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        a = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = a[:, :, 3:4] / 255.0
        return (a[:, :, :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.asarray(im.convert("RGB"))
