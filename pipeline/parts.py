"""The prediction table's part files, committed as rows arrive.

The scoring job iterates its Ray Data plan in the driver and hands every block here.
A file is closed every ``max_photos`` photos or ``max_seconds`` seconds (whichever comes
first, checked as blocks arrive), written whole (``storage.put_atomic``: an
``.inprogress`` name renamed into place, or one S3 upload), so readers and ``--resume``
only ever see complete files.  A stop commits what is buffered; a crash loses at most
the buffer (that bound) plus the blocks still inside the plan.
"""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import stopping, storage

FILE_PHOTOS = 2_000     # a part file is closed after this many photos …
FILE_SECONDS = 30.0     # … or this many seconds after its first row, whichever first


class PartWriter:
    """``<out>/<prefix>-NNNNN.parquet`` files, each committed whole."""

    def __init__(self, fs: pafs.FileSystem, out_path: str, prefix: str, max_photos: int = FILE_PHOTOS,
                 max_seconds: float = FILE_SECONDS, compression: str = "zstd") -> None:
        self.fs, self.out_path, self.prefix = fs, out_path.rstrip("/"), prefix
        self.max_photos, self.max_seconds, self.compression = max_photos, max_seconds, compression
        self._buffer: list[pa.Table] = []
        self._photos = 0
        self._since: float | None = None
        self.files: list[str] = []
        self.rows = 0
        self.photos = 0

    def add(self, block: pa.Table) -> None:
        """One block of rows (every row of a photo arrives in the same block)."""
        if block.num_rows == 0:
            return
        if self._since is None:
            self._since = time.monotonic()
        self._buffer.append(block)
        self._photos += pc.count_distinct(block.column("image_uri")).as_py()
        if self._photos >= self.max_photos or time.monotonic() - self._since >= self.max_seconds:
            self.commit()

    @property
    def pending_photos(self) -> int:
        return self._photos

    def commit(self) -> str | None:
        """Write the buffered rows as one complete file; its path, or None when empty."""
        if not self._buffer:
            return None
        with stopping.deferred():  # a stop waits for the file and for this record of it
            t = pa.concat_tables(self._buffer, promote_options="default")
            path = f"{self.out_path}/{self.prefix}-{len(self.files):05d}.parquet"
            storage.put_parquet(self.fs, path, t, self.compression)
            self.files.append(path)
            self.rows += t.num_rows
            self.photos += self._photos
            self._buffer, self._photos, self._since = [], 0, None
        return path
