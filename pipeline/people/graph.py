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
