"""The edge rule: which kNN pairs become edges of the people graph.

The threshold comes from this backbone's own verification statistics, never from the
archive (see the package docstring)."""
from __future__ import annotations

import math

import numpy as np

SAME_COS = (0.9492, 0.0201)    # mean, std of same-person cosine, LFW pairs/ (600), this backbone
DIFF_COS = (0.8330, 0.0371)    # different people (600 pairs)
EDGE_ODDS = 100.0              # an edge needs "same" 100× likelier than "different"
K = 30                         # neighbours per face in the graph


def log_likelihood_ratio(cos: np.ndarray | float) -> np.ndarray:
    """log p(cos | same person) / p(cos | different), Gaussian fits of the measured pairs."""
    (ms, ss), (md, sd) = SAME_COS, DIFF_COS
    c = np.asarray(cos, np.float64)
    return (-0.5 * ((c - ms) / ss) ** 2 - math.log(ss)) - (-0.5 * ((c - md) / sd) ** 2 - math.log(sd))


def odds_threshold(odds: float = EDGE_ODDS) -> float:
    """The cosine (between the two means) where same/different likelihoods reach ``odds``."""
    lo, hi = DIFF_COS[0], SAME_COS[0]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_likelihood_ratio(mid) < math.log(odds) else (lo, mid)
    return round((lo + hi) / 2, 3)


THRESHOLD = odds_threshold()   # 0.939


def graph_edges(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (a < b, cosine) of a kNN graph at cosine ≥ threshold, each once."""
    n, k = ids.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols, s = ids.ravel(), sims.ravel()
    keep = (s >= threshold) & (cols >= 0) & (cols != rows)
    a, b, s = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep]), s[keep]
    _, first = np.unique(a * n + b, return_index=True)
    return a[first], b[first], s[first].astype(np.float32)


RULES = ("fixed", "adaptive", "mutual")
GAP = 0.015                    # "adaptive": the drop in a ranked neighbour list that cuts it


def shard_edges(sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, threshold: float,
                rule: str = "fixed") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The edges (a < b, cosine, ends) one kNN query shard keeps: row ``rows[j]``'s ranked
    neighbour list is ``ids[j]`` (global row numbers).  What a kNN task returns instead of
    its N×k lists.  ``ends`` counts the lists (1 or 2) that hold the pair, so that whoever
    gathers a pair from every shard can tell a mutual neighbour pair.  Rules:

    - ``fixed``: cos ≥ threshold (the 100:1 odds of the LFW pairs);
    - ``adaptive`` (FaceMap-style, per face): of the neighbours at cos ≥ threshold, keep those
      ranked before the largest drop of the ranked list when that drop is at least ``GAP``
      (the end of a face's own person), else all;
    - ``mutual``: fixed, and each end is in the other's list (``mutual_only`` when gathered).
    """
    if rule not in RULES:
        raise ValueError(f"unknown edge rule {rule!r} (one of {', '.join(RULES)})")
    n, k = ids.shape
    ok = (sims >= threshold) & (ids >= 0) & (ids != rows[:, None])
    if rule == "adaptive" and k > 1:
        s = np.where(ok, sims, threshold)                      # ranked: below-threshold tail flat
        drop = np.r_["1", s[:, :-1] - s[:, 1:], (s[:, -1:] - threshold)]
        drop = np.where(ok, drop, -1.0)
        cut = drop.argmax(1)
        cut = np.where(drop[np.arange(n), cut] >= GAP, cut, k - 1)
        ok &= np.arange(k)[None, :] <= cut[:, None]
    r = np.broadcast_to(rows.astype(np.int64)[:, None], ids.shape)[ok]
    c, w = ids[ok].astype(np.int64), sims[ok]
    a, b = np.minimum(r, c), np.maximum(r, c)
    key, first, ends = np.unique(a << 32 | b, return_index=True, return_counts=True)
    return a[first], b[first], w[first].astype(np.float32), ends.astype(np.int8)


def gathered(pieces: list[tuple], rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch's edges from every shard's pieces, each pair once (``mutual``: only pairs
    that both ends' lists hold)."""
    a = np.concatenate([p[0] for p in pieces])
    b = np.concatenate([p[1] for p in pieces])
    w = np.concatenate([p[2] for p in pieces])
    ends = np.concatenate([p[3] for p in pieces]).astype(np.int64)
    key, inv = np.unique(a << 32 | b, return_inverse=True)
    first = np.zeros(len(key), np.int64)
    first[inv[::-1]] = np.arange(len(a))[::-1]
    total = np.bincount(inv, weights=ends, minlength=len(key))
    keep = total >= 2 if rule == "mutual" else np.ones(len(key), bool)
    sel = first[keep]
    return a[sel], b[sel], w[sel]


def split_big(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, cap: int, threshold: float,
              step: float = 0.005) -> np.ndarray:
    """Edges to keep so that no component has more than ``cap`` nodes: inside a component
    over the cap the threshold rises by ``step`` until every piece fits (look-alikes
    chained into one giant component come apart first, the weakest links going first).
    Bounds what one Infomap run holds."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keep = np.ones(len(a), bool)
    th = threshold
    while th <= 1.0:
        g = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
        comp = connected_components(g, directed=False)[1]
        big = np.bincount(comp) > cap
        if not big.any():
            break
        th += step
        keep &= ~(big[comp[a]] & (w < th))
    return keep
