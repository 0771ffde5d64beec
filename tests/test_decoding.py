"""decode_image: every format/mode → RGB uint8, EXIF orientation, limits, reduced JPEG decode.

All inputs are generated here, so each case states exactly what the bytes contain.
"""
from __future__ import annotations

import io
import resource
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.decoding import DEFAULT_MAX_PIXELS, DecodedImage, ImageError, decode_image, jpeg_reduction


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _quadrants(w: int = 64, h: int = 48) -> np.ndarray:
    """An image whose four quadrants have distinct colours, so any flip/rotation shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)      # top-left red
    a[: h // 2, w // 2:] = (0, 255, 0)       # top-right green
    a[h // 2:, : w // 2] = (0, 0, 255)       # bottom-left blue
    a[h // 2:, w // 2:] = (255, 255, 0)      # bottom-right yellow
    return a


def _photo(w: int, h: int) -> np.ndarray:
    """A smooth, photo-like image (gradients + blobs): JPEG-friendly, not flat."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)
    g = 255 * x / w
    b = 255 * y / h
    return np.clip(np.dstack([r, g, b]), 0, 255).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming width×height, and nothing else (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _status(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kw)
    assert isinstance(info.value, Exception) and info.value.message
    return info.value.status


def _check(img: DecodedImage) -> None:
    assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3 and img.rgb.shape[2] == 3
    assert img.rgb.flags["C_CONTIGUOUS"]


# ---------------------------------------------------------------- bad files

def test_empty_file_is_decode_error() -> None:
    assert _status(b"") == "decode_error"


def test_text_named_jpg_is_decode_error() -> None:
    assert _status(b"<html><body>404 not found</body></html>\n" * 20) == "decode_error"


def test_truncated_jpeg_is_decode_error_not_half_grey() -> None:
    data = _encode(Image.fromarray(_photo(640, 480)), "JPEG", quality=90)
    assert decode_image(data).rgb.shape == (480, 640, 3)
    for frac in (0.3, 0.7, 0.98):
        assert _status(data[: int(len(data) * frac)]) == "decode_error"


def test_truncated_png_is_decode_error() -> None:
    data = _encode(Image.fromarray(_photo(300, 200)), "PNG")
    assert _status(data[: len(data) // 2]) == "decode_error"


def test_unsupported_format_is_decode_error() -> None:
    """ICO is an image Pillow can read, but not a photo format we accept."""
    data = _encode(Image.fromarray(_photo(32, 32)), "ICO")
    assert Image.open(io.BytesIO(data)).format == "ICO"
    assert _status(data) == "decode_error"


def test_png_header_claiming_60000_squared_is_too_large_without_allocating() -> None:
    data = _png_header_only(60000, 60000)
    assert len(data) == 33 and zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:])[0]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.status == "too_large"
    # no pixel data exists: had decoding been tried it would be a decode_error
    assert "60000" in info.value.message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB


def test_max_pixels_is_decided_from_the_header() -> None:
    data = _encode(Image.fromarray(_photo(200, 100)), "PNG")
    assert _status(data, max_pixels=19_999) == "too_large"
    assert decode_image(data, max_pixels=20_000).rgb.shape == (100, 200, 3)
    assert DEFAULT_MAX_PIXELS > 0


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is patched to claim width×height."""
    data = _encode(Image.fromarray(_photo(64, 48)), "JPEG")
    sof = data.find(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def test_jpeg_header_claiming_huge_size_is_too_large() -> None:
    assert _status(_jpeg_claiming(20000, 10000)) == "too_large"
    assert _status(_jpeg_claiming(20000, 10000)[:2000]) == "too_large"


def test_pillow_bomb_guard_is_too_large() -> None:
    """Above Pillow's own ceiling (2 × MAX_IMAGE_PIXELS) even a generous max_pixels is too_large."""
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    assert _status(_jpeg_claiming(side, side), max_pixels=10**12) == "too_large"


# ---------------------------------------------------------------- modes and formats

def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (80, 60), (255, 0, 0, 0))  # pure cyan
    img = decode_image(_encode(cmyk, "JPEG", quality=95))
    _check(img)
    assert (img.width, img.height, img.scale) == (80, 60, 1.0)
    assert np.abs(img.rgb.reshape(-1, 3).mean(0) - (0, 255, 255)).max() < 6


def test_16bit_grey_png_is_rescaled_not_clipped() -> None:
    a = np.array([[0, 1000, 32896, 65535]], np.uint16).repeat(4, 0)
    data = _encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = decode_image(data)
    _check(img)
    np.testing.assert_array_equal(img.rgb[0, :, 0], [0, 4, 128, 255])
    assert (img.rgb[..., 0] == img.rgb[..., 2]).all()


def test_16bit_rgb_png_keeps_the_high_byte() -> None:
    a = np.zeros((4, 3, 3), np.uint16)
    a[:, 0] = 0x00FF   # would be 255 if the low byte or a clip were taken
    a[:, 1] = 0x8080
    a[:, 2] = 0xFFFF
    ok, png = cv2.imencode(".png", a)
    assert ok
    img = decode_image(png.tobytes())
    _check(img)
    assert np.abs(img.rgb[0, :, 0].astype(int) - [0, 128, 255]).max() <= 1


def test_rgba_png_is_composited_on_white() -> None:
    a = np.zeros((10, 30, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 255)    # opaque red
    a[:, 10:20] = (255, 0, 0, 128)  # half-transparent red
    a[:, 20:] = (0, 0, 0, 0)        # fully transparent (black underneath)
    img = decode_image(_encode(Image.fromarray(a, "RGBA"), "PNG"))
    _check(img)
    np.testing.assert_array_equal(img.rgb[5, 5], (255, 0, 0))
    assert np.abs(img.rgb[5, 15].astype(int) - (255, 127, 127)).max() <= 1
    np.testing.assert_array_equal(img.rgb[5, 25], (255, 255, 255))


def test_palette_gif_first_frame() -> None:
    frames = [Image.new("RGB", (40, 30), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(buf.getvalue())), "n_frames", 1) == 2
    img = decode_image(buf.getvalue())
    _check(img)
    np.testing.assert_array_equal(img.rgb[15, 20], (255, 0, 0))


def test_palette_png_with_transparency() -> None:
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.paste(1, (0, 0, 10, 10))
    img = decode_image(_encode(im, "PNG", transparency=0))
    np.testing.assert_array_equal(img.rgb[5, 5], (10, 200, 30))
    np.testing.assert_array_equal(img.rgb[5, 15], (255, 255, 255))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_three_equal_channels(fmt: str) -> None:
    g = _photo(64, 48)[..., 1]
    img = decode_image(_encode(Image.fromarray(g, "L"), fmt))
    _check(img)
    assert (img.rgb[..., 0] == img.rgb[..., 1]).all() and (img.rgb[..., 1] == img.rgb[..., 2]).all()
    assert np.abs(img.rgb[..., 0].astype(int) - g).mean() < 2


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}),
                                    ("PPM", {})])
def test_lossless_formats_roundtrip_exactly(fmt: str, kw: dict) -> None:
    a = _quadrants(50, 30)
    img = decode_image(_encode(Image.fromarray(a), fmt, **kw))
    _check(img)
    np.testing.assert_array_equal(img.rgb, a)
    assert (img.width, img.height, img.scale) == (50, 30, 1.0)


def test_rgb_jpeg_close_to_source() -> None:
    a = _photo(320, 240)
    img = decode_image(_encode(Image.fromarray(a), "JPEG", quality=95))
    _check(img)
    assert np.abs(img.rgb.astype(int) - a).mean() < 2


# ---------------------------------------------------------------- EXIF orientation

def _with_orientation(a: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"quality": 95} if fmt == "JPEG" else {}
    return _encode(Image.fromarray(a), fmt, exif=exif, **kw)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(fmt: str, orientation: int) -> None:
    a = _quadrants(64, 48)
    data = _with_orientation(a, orientation, fmt)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    img = decode_image(data)
    _check(img)
    assert img.rgb.shape == expected.shape
    assert (img.width, img.height) == ((48, 64) if orientation >= 5 else (64, 48))
    tol = 0 if fmt == "PNG" else 3
    assert np.abs(img.rgb.astype(int) - expected).mean() <= tol


def _corner_colours(rgb: np.ndarray) -> list[tuple[int, ...]]:
    """Colour at the centre of each quadrant: top-left, top-right, bottom-left, bottom-right."""
    h, w = rgb.shape[:2]
    pts = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(round(v / 255.0)) * 255 for v in rgb[y, x]) for y, x in pts]


R, G, B, Y = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def test_orientation_6_rotates_clockwise_and_8_counter_clockwise() -> None:
    """Stored TL=red TR=green BL=blue BR=yellow; 6 = turn 90° clockwise to view, 8 = anticlockwise."""
    a = _quadrants(64, 48)
    six = decode_image(_with_orientation(a, 6, "JPEG"))
    assert (six.width, six.height) == (48, 64) and six.rgb.shape == (64, 48, 3)
    assert _corner_colours(six.rgb) == [B, R, Y, G]
    eight = decode_image(_with_orientation(a, 8, "JPEG"))
    assert (eight.width, eight.height) == (48, 64)
    assert _corner_colours(eight.rgb) == [G, Y, R, B]


def test_broken_orientation_value_is_ignored() -> None:
    img = decode_image(_with_orientation(_quadrants(), 42, "JPEG"))
    assert (img.width, img.height) == (64, 48)


# ---------------------------------------------------------------- reduced JPEG decode

def test_jpeg_reduction_factor() -> None:
    assert jpeg_reduction(4000, 1280) == 2
    assert jpeg_reduction(5120, 1280) == 4
    assert jpeg_reduction(2559, 1280) == 1
    assert jpeg_reduction(2560, 1280) == 2
    assert jpeg_reduction(20000, 1280) == 8
    assert jpeg_reduction(20000, None) == 1


@pytest.fixture(scope="module")
def big_jpeg() -> tuple[np.ndarray, bytes]:
    a = _photo(4000, 3000)
    return a, _encode(Image.fromarray(a), "JPEG", quality=90)


@pytest.mark.parametrize("min_long_side,scale", [(1280, 0.5), (1000, 0.25), (None, 1.0)])
def test_large_jpeg_is_decoded_reduced(big_jpeg, min_long_side: int | None, scale: float) -> None:
    a, data = big_jpeg
    img = decode_image(data, min_long_side=min_long_side)
    _check(img)
    assert (img.width, img.height, img.scale) == (4000, 3000, scale)
    assert img.rgb.shape == (round(3000 * scale), round(4000 * scale), 3)
    assert max(img.rgb.shape[:2]) >= (min_long_side or 0)
    ref = cv2.resize(a, img.rgb.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(img.rgb.astype(int) - ref).mean() < 3


def test_reduced_decode_with_rotation_swaps_the_photo_size(big_jpeg) -> None:
    a, _ = big_jpeg
    img = decode_image(_with_orientation(a, 6, "JPEG"))
    assert (img.width, img.height, img.scale) == (3000, 4000, 0.5)
    assert img.rgb.shape == (2000, 1500, 3)


def test_cmyk_jpeg_is_reduced_too() -> None:
    cmyk = Image.new("CMYK", (2800, 600), (0, 255, 0, 0))
    img = decode_image(_encode(cmyk, "JPEG", quality=80))
    assert (img.width, img.height, img.scale) == (2800, 600, 0.5)
    assert img.rgb.shape == (300, 1400, 3)


def test_large_png_is_not_reduced() -> None:
    img = decode_image(_encode(Image.fromarray(_photo(2700, 100)), "PNG"))
    assert img.scale == 1.0 and img.rgb.shape == (100, 2700, 3)
