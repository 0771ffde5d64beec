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

from pipeline.store_pages import releasing

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
    """The index serialised into an array of exactly its size.  Why not
    ``faiss.serialize_index``: it grows a std::vector by doubling and then copies it, so a
    10^6-face group's 0.49 GiB index peaked at +1.68 GiB over its inputs, against +1.17 GiB
    here (the index written twice: once to count its bytes, once into the array)."""
    size = 0

    def count(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    out, pos = np.empty(size, np.uint8), 0

    def put(chunk: bytes) -> None:
        nonlocal pos
        out[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(put))
    return out


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
        shard_task = ray.remote(num_cpus=1)(releasing(_shard_index))
        search_task = ray.remote(num_cpus=1, num_returns=2)(releasing(_search))
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


# ---------------------------------------------------------------- kNN over shards held as Ray refs
SHARD_DB_ROWS = 1_000_000    # faces per database index task: bounds every search task's memory


def _masked_count(mask: np.ndarray) -> int:
    return int(mask.sum())


def _sample(x: np.ndarray, mask: np.ndarray, m: int, seed: int) -> np.ndarray:
    rows = np.flatnonzero(mask)
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(x[np.sort(rng.choice(rows, size=min(m, len(rows)), replace=False))], np.float32)


def _train(nlist: int, *samples: np.ndarray) -> np.ndarray:
    faiss.omp_set_num_threads(1)
    d = samples[0].shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.concatenate(samples))
    index.nprobe = default_nprobe(nlist)
    return to_bytes(index)


def _group_index(trained: np.ndarray, los: list[int], *parts: np.ndarray) -> np.ndarray:
    """Serialised index of the masked rows of some shards (ids: global row numbers)."""
    faiss.omp_set_num_threads(1)
    index = from_bytes(trained)
    if isinstance(index, faiss.IndexFlat):
        index = faiss.IndexIDMap(index)
    for lo, x, mask in zip(los, parts[0::2], parts[1::2]):
        rows = np.flatnonzero(mask)
        index.add_with_ids(np.ascontiguousarray(x[rows], np.float32), lo + rows.astype(np.int64))
    return to_bytes(index)


def _assign(trained: np.ndarray, x: np.ndarray, mask: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The masked rows' ``nprobe`` nearest IVF lists (similarities, list numbers), once per
    query shard: every index group shares the trained centroids, so each group's search
    takes them as they are rather than assigning every query to every list again (that
    assignment was most of the kNN's cost once a table spans several groups)."""
    faiss.omp_set_num_threads(1)
    index = from_bytes(trained)                  # held: the lists' quantizer lives in it
    return faiss.extract_index_ivf(index).quantizer.search(np.ascontiguousarray(x[mask], np.float32), nprobe)


def _search_masked(index_bytes: np.ndarray, x: np.ndarray, mask: np.ndarray, k: int,
                   nprobe: int | None, lists_s: np.ndarray | None = None,
                   lists_i: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the masked rows against one index group; with their IVF lists already
    assigned (``_assign``), only those lists are scanned."""
    if lists_i is None:
        return _search(index_bytes, np.ascontiguousarray(x[mask]), 0, int(mask.sum()), k, nprobe)
    faiss.omp_set_num_threads(1)
    index = from_bytes(index_bytes)
    ivf = faiss.extract_index_ivf(index)         # a view into ``index``, which must outlive it
    ivf.nprobe = lists_i.shape[1]
    return ivf.search_preassigned(np.ascontiguousarray(x[mask], np.float32), k, lists_i, lists_s)


def _finish(finish: Callable, k: int, lo: int, mask: np.ndarray, *got: np.ndarray):
    s, i = merge_topk(list(got[0::2]), list(got[1::2]), k)
    return finish(s, i, lo + np.flatnonzero(mask).astype(np.int64))


def topk_refs(xs: list, masks: list, bounds: np.ndarray, k: int, finish: Callable,
              exact_max: int = EXACT_MAX, db_rows: int = SHARD_DB_ROWS,
              nprobe: int | None = None, preassign: bool = True) -> tuple[list, str]:
    """Per shard, a Ray ref to ``finish(sims, ids, rows)`` of its masked rows' top-k among
    every shard's masked rows (ids are global row numbers: shard i starts at bounds[i]).

    The embeddings stay in the object store as the read tasks left them: an index task per
    group of shards (≤ ``db_rows`` faces), for IVF an assignment task per shard (its rows'
    lists, once), a search task per (shard × index), a merge task per shard that runs
    ``finish`` (the edge rule) — the N×k lists never meet in one place."""
    import ray

    def remote(fn, returns=1):
        return ray.remote(num_cpus=1, max_retries=3, num_returns=returns)(releasing(fn))

    counts = np.asarray(ray.get([remote(_masked_count).remote(m) for m in masks]), np.int64)
    n = int(counts.sum())
    k = max(1, min(k, n))
    d = 128
    assign = None
    if n <= exact_max:
        trained, kind = ray.put(to_bytes(faiss.IndexFlatIP(d))), "flat (exact)"
    else:
        nlist = ivf_lists(n)
        nprobe = nprobe or default_nprobe(nlist)
        want = nlist * TRAIN_PER_LIST
        samples = [remote(_sample).remote(x, m, int(np.ceil(want * c / n)), i)
                   for i, (x, m, c) in enumerate(zip(xs, masks, counts)) if c]
        trained = remote(_train).remote(nlist, *samples)
        kind = f"IVF{nlist},Flat nprobe {nprobe}"
        assign = remote(_assign, 2) if preassign else None   # False: each group assigns again (benchmarks)
    groups, cur, size = [], [], 0
    for i, c in enumerate(counts):
        if cur and size + c > db_rows:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += int(c)
    groups.append(cur)
    group_task, search, merge = remote(_group_index), remote(_search_masked, 2), remote(_finish)
    indexes = []
    for g in groups:
        parts = [r for i in g for r in (xs[i], masks[i])]
        indexes.append(group_task.remote(trained, [int(bounds[i]) for i in g], *parts))
    out = []
    for i, (x, m) in enumerate(zip(xs, masks)):
        lists = assign.remote(trained, x, m, nprobe) if assign is not None else (None, None)
        got = [r for ix in indexes for r in search.remote(ix, x, m, k, nprobe, *lists)]
        out.append(merge.remote(finish, k, int(bounds[i]), m, *got))
    note = (f"{n} faces, k={k}, index {kind}, {len(groups)} index task(s) × {len(xs)} query shard(s) "
            f"as Ray tasks")
    return out, note
