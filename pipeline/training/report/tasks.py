"""The test section of each task (``evaluation.evaluate``): its figure with baselines,
confusion matrix, per-class precision/recall/F1, class distribution, the most confident
mistakes as thumbnails (cut again from their photos by the shared CPU stage), or for a
regression task predicted vs true and the error histogram."""
from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage
from pipeline.contract import CLASSIFICATION
from pipeline.training.outcome import ClassificationResult, RegressionResult, StrangerResult
from pipeline.training.report.fit import curves_png, selection_html
from pipeline.training.report.open_set import open_set_confusion, open_set_section
from pipeline.training.report.render import (confusion_png, esc, face_key, fmt_ci, fmt_num, fmt_pct, html_table, img,
                                             integer_axis, legend_outside, png_b64, pyplot, tick_font)
from pipeline.training.report.stats import (bootstrap_mae, classification_baselines, confusion, per_class_prf,
                                            regression_baseline, wilson)

if TYPE_CHECKING:
    from pipeline.heads import TaskSpec
    from pipeline.settings import Settings
    from pipeline.training.outcome import Evaluation


def _bars_png(title: str, labels: list[str], series: dict[str, np.ndarray], counts: bool) -> str:
    """Grouped bars per class, legend outside; integer ticks when the bars are counts."""
    plt = pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 3.4))
    xs = np.arange(n)
    w = 0.8 / len(series)
    for k, (lab, vals) in enumerate(series.items()):
        ax.bar(xs + (k - (len(series) - 1) / 2) * w, vals, width=w, label=lab)
    ax.set_xticks(xs, labels, rotation=90, fontsize=tick_font(n))
    ax.set_xlim(-0.6, n - 0.4)
    if counts:
        integer_axis(ax.yaxis)
        ax.set_ylabel("faces")
    else:
        ax.set_ylim(0, 1.0)
    legend_outside(ax)
    ax.set_title(title)
    return png_b64(fig)


def _mistakes_html(labels: list[str], d: ClassificationResult, thumbs: dict[tuple[str, int | None], str]) -> str:
    """The most confident closed-set mistakes, as thumbnails with short captions."""
    wrong = np.flatnonzero(d.pred != d.true)
    wrong = wrong[np.argsort(-d.prob[wrong, d.pred[wrong]])][:8]
    cells = []
    for i in wrong:
        key = face_key(d, i)
        img = f'<img src="data:image/png;base64,{thumbs[key]}" width="96">' if key in thumbs else "(no thumbnail)"
        cells.append(f"<figure>{img}<figcaption>true <b>{esc(labels[d.true[i]])}</b><br>predicted "
                     f"<b>{esc(labels[d.pred[i]])}</b> p={d.prob[i, d.pred[i]]:.2f}<br>"
                     f"<small>{esc(d.uris[i].rsplit('/', 1)[-1])}</small></figcaption></figure>")
    return "".join(cells) or "<p>no mistakes on the test split.</p>"


def _classification_section(name: str, labels: list[str], d: ClassificationResult, train_y: np.ndarray,
                            thumbs: dict[tuple[str, int | None], str], spec: "TaskSpec",
                            strangers: StrangerResult | None = None) -> str:
    """Confusion matrix, per-class figures and distribution, the open-set picture, mistakes."""
    n = len(labels)
    prf = per_class_prf(d.true, d.pred, n)
    if spec.open_set:
        cm_png = open_set_confusion(name, labels, d, strangers)
    else:
        cm_png = confusion_png(f"{name}: confusion matrix (test)", confusion(d.true, d.pred, n), labels, labels,
                                "predicted")
    prf_png = _bars_png(f"{name}: per-class precision / recall / F1 (test, closed set)", labels,
                        {m: prf[m] for m in ("precision", "recall", "f1")}, counts=False)
    dist_png = _bars_png(f"{name}: class distribution on test, true vs predicted", labels,
                         {"true": np.bincount(d.true, minlength=n), "predicted": np.bincount(d.pred, minlength=n)},
                         counts=True)
    tr_counts = np.bincount(train_y[train_y >= 0], minlength=n)
    rows = [[esc(labels[i]), str(tr_counts[i]), str(prf["support"][i]), f"{prf['precision'][i]:.3f}",
             f"{prf['recall'][i]:.3f}", f"{prf['f1'][i]:.3f}"] for i in range(n)]
    open_set = open_set_section(name, spec, d, strangers) if spec.open_set else ""
    return (f"{img(cm_png, 'confusion matrix')}{open_set}{img(prf_png, 'precision recall f1')}"
            f"{img(dist_png, 'distribution')}"
            f"<details><summary>per-class table</summary>"
            f"{html_table(['class', 'train', 'test', 'precision', 'recall', 'F1'], rows)}</details>"
            f"<h3>most confident mistakes (closed set)</h3><div class=thumbs>{_mistakes_html(labels, d, thumbs)}</div>")


def _regression_section(name: str, d: RegressionResult, spec: "TaskSpec") -> str:
    """Predicted vs true (with the training mean drawn) and the error histogram."""
    plt = pyplot()
    true, pred = d.true, d.pred
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].scatter(true, pred, s=10, alpha=0.6, label="test faces")
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = true")
    axes[0].axhline(spec.mean, color="tab:gray", lw=1, ls=":", label=f"training mean {spec.mean:.1f}")
    axes[0].set_xlabel(f"true {name}"), axes[0].set_ylabel(f"predicted {name}")
    axes[0].set_title(f"{name}: predicted vs true (test)")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    axes[1].hist(pred - true, bins=30, color="tab:blue")
    axes[1].axvline(0, color="k", lw=1)
    axes[1].set_xlabel("predicted − true"), axes[1].set_ylabel("faces"), axes[1].set_title("error histogram (test)")
    integer_axis(axes[1].yaxis)
    fig.tight_layout()
    return img(png_b64(fig), "regression")


def headline(spec: "TaskSpec", d: ClassificationResult | RegressionResult, train_y: np.ndarray,
             val: list[dict[str, Any]]) -> dict[str, Any]:
    """The task's test figure with its 95 % interval, its baselines and the chosen head's
    validation figure: what the summary table shows and the tests check."""
    chosen = next((r for r in val if r["chosen"]), None)
    n = len(d.true)
    if spec.kind == CLASSIFICATION:
        k = int((d.pred == d.true).sum())
        out = {"faces": n, "accuracy": k / n if n else float("nan"), "accuracy_ci": wilson(k, n),
               "baseline": classification_baselines(len(spec.labels), train_y, d.true),
               "val_accuracy": chosen["metric"] if chosen else None}
        if spec.open_set:
            ko = int((d.label == np.asarray(spec.labels, dtype=object)[d.true]).sum())
            out.update(open_set_accuracy=ko / n if n else float("nan"), open_set_accuracy_ci=wilson(ko, n))
        return out
    mae = float(np.abs(d.pred - d.true).mean()) if n else float("nan")
    return {"faces": n, "mae": mae, "mae_ci": bootstrap_mae(d.true, d.pred),
            "baseline": regression_baseline(spec, d.true),
            "val_mae": chosen["metric"] if chosen else None}


HEADLINE = ["task", "test faces", "model on test [95 % CI]", "baselines on the same faces",
            "validation (chosen head, best epoch)", "head"]


def headline_row(spec: "TaskSpec", h: dict[str, Any]) -> list[str]:
    """One formatted row of the task summary table."""
    if spec.kind == CLASSIFICATION:
        b = h["baseline"]
        model = f"accuracy <b>{fmt_pct(h['accuracy'])}</b>{fmt_ci(*h['accuracy_ci'])}"
        if "open_set_accuracy" in h:
            model += (f"<br>open set (<code>unknown</code> counts as wrong) {fmt_pct(h['open_set_accuracy'])}"
                      f"{fmt_ci(*h['open_set_accuracy_ci'])}")
        base = (f"chance {fmt_pct(b['chance'])}<br>majority class ({esc(spec.labels[b['majority_class']])}) "
                f"{fmt_pct(b['majority'])}{fmt_ci(*b['majority_ci'])}")
        val = fmt_pct(h["val_accuracy"])
    else:
        b = h["baseline"]
        lo, hi = h["mae_ci"]
        model = f"MAE <b>{fmt_num(h['mae'], 2)}</b> [{fmt_num(lo, 2)}–{fmt_num(hi, 2)}]"
        base = f"predict the training mean ({b['mean']:.1f}): MAE {fmt_num(b['mae'], 2)}"
        val = "MAE " + fmt_num(h["val_mae"], 2)
    kind = f"{spec.kind}, {len(spec.labels)} classes" if spec.labels else spec.kind
    return [f"<b>{esc(spec.name)}</b><br><small>{esc(kind)}</small>", str(h["faces"]), model, base, val,
            esc(f"{spec.head}+{spec.features}")]


def task_section(spec: "TaskSpec", ev: "Evaluation", d: ClassificationResult | RegressionResult,
                  rows: list[dict[str, Any]], h: dict[str, Any] | None,
                  thumbs: dict[tuple[str, int | None], str]) -> str:
    """Everything about one task: its figures (``h``; None when the page's overview table
    already shows this only task), validation and selection, curves, test plots."""
    history = ev.history
    kind = f"classification, {len(spec.labels)} classes" if spec.kind == CLASSIFICATION else "regression"
    parts = [f"<h2>{esc(spec.name)} ({kind}, head {esc(spec.head)} on {esc(spec.features)} features)</h2>",
             html_table(HEADLINE, [headline_row(spec, h)], "num") if h is not None else "",
             "<h3>validation and head selection</h3>", selection_html(spec, rows, len(history))]
    if history and rows:
        parts.append(img(curves_png(spec, history, rows), "learning curves"))
    parts.append("<h3>test</h3>")
    if spec.kind == CLASSIFICATION:
        parts.append(_classification_section(spec.name, spec.labels, d, ev.train_counts[spec.name], thumbs, spec,
                                             ev.strangers.get(spec.name)))
    else:
        parts.append(_regression_section(spec.name, d, spec))
    return "".join(parts)


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
