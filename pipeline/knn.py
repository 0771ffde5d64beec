"""Approximate k-nearest-neighbour search over face embeddings with faiss, sharded on Ray.

Why sharded this way: a query's top-k against the whole collection is the merge of its
top-k against each database shard, so the work is a grid of (query shard × database
shard) tasks whose results merge exactly.  One node holds one database shard's index;
10^8 faces is then a matter of nodes (numbers in benchmarks/README.md, "people").
Below ``EXACT_MAX`` faces a flat (exact) inner-product index is used; above it an
IVF index whose coarse centroids are trained once on a sample, shared by every shard.
Embeddings are unit vectors, so inner product = cosine similarity.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

EXACT_MAX = 200_000          # flat search below this many faces (exact, and fast enough)
TRAIN_PER_LIST = 40          # IVF training sample: this many vectors per inverted list
QUERY_ROWS = 100_000         # query rows per search task
DB_ROWS = 20_000_000         # database rows per shard index (~10 GB flat, ~1.5 GB IVF-PQ)


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: ~4·sqrt(n), faiss's usual rule, a power of two."""
    return int(2 ** np.clip(np.round(np.log2(4 * np.sqrt(max(n, 1)))), 6, 16))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: 1/64 of them (≥ 16) — recall@10 ≥ 0.98 on face data (benchmark)."""
    return int(max(16, nlist // 64))


def empty_index(x: np.ndarray, exact_max: int = EXACT_MAX, seed: int = 0) -> faiss.Index:
    """An empty index for vectors like ``x``: flat when small, else IVF trained
    on a random sample of ``x`` (the same trained centroids go to every shard)."""
    n, d = x.shape
    if n <= exact_max:
        return faiss.IndexFlatIP(d)
    nlist = ivf_lists(n)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=min(n, nlist * TRAIN_PER_LIST), replace=False))]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, np.float32))
    index.nprobe = default_nprobe(nlist)
    return index


def build_index(x: np.ndarray, exact_max: int = EXACT_MAX) -> faiss.Index:
    """A searchable index of all of ``x`` (row i has id i) in this process."""
    index = empty_index(x, exact_max)
    index.add(np.ascontiguousarray(x, np.float32))
    return index


def to_bytes(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def from_bytes(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(data))


def merge_topk(sims: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of several (sims, ids) candidate lists (missing ids are -1)."""
    s = np.concatenate(sims, axis=1)
    i = np.concatenate(ids, axis=1)
    s = np.where(i < 0, -np.inf, s)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return np.where(np.isfinite(s), s, -1.0).astype(np.float32), i


def _shard_index(trained: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Serialised index of database rows lo..hi (ids are global row numbers)."""
    faiss.omp_set_num_threads(1)
    index = from_bytes(trained)
    ids = np.arange(lo, hi, dtype=np.int64)
    if isinstance(index, faiss.IndexFlat):
        index = faiss.IndexIDMap(index)
    index.add_with_ids(np.ascontiguousarray(x[lo:hi]), ids)
    return to_bytes(index)


def _search(index_bytes: np.ndarray, x: np.ndarray, lo: int, hi: int, k: int,
            nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of query rows lo..hi against one shard index."""
    faiss.omp_set_num_threads(1)
    index = from_bytes(index_bytes)
    if _is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = nprobe or default_nprobe(ivf.nlist)
    s, i = index.search(np.ascontiguousarray(x[lo:hi]), k)
    return s, i


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def shards(n: int, rows: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + rows)) for lo in range(0, n, rows)] or [(0, 0)]


@dataclass
class KnnStats:
    index: str
    shards: int
    tasks: int
    seconds: float


def knn_graph(x: np.ndarray, k: int, exact_max: int = EXACT_MAX, query_rows: int = QUERY_ROWS,
              db_rows: int = DB_ROWS, nprobe: int | None = None,
              log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray, KnnStats]:
    """(sims N×k float32, ids N×k int64, stats): each row's k nearest rows, itself included.

    Runs as Ray tasks (1 CPU, 1 faiss thread each) when Ray is initialised, else in
    process.  Missing neighbours (k > N, or an IVF probe that found too few) are id -1.
    """
    t0 = time.monotonic()
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    k = max(1, min(k, n))
    trained = to_bytes(empty_index(x, exact_max))
    db, qs = shards(n, db_rows), shards(n, query_rows)
    try:
        import ray
        use_ray = ray.is_initialized()
    except ImportError:
        use_ray = False
    if use_ray:
        shard_task = ray.remote(num_cpus=1)(_shard_index)
        search_task = ray.remote(num_cpus=1, num_returns=2)(_search)
        x_ref, trained_ref = ray.put(x), ray.put(trained)
        indexes = [shard_task.remote(trained_ref, x_ref, lo, hi) for lo, hi in db]
        refs = [[search_task.remote(ix, x_ref, lo, hi, k, nprobe) for ix in indexes] for lo, hi in qs]
        parts = []
        for row in refs:  # merge one query shard at a time: the driver holds N×k, not N×k×shards
            got = ray.get([r for pair in row for r in pair])
            parts.append(merge_topk(got[0::2], got[1::2], k))
        del x_ref
    else:
        indexes = [_shard_index(trained, x, lo, hi) for lo, hi in db]
        parts = []
        for lo, hi in qs:
            got = [_search(ix, x, lo, hi, k, nprobe) for ix in indexes]
            parts.append(merge_topk([g[0] for g in got], [g[1] for g in got], k))
    sims = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, k), np.float32)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, k), np.int64)
    kind = "flat (exact)" if n <= exact_max else f"IVF{ivf_lists(n)},Flat nprobe {nprobe or default_nprobe(ivf_lists(n))}"
    stats = KnnStats(kind, len(db), len(db) * len(qs) + len(db), time.monotonic() - t0)
    if log:
        log(f"[kNN] {n} faces, k={k}, index {kind}, {len(db)} database shard(s) × {len(qs)} query "
            f"shard(s) on {'Ray' if use_ray else 'this process'}: {stats.seconds:.1f} s")
    return sims, ids, stats
