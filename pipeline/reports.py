"""Training metrics and the bundle's ``report.html`` (one self-contained page, PNG plots
embedded as base64 so the report can be copied or served from S3 as one object).

Per classification task: confusion matrix, per-class precision/recall/F1, class
distribution true vs predicted, open-set rejection, and the most confident mistakes as
face thumbnails.  Per regression task: predicted vs true and the error histogram.  The
thumbnails are the chips of the few faces concerned, cut again from their photos by the
shared CPU stage (``pipeline.photos.analyse_photo``), so the report needs no stored chips:
the photo's main face, or the face the result names by index (people layout, where an
example is any face of a photo).
"""
from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline import storage
from pipeline.contract import CLASSIFICATION, UNKNOWN
from pipeline.training.outcome import ClassificationResult, RegressionResult

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from pipeline.training.outcome import TrainOutcome


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


def confusion(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _face_key(d: ClassificationResult, i: int) -> tuple[str, int | None]:
    """The thumbnail key of result row ``i``: its photo and face (None: the main face)."""
    return d.uris[i], (int(d.faces[i]) if d.faces is not None else None)


def _classification_section(name: str, labels: list[str], d: ClassificationResult, train_y: np.ndarray,
                            thumbs: dict[tuple[str, int | None], str], spec) -> str:
    plt = _plt()
    n = len(labels)
    true, pred = d.true, d.pred
    cm = confusion(true, pred, n)
    prf = per_class_prf(true, pred, n)
    side = max(4.0, min(16.0, 0.28 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7 if n > 12 else 9)
    ax.set_yticks(range(n), labels, fontsize=7 if n > 12 else 9)
    ax.set_xlabel("predicted (closed set)"), ax.set_ylabel("true")
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set_title(f"{name}: confusion matrix (test)")
    cm_png = _png(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * n + 2), 3.5))
    xs = np.arange(n)
    for k, (metric, off) in enumerate((("precision", -0.27), ("recall", 0), ("f1", 0.27))):
        ax.bar(xs + off, prf[metric], width=0.27, label=metric)
    ax.set_xticks(xs, labels, rotation=90, fontsize=7 if n > 12 else 9)
    ax.set_ylim(0, 1.05), ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{name}: per-class precision / recall / F1 (test)")
    prf_png = _png(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * n + 2), 3.5))
    t_counts = np.bincount(true, minlength=n)
    p_counts = np.bincount(pred, minlength=n)
    ax.bar(xs - 0.2, t_counts, width=0.4, label="true")
    ax.bar(xs + 0.2, p_counts, width=0.4, label="predicted")
    ax.set_xticks(xs, labels, rotation=90, fontsize=7 if n > 12 else 9)
    ax.legend(fontsize=8), ax.set_title(f"{name}: class distribution on test, true vs predicted")
    dist_png = _png(fig)

    tr_counts = np.bincount(train_y[train_y >= 0], minlength=n)
    rows = "".join(f"<tr><td>{html.escape(labels[i])}</td><td>{tr_counts[i]}</td><td>{prf['support'][i]}</td>"
                   f"<td>{prf['precision'][i]:.3f}</td><td>{prf['recall'][i]:.3f}</td><td>{prf['f1'][i]:.3f}</td></tr>"
                   for i in range(n))
    # most confident mistakes
    prob = d.prob
    wrong = np.flatnonzero(pred != true)
    wrong = wrong[np.argsort(-prob[wrong, pred[wrong]])][:8]
    cells = []
    for i in wrong:
        uri, key = d.uris[i], _face_key(d, i)
        img = f'<img src="data:image/png;base64,{thumbs[key]}" width="96">' if key in thumbs else "(no thumbnail)"
        cells.append(f"<figure>{img}<figcaption>true <b>{html.escape(labels[true[i]])}</b><br>predicted "
                     f"<b>{html.escape(labels[pred[i]])}</b> p={prob[i, pred[i]]:.2f}<br>"
                     f"<small>{html.escape(uri.rsplit('/', 1)[-1])}</small></figcaption></figure>")
    mistakes = "".join(cells) or "<p>no mistakes on the test split.</p>"
    open_set = ""
    if spec.open_set:
        rejected = float((d.label == UNKNOWN).mean()) if len(d.label) else 0.0
        open_set = (f"<p>open set: a face is <code>unknown</code> when its best probability is below "
                    f"{spec.min_prob:.3f} or its cosine distance to that class centroid is above "
                    f"{spec.max_dist:.3f}; known test faces rejected: {rejected:.1%}.</p>")
    return (f"<h2>{html.escape(name)} (classification, {n} classes, head {spec.head})</h2>{open_set}"
            f"{_img(cm_png, 'confusion matrix')}{_img(prf_png, 'precision recall f1')}{_img(dist_png, 'distribution')}"
            f"<details><summary>per-class table</summary><table><tr><th>class</th><th>train</th><th>test</th>"
            f"<th>precision</th><th>recall</th><th>F1</th></tr>{rows}</table></details>"
            f"<h3>most confident mistakes</h3><div class=thumbs>{mistakes}</div>")


def _regression_section(name: str, d: RegressionResult, spec) -> str:
    plt = _plt()
    true, pred = d.true, d.pred
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].scatter(true, pred, s=8, alpha=0.6)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=1)
    axes[0].set_xlabel("true"), axes[0].set_ylabel("predicted"), axes[0].set_title(f"{name}: test")
    axes[1].hist(pred - true, bins=30)
    axes[1].set_xlabel("predicted - true"), axes[1].set_title("error histogram")
    mae = float(np.abs(pred - true).mean()) if len(true) else float("nan")
    return (f"<h2>{html.escape(name)} (regression, head {spec.head})</h2><p>test MAE {mae:.2f} "
            f"(predicting the training mean: {float(np.abs(spec.mean - true).mean()):.2f})</p>"
            f"{_img(_png(fig), 'regression')}")


def _curves(history: list[dict]) -> str:
    plt = _plt()
    if not history:
        return ""
    keys = sorted({k for h in history for k in h if k.startswith("val_") and k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train (weighted sum)")
    for k in keys:
        ax.plot(ep, [h.get(k) for h in history], label=k[4:-5])
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.legend(fontsize=7), ax.set_title("learning curves")
    return f"<h2>training</h2>{_img(_png(fig), 'learning curves')}"


def thumbnails(faces: list[tuple[str, int | None]], settings: "Settings",
               size: int = 96) -> dict[tuple[str, int | None], str]:
    """Chips of a few faces, keyed (image_uri, face_index or None for the main face), as
    base64 PNG, cut by the shared CPU stage; each photo is read once."""
    import cv2

    from pipeline.faces import FaceDetector
    from pipeline.photos import analyse_photo

    if not faces:
        return {}
    detector = FaceDetector.from_settings(settings)
    out = {}
    wanted: dict[str, list[int | None]] = {}
    for u, i in dict.fromkeys(faces):
        wanted.setdefault(u, []).append(i)
    for u, indices in wanted.items():
        fs = storage.resolve(u)[0]   # the photo's own store (a people table may live elsewhere)
        photo = analyse_photo(storage.read_bytes(fs, u), detector, settings.max_pixels, settings.max_bytes)
        for i in indices:
            face = photo.main if i is None else i
            if face is None or not 0 <= face < len(photo.chips):
                continue
            chip = cv2.resize(photo.chips[face], (size, size), interpolation=cv2.INTER_AREA)
            ok, png = cv2.imencode(".png", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR))
            if ok:
                out[(u, i)] = base64.b64encode(png.tobytes()).decode()
    return out


def write_report(output_uri: str, outcome: "TrainOutcome", settings: "Settings",
                 log: Callable[[str], None] = print) -> str:
    """Render report.html into the bundle; returns its URI."""
    ev = outcome.evaluation
    specs = ev.specs
    detail = ev.test
    m = outcome.metrics
    # thumbnails for the most confident mistakes only (a handful of photos re-cropped)
    want = []
    for s in specs:
        if s.kind == CLASSIFICATION:
            d = detail[s.name]
            wrong = np.flatnonzero(d.pred != d.true)
            wrong = wrong[np.argsort(-d.prob[wrong, d.pred[wrong]])][:8]
            want += [_face_key(d, i) for i in wrong]
    try:
        thumbs = thumbnails(want, settings)
    except Exception as exc:  # the report must not lose a trained model
        log(f"report: thumbnails skipped ({type(exc).__name__}: {exc})")
        thumbs = {}
    sections = []
    for s in specs:
        if s.kind == CLASSIFICATION:
            sections.append(_classification_section(s.name, s.labels, detail[s.name], ev.train_counts[s.name], thumbs, s))
        else:
            sections.append(_regression_section(s.name, detail[s.name], s))
    unknown = ""
    if m.get("unknown"):
        unknown = "<h2>faces of people not in the training set</h2><ul>" + "".join(
            f"<li>{html.escape(k)}: {v['rejected']:.1%} of {v['faces']} faces rejected as unknown</li>"
            for k, v in m["unknown"].items()) + "</ul>"
    for k, v in m.get("strangers", {}).items():
        pct = lambda r: "n/a" if r is None else f"{r:.1%}"  # noqa: E731
        unknown += (f"<h2>{html.escape(k)}: open set against strangers</h2><p>{v['faces']} faces of {v['people']} "
                    f"unnamed people; thresholds picked on {v['used']['val']} of them (known faces rejected at "
                    f"most {v['target_known_rejected']:.0%}, strangers rejected as many as possible, aim "
                    f"{v['target_strangers_rejected']:.0%}), measured again on {v['used']['test']} faces of other "
                    f"unnamed people.</p><table><tr><th></th><th>known faces rejected</th><th>strangers rejected"
                    f"</th></tr>" + "".join(
                        f"<tr><th>{part}</th><td>{pct(v[part]['known_rejected'])}</td>"
                        f"<td>{pct(v[part]['strangers_rejected'])}</td></tr>" for part in ("val", "test")) + "</table>")
    summary_rows = {
        "model_version": outcome.meta["model_version"], "created_at": outcome.meta["created_at"],
        "data": f"{outcome.meta['data']['uri']} ({outcome.meta['data']['layout']})",
        "backbone": outcome.meta["backbone"]["id"], "photos": outcome.photos, "faces found": outcome.faces,
        "photos without a face (not used)": outcome.no_face,
        "photos with errors": ", ".join(f"{k} {v}" for k, v in outcome.errors.items()) or "none",
        "split train/val/test": "/".join(str(m["split"][k]) for k in ("train", "val", "test")),
        "workers": m["workers"], "epochs run": m["epochs_run"], "heads": m["heads"],
        "test metrics": m["test"]}
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary_rows.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>faceray model {outcome.meta['model_version']}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:1em auto}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}}
.thumbs{{display:flex;flex-wrap:wrap;gap:8px}} figure{{margin:0;font-size:12px;width:150px}}</style></head><body>
<h1>faceray model report</h1><table>{summary}</table>{unknown}{''.join(sections)}{_curves(ev.history)}
</body></html>"""
    fs, path = storage.resolve(output_uri)
    with fs.open_output_stream(f"{path}/report.html") as f:
        f.write(page.encode())
    return f"{output_uri.rstrip('/')}/report.html"
