"""Converted model files kept once per machine, so an actor's start-up skips parsing.

The attribute networks come as ONNX (age, gender) and Keras HDF5 (emotion) files, and
YuNet needs its ONNX graph rewritten for free input sizes: reading them means importing
``onnx`` and ``h5py`` (about 0.6 + 0.15 s of CPU per process here, half of ``import
torch``) in every actor.  The converted result (torch state dicts, the rewritten graph's
bytes) is written once under ``Settings.cache_dir`` and read back with ``torch.load`` /
a plain read.  The key is each source file's resolved path, size and mtime, plus
``VERSION`` (bump it when a conversion changes), so a changed file is converted again.
Writes are atomic (a temporary name renamed into place): actors starting together on one
node may both convert, never read half a file.  Without a cache dir, or when it cannot
be written, the conversion simply runs every time.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

VERSION = "1"


def key(*paths: str | os.PathLike) -> str:
    h = hashlib.sha256(VERSION.encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.realpath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def cached_bytes(cache_dir: str | os.PathLike | None, name: str, make: Callable[[], bytes]) -> bytes:
    """``make()``'s bytes, kept as ``cache_dir/name`` (``name`` carries the key)."""
    if not cache_dir:
        return make()
    path = Path(cache_dir) / name
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = make()
    _write(path, data)
    return data


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: convert every time
