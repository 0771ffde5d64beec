"""The report's numbers: per-class figures, confusion counts, intervals (Wilson for
accuracies and shares, a seeded bootstrap for MAE: test sets are 20-300 faces), the
baselines a model must beat, the open-set ROC sweep."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.heads import TaskSpec

Z95 = 1.959964


def per_class_prf(true: np.ndarray, pred: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined)."""
    cm = confusion(true, pred, n)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def confusion(true: np.ndarray, pred: np.ndarray, n: int, n_cols: int | None = None) -> np.ndarray:
    """Counts of (true, predicted) index pairs; ``n_cols`` > n for an extra ``unknown`` column."""
    cm = np.zeros((n, n_cols or n), np.int64)
    np.add.at(cm, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n: unlike the normal approximation it stays
    inside [0, 1] and is honest at 0 or n successes, which small test sets hit often."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_mae(true: np.ndarray, pred: np.ndarray, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the MAE (seeded: the same report for the same model);
    absolute errors are skewed, so no normal approximation."""
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(true, np.float64))
    if len(err) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = err[rng.integers(0, len(err), size=(n_boot, len(err)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def classification_baselines(n_classes: int, train_y: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """What a model that ignores the face would score on the test faces: uniform guessing
    and always answering the most frequent training class."""
    counts = np.bincount(train_y[train_y >= 0], minlength=n_classes)
    major = int(counts.argmax()) if counts.sum() else 0
    k = int((np.asarray(true) == major).sum())
    return {"chance": 1.0 / max(n_classes, 1), "majority_class": major, "majority": k / len(true) if len(true) else
            float("nan"), "majority_ci": wilson(k, len(true))}


def regression_baseline(spec: "TaskSpec", true: np.ndarray) -> dict[str, float]:
    """MAE of predicting the training mean for every face (the floor a head must beat)."""
    mae = float(np.abs(spec.mean - np.asarray(true, np.float64)).mean()) if len(true) else float("nan")
    return {"mean": float(spec.mean), "mae": mae}


def finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def roc_points(known: np.ndarray, strangers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(strangers accepted, known accepted) as the distance threshold sweeps every value:
    the trade-off the open-set ``max_dist`` picks one point of.  Infinite distances (no
    class probable enough) are rejected at every threshold; the last point accepts all."""
    finite = np.concatenate([known[np.isfinite(known)], strangers[np.isfinite(strangers)]])
    ts = np.concatenate([[-np.inf], np.unique(finite), [np.inf]])
    kn = np.sort(known)
    st = np.sort(strangers)
    tar = np.searchsorted(kn, ts, side="right") / max(len(kn), 1)
    far = np.searchsorted(st, ts, side="right") / max(len(st), 1)
    # inf distances are never accepted, even at an infinite threshold
    tar = np.minimum(tar, np.isfinite(kn).mean() if len(kn) else 0)
    far = np.minimum(far, np.isfinite(st).mean() if len(st) else 0)
    # then accepting everyone: faces no class was likely enough for rank last
    return np.append(far, 1.0), np.append(tar, 1.0)
