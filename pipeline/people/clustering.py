"""kNN graph → edges → components → Infomap inside each component (Ray tasks)."""
from __future__ import annotations

import random
import time
from typing import Callable

import numpy as np

from pipeline.knn import knn_graph
from pipeline.people.graph import K, THRESHOLD, gathered, shard_edges

BATCH_NODES = 200_000          # graph nodes per clustering task


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def _infomap(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Infomap communities of one batch of whole components (local node numbers)."""
    import igraph as ig

    random.seed(0)  # python-igraph draws from Python's random: same input, same people
    g = ig.Graph(n=n, edges=np.stack([a, b], 1).tolist())
    return np.asarray(g.community_infomap(edge_weights=list(map(float, w))).membership, np.int64)


def cluster_graph(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray,
                  batch_nodes: int = BATCH_NODES) -> np.ndarray:
    """Labels 0..P-1 of n nodes: components, then Infomap inside those of 3+ faces.

    Components of 1–2 faces are people as they are; bigger ones go, whole, in batches of
    about ``batch_nodes`` nodes, to Ray tasks (or run here without Ray)."""
    comp = components(n, a, b)
    sizes = np.bincount(comp)
    labels = comp.copy()
    big = np.flatnonzero(sizes >= 3)
    if len(big):
        batch_of = np.full(len(sizes), -1, np.int64)
        # a component bigger than a batch makes the raw numbers skip one: number them densely
        batch_of[big] = np.unique((np.cumsum(sizes[big]) - sizes[big]) // batch_nodes, return_inverse=True)[1]
        node_batch, edge_batch = batch_of[comp], batch_of[comp[a]]
        n_batches = int(batch_of.max()) + 1
        node_order = np.argsort(node_batch, kind="stable")
        node_parts = np.split(node_order, np.searchsorted(node_batch[node_order], np.arange(n_batches + 1)))[1:-1]
        edge_order = np.argsort(edge_batch, kind="stable")
        edge_parts = np.split(edge_order, np.searchsorted(edge_batch[edge_order], np.arange(n_batches + 1)))[1:-1]
        local = np.empty(n, np.int64)
        jobs = []
        for part, e in zip(node_parts, edge_parts):
            local[part] = np.arange(len(part))
            jobs.append((len(part), local[a[e]], local[b[e]], w[e]))
        offset = len(sizes)
        for part, memb in zip(node_parts, _run_batches(jobs)):
            labels[part] = offset + memb
            offset += int(memb.max()) + 1
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def _run_batches(jobs: list[tuple]) -> list[np.ndarray]:
    try:
        import ray
        if ray.is_initialized() and len(jobs) > 0:
            task = ray.remote(num_cpus=1)(_infomap)
            return ray.get([task.remote(*j) for j in jobs])
    except ImportError:
        pass
    return [_infomap(*j) for j in jobs]


def cluster(x: np.ndarray, threshold: float = THRESHOLD, k: int = K,
            log: Callable[[str], None] | None = None, rule: str = "fixed", **knn_kwargs) -> np.ndarray:
    """Person labels 0..P-1 for unit embeddings ``x`` (kNN graph → edges → Infomap), all in
    this process (and its Ray tasks): the reference the task pipeline (``spread``) is
    tested against, and what the benchmark's rule comparisons run."""
    if len(x) == 1:
        return np.zeros(1, np.int64)
    sims, ids, _ = knn_graph(x, k + 1, log=log, **knn_kwargs)
    t0 = time.monotonic()
    a, b, w = gathered([shard_edges(sims, ids, np.arange(len(x)), threshold, rule)], rule)
    del sims, ids
    labels = cluster_graph(len(x), a, b, w)
    if log:
        log(f"[clustering] {len(x)} faces, {len(a)} edges at cos ≥ {threshold}: "
            f"{labels.max() + 1} people in {time.monotonic() - t0:.1f} s")
    return labels


def centres(x: np.ndarray, labels: np.ndarray, n_people: int | None = None) -> np.ndarray:
    """Normalised mean embedding per label (P×128), by a sparse sum, not a loop."""
    from scipy.sparse import csr_matrix

    p = int(labels.max()) + 1 if n_people is None else n_people
    m = csr_matrix((np.ones(len(labels), np.float32), (labels, np.arange(len(labels)))), shape=(p, len(labels)))
    c = np.asarray(m @ x, np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
