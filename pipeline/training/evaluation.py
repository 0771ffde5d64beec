"""Test metrics of a bundle (closed set and with its open-set rule) and how it labels
faces of people it was not trained on."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow.compute as pc

from pipeline import storage, table
from pipeline.contract import CLASSIFICATION, UNKNOWN
from pipeline.heads import ModelBundle, TaskSpec, cosine_distance
from pipeline.settings import Settings
from pipeline.training.embeddings import embed_labelled
from pipeline.training.outcome import ClassificationResult, RegressionResult, StrangerResult
from pipeline.training.split import Encoded


def evaluate(bundle: ModelBundle, part: Encoded) -> tuple[dict, dict[str, ClassificationResult | RegressionResult]]:
    """Metrics per task and the per-face results behind them."""
    preds = bundle.predict(part.head_x(), np.arange(len(part.x)), part.features)
    raw = bundle.raw(part.head_x(), part.features)
    metrics: dict[str, dict] = {}
    results: dict[str, ClassificationResult | RegressionResult] = {}
    for s in bundle.specs:
        y = part.y[s.name]
        if s.kind == CLASSIFICATION:
            m = y >= 0
            closed = raw[s.name].argmax(1)
            labels, scores = preds[s.name]
            true = np.asarray(s.labels, dtype=object)[y[m]]
            nan = float("nan")
            metrics[s.name] = {"faces": int(m.sum()),
                               "accuracy": float((closed[m] == y[m]).mean()) if m.any() else nan,
                               "open_set_accuracy": float((labels[m] == true).mean()) if m.any() else nan,
                               "known_rejected": float((labels[m] == UNKNOWN).mean()) if m.any() else 0.0}
            dist, impostor = open_set_distances(bundle, s, raw[s.name][m], part.x[m], y[m])
            results[s.name] = ClassificationResult(y[m], closed[m], raw[s.name][m], labels[m], scores[m],
                                                   [u for u, k in zip(part.uris, m) if k],
                                                   part.faces[m] if part.faces is not None else None,
                                                   dist, impostor)
        else:
            m = np.isfinite(y)
            v = preds[s.name][0][m]
            metrics[s.name] = {"faces": int(m.sum()),
                               "mae": float(np.abs(v - y[m]).mean()) if m.any() else float("nan"),
                               "baseline_mae": float(np.abs(s.mean - y[m]).mean()) if m.any() else float("nan")}
            results[s.name] = RegressionResult(y[m], v, [u for u, k in zip(part.uris, m) if k])
    return metrics, results


def stranger_metrics(bundle: ModelBundle, uri: str, settings: Settings, cache_uri: str | None,
                     flip_tta: bool, log: Callable[[str], None]) -> tuple[dict, dict[str, StrangerResult]]:
    """Share of faces of people outside the training set that come out ``unknown``."""
    tuned = bundle.tuned_backbone is not None or bool(bundle.tuned_networks)  # it runs its own networks on the chips
    emb, _ = embed_labelled(storage.list_images(uri), uri, settings, cache_uri, flip_tta, log,
                            tuple(bundle.feature_sets), chips=tuned)
    ok = emb.filter(pc.is_valid(emb.column("main_face")))
    x = table.embedding_matrix(ok.column("embedding"))
    if tuned:
        from pipeline.geometry import DLIB_CHIP

        x = bundle.head_embeddings(table.chip_matrix(ok.column("chip"), DLIB_CHIP.size), x, settings.precision)
    feats = feature_columns(ok, bundle.feature_sets)
    preds = bundle.predict(x, np.arange(len(x)), feats)
    raw = bundle.raw(x, feats)
    out, results = {}, {}
    for s in bundle.specs:
        if s.kind == CLASSIFICATION and s.open_set:
            labels, scores = preds[s.name]
            out[s.name] = {"faces": len(x), "rejected": float((labels == UNKNOWN).mean()) if len(x) else 0.0}
            dist, _ = open_set_distances(bundle, s, raw[s.name], x)
            results[s.name] = StrangerResult(labels, scores, ok.column("image_uri").to_pylist(), dist=dist)
    return out, results


def open_set_distances(bundle: ModelBundle, spec: TaskSpec, probs: np.ndarray, x: np.ndarray,
                       y: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The one number per face the open-set rule thresholds (so the report can draw the
    rule as a line on a histogram and sweep it for a ROC curve): the nearest centroid among
    labels with probability >= ``min_prob`` (inf when none), accepted iff <= ``max_dist``.
    With true labels, also each face's distance to the nearest centroid of another class,
    what the face would look like had its person not been trained (the stand-in stranger
    of ``calibrate_open_set``).  (None, None) for closed-set tasks."""
    centroids = bundle._centroids.get(spec.name) if spec.open_set else None  # noqa: SLF001 (read-only)
    if centroids is None:
        return None, None
    d = cosine_distance(x, centroids)
    dist = np.where(probs >= spec.min_prob, d, np.inf).min(axis=1) if d.shape[1] else np.full(len(x), np.inf)
    impostor = None
    if y is not None and d.shape[1] > 1:
        other = d.copy()
        other[np.arange(len(y)), y] = np.inf
        impostor = other.min(axis=1)
    return dist.astype(np.float32), (impostor.astype(np.float32) if impostor is not None else None)


def feature_columns(rows, names) -> dict[str, np.ndarray]:
    """The ``features_<name>`` columns of embedding-pass rows (no nulls) as matrices."""
    from pipeline.heads import feature_dim

    return {n: table.embedding_matrix(rows.column(f"features_{n}"), feature_dim(n)) for n in names}


def _rejected(bundle: ModelBundle, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per open-set task, which faces the bundle answers ``unknown`` (each face on its own)."""
    preds = bundle.predict(x, np.arange(len(x)))
    return {s.name: preds[s.name][0] == UNKNOWN for s in bundle.specs if s.kind == CLASSIFICATION and s.open_set}


def open_set_rates(bundle: ModelBundle, val: Encoded, test: Encoded, strangers: Encoded,
                   stranger_people: int, stranger_faces: int,
                   target_frr: float) -> tuple[dict, dict[str, StrangerResult]]:
    """Known faces and strangers rejected, on validation (where the thresholds were picked)
    and on the held-out test part (known test faces, strangers of other people), measured
    with the bundle's own rule; and the test strangers' labels for the report."""
    s_val, s_test = strangers.part("val"), strangers.part("test")
    rejected = {name: _rejected(bundle, p.x) for name, p in
                (("val_known", val), ("test_known", test), ("val_strangers", s_val), ("test_strangers", s_test))}
    preds = bundle.predict(s_test.x, np.arange(len(s_test.x)))
    raw = bundle.raw(s_test.x)
    specs = {s.name: s for s in bundle.specs}
    out, results = {}, {}
    for task in rejected["val_known"]:
        def rate(key: str, part: Encoded) -> float | None:
            m = part.y[task] >= 0 if key.endswith("known") else np.ones(len(part.x), bool)
            return float(rejected[key][task][m].mean()) if m.any() else None

        out[task] = {"people": stranger_people, "faces": stranger_faces,
                     "used": {"val": len(s_val.x), "test": len(s_test.x)},
                     "target_known_rejected": target_frr, "target_strangers_rejected": 0.95,
                     "val": {"known_rejected": rate("val_known", val), "strangers_rejected": rate("val_strangers", s_val)},
                     "test": {"known_rejected": rate("test_known", test),
                              "strangers_rejected": rate("test_strangers", s_test)}}
        labels, scores = preds[task]
        dist, _ = open_set_distances(bundle, specs[task], raw[task], s_test.x)
        results[task] = StrangerResult(labels, scores, s_test.uris, s_test.faces, dist)
    return out, results
