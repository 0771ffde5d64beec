"""A Ray worker gives back the object-store pages it read, and loses no data doing so."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.store_pages import release_store_pages, releasing, store_mappings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")

MIB = 2**20


def _task_fn():
    """The worker-side check, built here so Ray pickles it by value (tests/ is no package
    the workers can import)."""
    def _rss() -> int:
        """This process's resident pages (bytes; the store's count whether Ray put it in
        /dev/shm or, where that is small, a file under /tmp)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/self/status")

    def _read_release_read(x: np.ndarray) -> tuple[float, int, int, float, int]:
        """In a worker: sum the store-backed array, release, sum it again."""
        first = float(x.sum(dtype=np.float64))
        before = _rss()
        released = release_store_pages()
        after = _rss()
        return first, before, after, float(x.sum(dtype=np.float64)), released

    return _read_release_read


def test_store_mappings_picks_only_shared_store_files():
    maps = "\n".join([
        "7f0000000000-7f0040000000 rw-s 00000000 00:1a 123   /dev/shm/plasmaXyZ (deleted)",
        "7f0040000000-7f0040100000 rw-p 00000000 00:00 0     [heap]",
        "7f0050000000-7f0050001000 r--s 00000000 00:1a 124   /dev/shm/other",
        "7f0060000000-7f0060002000 rw-p 00000000 00:1a 125   /tmp/plasma-private",
    ])
    assert store_mappings(maps) == [(0x7F0000000000, 0x40000000)]


def test_worker_gives_back_store_pages_and_keeps_the_data(ray_cluster):
    import ray

    x = np.random.default_rng(0).random(8 * MIB)       # 64 MiB of float64, in the store
    ref = ray.put(x)
    first, before, after, again, released = ray.get(ray.remote(num_cpus=1)(_task_fn()).remote(ref))
    assert released > 0, "the worker found no mapping of Ray's store"
    assert first == again == pytest.approx(float(x.sum()))
    assert before - after >= 48 * MIB, (before, after)


def test_releasing_keeps_the_task_name_and_result(ray_cluster):
    import ray

    task = ray.remote(num_cpus=1)(releasing(_task_fn()))
    assert task._function.__name__ == "_read_release_read"
    x = np.arange(1_000_000, dtype=np.float64)
    assert ray.get(task.remote(ray.put(x)))[0] == float(x.sum())
