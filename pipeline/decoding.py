"""Photo bytes → RGB pixels the detector and the chip warp can trust.

One path for every photo:

1. Pillow parses the **header** only (format, size, mode, EXIF orientation).  The pixel
   limit is decided there, so a file that claims 60000×60000 never allocates.
2. Pixels: baseline RGB/grey **JPEG** (nearly every photo) is decoded by
   ``cv2.imdecode`` straight to RGB, at a DCT-reduced size (½, ¼, ⅛) when the photo is
   much larger than we need.  Measured here (1 thread, 12 MP JPEG): Pillow's decoder is
   as fast as OpenCV's, but turning a Pillow image into a numpy array costs one more
   packing copy (full-res 12 MP: ~145 ms vs ~90 ms; 1080p: 31 vs 24 ms).  Everything
   else (PNG, WebP, BMP, TIFF, GIF, CMYK JPEG, 16-bit, palette, alpha) goes through
   Pillow, which knows those modes.
3. EXIF orientation is applied to the array with ``cv2.rotate/flip/transpose``, so both
   decoders share it (OpenCV's own auto-rotation is switched off).

Decisions:

* A **truncated** file is ``decode_error``, not a half-grey photo: a partial decode gives
  wrong faces (or none) with status ``ok``, which is worse than an honest error row.
  Both decoders refuse truncated data (OpenCV 4.14 returns None, Pillow raises unless
  someone sets ``ImageFile.LOAD_TRUNCATED_IMAGES``).
* **Transparency** is composited on **white**: the RGB under fully transparent pixels is
  arbitrary (often black or leftovers from editing), white is what a viewer shows.
* **16-bit** samples are rescaled (``round(v / 257)``), never clipped at 255.
* Pillow's own bomb guard (``DecompressionBombError``, about 179 MP by default) also
  maps to ``too_large``.
* Only photo formats are opened (no EPS/PDF/PSD…, which would run other decoders).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.contract import DECODE_ERROR, DEFAULT_MAX_PIXELS, PILLOW_FORMATS, TOO_LARGE

#: Formats we open (Pillow opener names from the contract's one list; multi-picture JPEGs
#: report "MPO").  Anything else is ``decode_error`` ("unsupported").  HEIC/HEIF is read
#: by pillow-heif's opener (registered below); AVIF by Pillow's own plugin.
FORMATS: tuple[str, ...] = (*PILLOW_FORMATS, "PPM")


def _register_heif() -> None:
    from pillow_heif import register_heif_opener

    register_heif_opener()


_register_heif()

_EXIF_ORIENTATION = 0x0112
_REDUCED_FLAGS = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                  8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageError(Exception):
    """A photo we cannot use; ``status`` is the prediction-table status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class DecodedImage:
    """Decoded pixels plus the photo's own size (what users see coordinates in)."""

    rgb: np.ndarray  # H×W×3 uint8 RGB, C-contiguous, EXIF orientation applied
    width: int       # photo size after EXIF orientation
    height: int
    scale: float     # rgb pixels per photo pixel (1.0, 0.5, 0.25, 0.125)


def jpeg_reduction(long_side: int, min_long_side: int | None) -> int:
    """Largest DCT reduction (1, 2, 4, 8) that keeps the long side ≥ ``min_long_side``."""
    if min_long_side is None or min_long_side <= 0:
        return 1
    for factor in (8, 4, 2):
        if long_side >= factor * min_long_side:
            return factor
    return 1


def decode_image(data: bytes, max_pixels: int | None = None,
                 min_long_side: int | None = 1280) -> DecodedImage:
    """Decode one photo; raise ``ImageError`` (``decode_error`` / ``too_large``) if unusable.

    ``max_pixels`` defaults to ``DEFAULT_MAX_PIXELS``.  ``min_long_side=None`` always
    decodes at full resolution; otherwise big JPEGs are decoded reduced, keeping the long
    side ≥ ``min_long_side`` so that faces stay larger than the chips cut from them.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise ImageError(DECODE_ERROR, "empty file")
    try:
        return _decode(data, limit, min_long_side)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(TOO_LARGE, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError(DECODE_ERROR, "not an image or an unsupported format") from None
    except MemoryError:
        raise ImageError(TOO_LARGE, "out of memory while decoding") from None
    except Exception as exc:  # noqa: BLE001 — malformed files raise all kinds of errors
        raise ImageError(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None


def _decode(data: bytes, limit: int, min_long_side: int | None) -> DecodedImage:
    _check_png_header(data, limit)
    im = Image.open(io.BytesIO(data), formats=FORMATS)  # header only
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(DECODE_ERROR, f"invalid image size {w}x{h}")
    if w * h > limit:
        raise ImageError(TOO_LARGE, f"{w}x{h} = {w * h} pixels, limit {limit}")
    orientation = _orientation(im)
    factor = jpeg_reduction(max(w, h), min_long_side) if im.format in ("JPEG", "MPO") else 1

    if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
        flags = _REDUCED_FLAGS[factor] | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
        rgb = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if rgb is None:
            raise ImageError(DECODE_ERROR, "corrupt or truncated JPEG")
    else:
        if factor > 1:  # CMYK JPEG: Pillow's draft does the same DCT reduction
            im.draft(None, (-(-w // factor), -(-h // factor)))
        im.load()
        factor = max(1, round(w / im.width))
        rgb = _to_rgb(im)

    rgb = _orient(rgb, orientation)
    width, height = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return DecodedImage(np.ascontiguousarray(rgb), width, height, 1.0 / factor)


def _check_png_header(data: bytes, limit: int) -> None:
    """PNG's size is in its first 24 bytes; Pillow only reports it once the chunks up to
    IDAT are present, so a bare header claiming 60000×60000 would otherwise look like a
    broken file rather than an oversized one."""
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        if w * h > limit:
            raise ImageError(TOO_LARGE, f"{w}x{h} = {w * h} pixels, limit {limit}")


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; a broken EXIF block must not cost the photo, so → 1."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation the way ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return cv2.flip(a, 1)
    if orientation == 3:
        return cv2.rotate(a, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(a, 0)
    if orientation == 5:
        return cv2.transpose(a)
    if orientation == 6:
        return cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(a), -1)
    if orientation == 8:
        return cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return a


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → H×W×3 uint8 RGB (alpha on white, 16-bit rescaled)."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:4]
        out = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im)
        if mode == "F":
            a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:  # 16-bit grey (I;16*, or I holding 0..65535 as PNG/TIFF give it)
            a8 = np.clip(np.rint(a.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
        a8 = a8.reshape(a8.shape[0], a8.shape[1], -1)[..., 0]
        return cv2.cvtColor(np.ascontiguousarray(a8), cv2.COLOR_GRAY2RGB)
    if mode == "L":
        return cv2.cvtColor(np.asarray(im), cv2.COLOR_GRAY2RGB)
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))
