"""Give back the object-store pages a long-lived Ray worker has touched.

Why: Ray's store is one shared file (``/dev/shm/plasma…``, or its fallback file) mapped
into every worker.  A worker that reads its task's inputs zero-copy keeps those pages in
its page tables after the task ends, so its RSS grows with every object it ever read: at
3·10^6 faces a search worker held 2.8–3.0 GiB of such pages (benchmarks/README.md).
``madvise(MADV_DONTNEED)`` over a *shared* file mapping only drops this process's page
table entries: the data stays in the file, and a later read faults it back in.  So a
heavy task that releases them at its end leaves its worker holding its own memory only.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Callable, TypeVar

MADV_DONTNEED = 4          # linux/mman.h; the same value on every Linux architecture
STORE_MARK = "plasma"      # Ray names its store file (and the fallback-allocation files) so
KEEP_ENV = "FACERAY_KEEP_STORE_PAGES"   # "1": release nothing (benchmarks/people.py --keep-store-pages)

F = TypeVar("F", bound=Callable)


def store_mappings(maps_text: str) -> list[tuple[int, int]]:
    """(start, length) of each shared mapping of Ray's store in a ``/proc/<pid>/maps`` text."""
    spans = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("s") and STORE_MARK in fields[5]:
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            spans.append((lo, hi - lo))
    return spans


@functools.cache
def _madvise() -> Callable:
    """libc's madvise, looked up once per process (every task calls it)."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def release_store_pages() -> int:
    """Drop this process's mapped pages of Ray's store; the bytes of the mappings released
    (0 off Linux, or where there is none).  Safe at any time: no data is lost."""
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_ENV) == "1":
        return 0
    try:
        with open("/proc/self/maps") as f:
            spans = store_mappings(f.read())
    except OSError:
        return 0
    done = 0
    for start, length in spans:
        if _madvise()(start, length, MADV_DONTNEED) == 0:
            done += length
    return done


def releasing(fn: F) -> F:
    """``fn`` that releases the store pages when it returns or raises (for Ray tasks that
    read large objects: the index groups, the searches, clustering batches)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_store_pages()
    return run  # type: ignore[return-value]
