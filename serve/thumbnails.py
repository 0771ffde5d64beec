"""Face thumbnails for the review page: cut from the photo by the table's ``bbox``, sized
for the page, JPEG-encoded and kept in an in-memory LRU.

Why here and not the contact sheet's code: the sheet writes base64 into one HTML file once;
the page asks for one face at a time, many times, so a thumbnail is cached by (photo, face,
size) and a photo that cannot be read (gone, a hung S3 read) gives a grey placeholder within
``read_timeout_s``, never a hang.  The crop is the sheet's: the box widened by 30 % of its
longer side, on the photo decoded with its EXIF orientation (``pipeline.decoding``, the same
decoder that found the box, so the coordinates agree).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from pipeline import storage

#: Thumbnail sides served (a request is rounded up to one of these, so the cache is shared).
SIZES = (48, 64, 96, 128, 160, 192, 256)
MARGIN = 0.3


def snap_size(size: int) -> int:
    """The served side for a requested one (the next of ``SIZES``, at most the largest)."""
    for s in SIZES:
        if size <= s:
            return s
    return SIZES[-1]


def crop_face(rgb: np.ndarray, box: tuple[float, float, float, float], scale: float, size: int) -> np.ndarray:
    """The face of ``box`` (photo pixels) widened by ``MARGIN``, as a ``size``-square RGB image
    (padded grey where the widened box leaves the photo)."""
    import cv2

    x, y, w, h = (float(v) * scale for v in box)
    side = max(w, h) * (1 + 2 * MARGIN)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(1, int(round(side)))
    out = np.full((s, s, 3), 128, np.uint8)
    H, W = rgb.shape[:2]
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(W, x0 + s), min(H, y0 + s)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(out, (size, size), interpolation=interp)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class Thumbnails:
    """Thumbnails by (image_uri, face_index, size), cut on a miss and kept up to
    ``cache_bytes``; reads run in ``threads`` threads and are waited for ``read_timeout_s``."""

    def __init__(self, cache_bytes: int = 64 * 1024 * 1024, read_timeout_s: float = 10.0, threads: int = 8) -> None:
        self.cache_bytes, self.read_timeout_s = int(cache_bytes), float(read_timeout_s)
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="thumb-read")
        self._placeholders: dict[int, bytes] = {}
        self._fs: dict[str, object] = {}
        self.hits = self.misses = self.failures = 0

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "failures": self.failures,
                "hit_rate": self.hits / total if total else 0.0, "entries": len(self._cache),
                "bytes": self._bytes, "cache_bytes": self.cache_bytes}

    def get(self, image_uri: str, face_index: int, box: tuple[float, float, float, float] | None,
            size: int) -> tuple[bytes, bool]:
        """(JPEG bytes, whether it is the real face): a placeholder when the photo is unreadable."""
        size = snap_size(size)
        key = (image_uri, int(face_index), size)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return data, True
            self.misses += 1
        data = self._cut(image_uri, box, size)
        if data is None:
            with self._lock:
                self.failures += 1
            return self.placeholder(size), False
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._bytes += len(data)
            while self._bytes > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._bytes -= len(old)
        return data, True

    def _cut(self, image_uri: str, box: tuple[float, float, float, float] | None, size: int) -> bytes | None:
        from pipeline.decoding import ImageError, decode_image

        future = self._pool.submit(self._read, image_uri)
        try:
            data = future.result(timeout=self.read_timeout_s)
        except FutureTimeout:
            future.cancel()  # a hung read keeps its thread; the request does not wait for it
            return None
        except (OSError, storage.StorageError, ValueError):
            return None
        try:
            img = decode_image(data)
        except ImageError:
            return None
        if box is None:
            h, w = img.rgb.shape[:2]
            box, scale = (0.0, 0.0, float(w), float(h)), 1.0
        else:
            scale = img.scale
        return encode_jpeg(crop_face(img.rgb, box, scale, size))

    def _read(self, image_uri: str) -> bytes:
        """The photo's bytes, through one client per store (an S3 client is costly to make)."""
        scheme = "s3" if storage.is_s3(image_uri) else "file"
        fs = self._fs.get(scheme)
        if fs is None:
            fs = self._fs.setdefault(scheme, storage.resolve(image_uri)[0])
        return storage.read_bytes(fs, image_uri)

    def placeholder(self, size: int) -> bytes:
        """A plain grey square: what the page shows for a photo it cannot read."""
        if size not in self._placeholders:
            self._placeholders[size] = encode_jpeg(np.full((size, size, 3), 200, np.uint8))
        return self._placeholders[size]


