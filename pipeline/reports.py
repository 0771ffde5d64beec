"""Training metrics and the bundle's ``report.html`` (one self-contained page, PNG plots
embedded as base64 so the report can be copied or served from S3 as one object).

What a data scientist needs to judge the model, per task: the test figure with its 95 %
interval (Wilson for accuracies, a seeded bootstrap for MAE: test sets are 20-300 faces)
next to baselines (chance and majority class; predicting the training mean), the
validation figures and why this head was chosen, learning curves (train / validation, the
chosen epoch marked).  Per classification task: confusion matrix (with an ``unknown``
column for open-set tasks, and a strangers row when there are strangers), per-class
precision/recall/F1, class distribution true vs predicted, and the most confident mistakes
as face thumbnails.  Per open-set task: the distance the open-set rule thresholds, for
known faces vs strangers, with the threshold drawn, its ROC curve, and the counts of known
faces rejected and strangers accepted.  Per regression task: predicted vs true and the
error histogram.  The thumbnails are the chips of the few faces concerned, cut again from
their photos by the shared CPU stage (``pipeline.photos.analyse_photo``), so the report
needs no stored chips: the photo's main face, or the face the result names by index
(people layout, where an example is any face of a photo).
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline import storage
from pipeline.contract import CLASSIFICATION, UNKNOWN
from pipeline.training.outcome import ClassificationResult, RegressionResult, StrangerResult

if TYPE_CHECKING:
    from pipeline.heads import TaskSpec
    from pipeline.settings import Settings
    from pipeline.training.outcome import Evaluation, TrainOutcome

Z95 = 1.959964
KNOWN_C, STRANGER_C, STANDIN_C = "tab:blue", "tab:red", "tab:orange"


# -- statistics ------------------------------------------------------------------------

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


def validation_rows(spec: "TaskSpec", history: list[dict], selection: dict | None) -> list[dict[str, Any]]:
    """Per candidate head (variant) its validation figures at its own best epoch, and which
    was chosen: the lowest criterion (validation loss for classification, validation MAE
    over the training std for regression; ``calibration.select_heads``)."""
    prefix = f"val_{spec.name}@"
    variants = sorted({k[len(prefix):].rsplit("_", 1)[0] for h in history for k in h if k.startswith(prefix)})
    chosen = (selection or {}).get("variant")
    rows = []
    for v in variants:
        key = f"{prefix}{v}_" + ("loss" if spec.kind == CLASSIFICATION else "mae")
        vals = [(h.get(key), i) for i, h in enumerate(history) if _finite(h.get(key))]
        if not vals:
            continue
        if v == chosen and selection and "best_epoch" in selection:
            epoch = int(selection["best_epoch"])
            i = next((j for j, h in enumerate(history) if h.get("epoch") == epoch), min(vals)[1])
        else:
            i = min(vals)[1]
        h = history[i]
        metric = h.get(f"{prefix}{v}_acc") if spec.kind == CLASSIFICATION else h.get(f"{prefix}{v}_mae")
        crit = (selection or {}).get(f"val_crit_{v}")
        rows.append({"variant": v, "epoch": int(h.get("epoch", i)), "loss": h.get(f"{prefix}{v}_loss"),
                     "metric": metric, "criterion": crit, "chosen": v == chosen})
    return rows


def _finite(x: Any) -> bool:
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


# -- formatting -------------------------------------------------------------------------

def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not _finite(x) else f"{100 * x:.{digits}f} %"


def _ci_pct(lo: float, hi: float) -> str:
    return "" if not (_finite(lo) and _finite(hi)) else f" [{100 * lo:.1f}–{100 * hi:.1f}]"


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if _finite(x):
        return f"{float(x):.{digits}g}" if abs(float(x)) < 1e-3 or abs(float(x)) >= 1e4 else f"{float(x):.{digits}f}"
    return "n/a"


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table of already formatted (escaped) cells."""
    th = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


# -- plotting ---------------------------------------------------------------------------

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


def _legend_outside(ax, **kw) -> None:
    """A legend right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, frameon=False, **kw)


def _integer_axis(axis) -> None:
    """Counts get integer ticks (no 2.5 faces)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _tick_font(n: int) -> int:
    return 7 if n > 12 else 9


def _face_key(d: ClassificationResult, i: int) -> tuple[str, int | None]:
    """The thumbnail key of result row ``i``: its photo and face (None: the main face)."""
    return d.uris[i], (int(d.faces[i]) if d.faces is not None else None)


# -- sections ---------------------------------------------------------------------------

def _confusion_png(title: str, cm: np.ndarray, rows: list[str], cols: list[str], xlabel: str) -> str:
    """Confusion matrix: the count written in every non-empty cell, the colour the share
    of its row (so a big row, e.g. the strangers, does not wash out the others)."""
    plt = _plt()
    nr, nc = cm.shape
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(4.5, min(17.0, 0.3 * max(nr, nc) + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.0, side * nr / max(nc, 1) + 0.5))
    im = ax.imshow(share, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(nc), cols, rotation=90, fontsize=_tick_font(nc))
    ax.set_yticks(range(nr), rows, fontsize=_tick_font(nr))
    ax.set_xlabel(xlabel), ax.set_ylabel("true")
    if max(nr, nc) <= 60:
        font = 9 if max(nr, nc) <= 12 else 7
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font,
                    color="white" if share[i, j] > 0.6 else "black")
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("share of the row (cells: counts)")
    ax.set_title(title)
    return _png(fig)


def _open_set_confusion(name: str, labels: list[str], d: ClassificationResult,
                        strangers: StrangerResult | None) -> str:
    """What the bundle answers (open set): an ``unknown`` column, and a row for strangers
    when there are some, so wrongly accepted strangers show by the name they got."""
    index = {lab: i for i, lab in enumerate(labels)}
    n = len(labels)
    idx = np.array([index.get(lab, n) for lab in d.label], np.int64)
    cm = confusion(d.true, idx, n, n + 1)
    rows = list(labels)
    if strangers is not None and len(strangers.label):
        s_idx = np.array([index.get(lab, n) for lab in strangers.label], np.int64)
        cm = np.vstack([cm, np.bincount(s_idx, minlength=n + 1)[None, :]])
        rows.append("(strangers)")
    return _confusion_png(f"{name}: confusion matrix (test, as the bundle answers)", cm, rows, [*labels, UNKNOWN],
                          "answered")


def _bars_png(title: str, labels: list[str], series: dict[str, np.ndarray], counts: bool) -> str:
    """Grouped bars per class, legend outside; integer ticks when the bars are counts."""
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 3.4))
    xs = np.arange(n)
    w = 0.8 / len(series)
    for k, (lab, vals) in enumerate(series.items()):
        ax.bar(xs + (k - (len(series) - 1) / 2) * w, vals, width=w, label=lab)
    ax.set_xticks(xs, labels, rotation=90, fontsize=_tick_font(n))
    ax.set_xlim(-0.6, n - 0.4)
    if counts:
        _integer_axis(ax.yaxis)
        ax.set_ylabel("faces")
    else:
        ax.set_ylim(0, 1.0)
    _legend_outside(ax)
    ax.set_title(title)
    return _png(fig)


def _mistakes_html(labels: list[str], d: ClassificationResult, thumbs: dict[tuple[str, int | None], str]) -> str:
    """The most confident closed-set mistakes, as thumbnails with short captions."""
    wrong = np.flatnonzero(d.pred != d.true)
    wrong = wrong[np.argsort(-d.prob[wrong, d.pred[wrong]])][:8]
    cells = []
    for i in wrong:
        key = _face_key(d, i)
        img = f'<img src="data:image/png;base64,{thumbs[key]}" width="96">' if key in thumbs else "(no thumbnail)"
        cells.append(f"<figure>{img}<figcaption>true <b>{_esc(labels[d.true[i]])}</b><br>predicted "
                     f"<b>{_esc(labels[d.pred[i]])}</b> p={d.prob[i, d.pred[i]]:.2f}<br>"
                     f"<small>{_esc(d.uris[i].rsplit('/', 1)[-1])}</small></figcaption></figure>")
    return "".join(cells) or "<p>no mistakes on the test split.</p>"


def _classification_section(name: str, labels: list[str], d: ClassificationResult, train_y: np.ndarray,
                            thumbs: dict[tuple[str, int | None], str], spec: "TaskSpec",
                            strangers: StrangerResult | None = None) -> str:
    """Confusion matrix, per-class figures and distribution, the open-set picture, mistakes."""
    n = len(labels)
    prf = per_class_prf(d.true, d.pred, n)
    if spec.open_set:
        cm_png = _open_set_confusion(name, labels, d, strangers)
    else:
        cm_png = _confusion_png(f"{name}: confusion matrix (test)", confusion(d.true, d.pred, n), labels, labels,
                                "predicted")
    prf_png = _bars_png(f"{name}: per-class precision / recall / F1 (test, closed set)", labels,
                        {m: prf[m] for m in ("precision", "recall", "f1")}, counts=False)
    dist_png = _bars_png(f"{name}: class distribution on test, true vs predicted", labels,
                         {"true": np.bincount(d.true, minlength=n), "predicted": np.bincount(d.pred, minlength=n)},
                         counts=True)
    tr_counts = np.bincount(train_y[train_y >= 0], minlength=n)
    rows = [[_esc(labels[i]), str(tr_counts[i]), str(prf["support"][i]), f"{prf['precision'][i]:.3f}",
             f"{prf['recall'][i]:.3f}", f"{prf['f1'][i]:.3f}"] for i in range(n)]
    open_set = _open_set_section(name, spec, d, strangers) if spec.open_set else ""
    return (f"{_img(cm_png, 'confusion matrix')}{open_set}{_img(prf_png, 'precision recall f1')}"
            f"{_img(dist_png, 'distribution')}"
            f"<details><summary>per-class table</summary>"
            f"{_table(['class', 'train', 'test', 'precision', 'recall', 'F1'], rows)}</details>"
            f"<h3>most confident mistakes (closed set)</h3><div class=thumbs>{_mistakes_html(labels, d, thumbs)}</div>")


def _regression_section(name: str, d: RegressionResult, spec: "TaskSpec") -> str:
    """Predicted vs true (with the training mean drawn) and the error histogram."""
    plt = _plt()
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
    _integer_axis(axes[1].yaxis)
    fig.tight_layout()
    return _img(_png(fig), "regression")


def _open_set_data(d: ClassificationResult, strangers: StrangerResult | None
                   ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Known test faces' rule distance, and the strangers' (real ones when given, else the
    known faces seen from the nearest other centroid), with what the second set is."""
    known = d.dist if d.dist is not None else np.zeros(0)
    if strangers is not None and strangers.dist is not None and len(strangers.dist):
        return known, strangers.dist, "strangers"
    if d.impostor_dist is not None:
        return known, d.impostor_dist, "stand-in strangers"
    return known, None, ""


def _distance_png(name: str, spec: "TaskSpec", known: np.ndarray, other: np.ndarray | None, what: str) -> str:
    """Histogram of the rule's distance, known faces vs strangers, the threshold drawn;
    faces no class was probable enough for (infinite distance) in a bar of their own."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.4))
    sets = [("known test faces", known, KNOWN_C)]
    if other is not None:
        sets.append((what, other, STRANGER_C if what == "strangers" else STANDIN_C))
    finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in sets] + [np.array([spec.max_dist])])
    bins = np.linspace(max(0.0, finite.min() - 0.02), finite.max() + 0.02, 40)
    width = bins[1] - bins[0]
    over_x = bins[-1] + 3 * width
    any_over = False
    for k, (lab, v, c) in enumerate(sets):
        ax.hist(v[np.isfinite(v)], bins=bins, color=c, alpha=0.55, label=f"{lab} (n={len(v)})")
        over = int((~np.isfinite(v)).sum())
        if over:
            any_over = True
            ax.bar(over_x + (k - 0.5) * width * 1.2, over, width=width * 1.2, color=c, alpha=0.55)
    ax.axvline(spec.max_dist, color="k", ls="--", lw=1.2, label=f"threshold max_dist = {spec.max_dist:.3f}")
    if any_over:
        ticks = [t for t in ax.get_xticks() if bins[0] <= t <= bins[-1]]
        ax.set_xticks([*ticks, over_x], [f"{t:.2f}" for t in ticks] + [f"p < {spec.min_prob:.2f}"])
        ax.set_xlim(bins[0] - width, over_x + 2 * width)
    ax.set_xlabel("cosine distance to the nearest class centroid"
                  + (" with p ≥ min_prob" if spec.min_prob > 0 else ""))
    ax.set_ylabel("faces")
    _integer_axis(ax.yaxis)
    ax.set_title(f"{name}: accepted left of the threshold, unknown right of it")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    return _png(fig)


def _roc_png(name: str, spec: "TaskSpec", known: np.ndarray, other: np.ndarray, what: str) -> str:
    """ROC of the distance threshold (min_prob fixed), the calibrated point marked."""
    plt = _plt()
    far, tar = roc_points(known, other)
    auc = float(np.trapezoid(tar, far)) if hasattr(np, "trapezoid") else float(np.trapz(tar, far))
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(far, tar, color=KNOWN_C, lw=1.5, label=f"threshold swept (AUC {auc:.3f})")
    op_far = float((other <= spec.max_dist).mean()) if len(other) else float("nan")
    op_tar = float((known <= spec.max_dist).mean()) if len(known) else float("nan")
    ax.plot([op_far], [op_tar], "o", color="k", label=f"max_dist {spec.max_dist:.3f}")
    chance = np.linspace(0, 1, 200)
    ax.plot(chance, chance, color="tab:gray", lw=0.8, ls=":", label="chance")
    # strangers accepted on a log-like axis: the useful thresholds accept a few per cent of them
    ax.set_xscale("symlog", linthresh=0.01, linscale=0.5)
    ax.set_xlim(0, 1.05), ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([0, 0.01, 0.03, 0.1, 0.3, 1], ["0", "0.01", "0.03", "0.1", "0.3", "1"])
    ax.set_xlabel(f"{what} accepted (false accept rate)"), ax.set_ylabel("known faces accepted")
    ax.set_title(f"{name}: ROC (min_prob {spec.min_prob:.2f} fixed)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    return _png(fig)


def _open_set_section(name: str, spec: "TaskSpec", d: ClassificationResult,
                      strangers: StrangerResult | None) -> str:
    """The open-set rule shown, not only asserted: counts, histogram, ROC."""
    n_known = len(d.label)
    rej = int((d.label == UNKNOWN).sum())
    rows = [["known test faces rejected as <code>unknown</code>", f"{rej} of {n_known}",
             _pct(rej / n_known if n_known else None) + _ci_pct(*wilson(rej, n_known))]]
    if strangers is not None and len(strangers.label):
        acc = int((strangers.label != UNKNOWN).sum())
        ns = len(strangers.label)
        rows.append(["strangers accepted as someone", f"{acc} of {ns}", _pct(acc / ns) + _ci_pct(*wilson(acc, ns))])
        named = {}
        for lab in strangers.label[strangers.label != UNKNOWN]:
            named[lab] = named.get(lab, 0) + 1
        if named:
            top = sorted(named.items(), key=lambda kv: -kv[1])[:5]
            rows.append(["accepted strangers were named", "", ", ".join(f"{_esc(k)} ({v})" for k, v in top)])
    else:
        rows.append(["strangers accepted", "not measured",
                     "no faces of untrained people given (<code>--unknown</code> or the people layout's strangers)"])
    prob = (f"that class has probability ≥ {spec.min_prob:.3f} and " if spec.min_prob > 0 else "")
    among = " among the classes probable enough" if spec.min_prob > 0 else ""
    text = (f"<p>Open set: a face gets a class only if {prob}its centroid (mean training embedding) is within "
            f"cosine distance {spec.max_dist:.3f}; otherwise it is <code>unknown</code>. The distance drawn below "
            f"is, per face, that of the nearest centroid{among}.</p>")
    table = _table(["", "count", "share [95 % CI]"], rows, "num")
    known, other, what = _open_set_data(d, strangers)
    if not len(known):
        return f"<h3>{_esc(name)}: open set</h3>{text}{table}"
    plots = _img(_distance_png(name, spec, known, other, what), "distance histogram")
    if other is not None and len(other):
        plots += _img(_roc_png(name, spec, known, other, what), "ROC")
    note = ("" if what != "stand-in strangers" else
            "<p class=note>No real strangers were given: the stand-in is each known test face's distance to the "
            "nearest centroid of <i>another</i> class (how it would look had its person not been trained), "
            "the estimate the thresholds were calibrated on. Pass <code>--unknown</code> to measure real ones.</p>")
    return f"<h3>{_esc(name)}: open set</h3>{text}{table}{note}<div class=row>{plots}</div>"


def _selection_html(spec: "TaskSpec", rows: list[dict[str, Any]], history_epochs: int) -> str:
    """Why this head: every candidate's validation figures, the chosen one marked."""
    if not rows:
        return ""
    cls = spec.kind == CLASSIFICATION
    crit = "validation loss (cross-entropy)" if cls else f"validation MAE / training std ({spec.std:.2f})"
    chosen = next((r for r in rows if r["chosen"]), None)
    why = (f"<p>Head chosen: <b>{_esc(spec.head)} on {_esc(spec.features)} features</b> (candidate "
           f"{_esc(chosen['variant'])}), the lowest {crit} among {len(rows)} candidates (head × input features), "
           f"at epoch {chosen['epoch'] + 1}.</p>") if chosen else ""
    if chosen and history_epochs and chosen["epoch"] + 1 >= history_epochs:
        why += ("<p class=note>The chosen epoch is the last one run: validation was still improving, so more "
                "<code>--epochs</code> may give a better model.</p>")
    body = [[("<b>" + _esc(r["variant"]) + " ✔</b>") if r["chosen"] else _esc(r["variant"]),
             str(r["epoch"] + 1), _num(r["criterion"], 4), _num(r["loss"], 4),
             (_pct(r["metric"]) if cls else _num(r["metric"], 2))] for r in rows]
    return why + _table(["candidate", "best epoch", "criterion", "val loss", "val accuracy" if cls else "val MAE"],
                        body, "num")


def _curves_png(spec: "TaskSpec", history: list[dict], rows: list[dict[str, Any]], stage: str = "heads") -> str:
    """Loss and metric per epoch: validation for every candidate head of the task (one
    colour each, the chosen one bold), the training loss beside it, the chosen epoch marked.
    With per-head training losses in the history (``train_<task@variant>_loss``) the chosen
    head's is drawn on the validation loss's axis; otherwise the only training loss is the
    weighted sum over every task and candidate head (what the optimiser sees), on its own axis."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cls = spec.kind == CLASSIFICATION
    ep = np.array([h.get("epoch", i) for i, h in enumerate(history)]) + 1
    fig, (a_loss, a_met) = plt.subplots(1, 2, figsize=(11.5, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, chosen_epoch, per_head_train = [], None, False
    for k, r in enumerate(rows):
        v, c = r["variant"], colours[k % len(colours)]
        lw, ls = (2.4, "-") if r["chosen"] else (1.0, "--")
        key = f"val_{spec.name}@{v}_"
        a_loss.plot(ep, [h.get(key + "loss", np.nan) for h in history], color=c, lw=lw, ls=ls)
        a_met.plot(ep, [h.get(key + ("acc" if cls else "mae"), np.nan) for h in history], color=c, lw=lw, ls=ls)
        handles.append(Line2D([], [], color=c, lw=lw, ls=ls, label=f"validation, {v}" + (" (chosen)" if r["chosen"]
                                                                                          else "")))
        train_key = f"train_{spec.name}@{v}_loss"
        if r["chosen"]:
            chosen_epoch = r["epoch"] + 1
            if any(train_key in h for h in history):
                per_head_train = True
                a_loss.plot(ep, [h.get(train_key, np.nan) for h in history], color=c, lw=1.5, ls="-.")
                handles.append(Line2D([], [], color=c, lw=1.5, ls="-.", label=f"train, {v} (chosen)"))
    if not per_head_train:
        a_train = a_loss.twinx()
        a_train.plot(ep, [h.get("train_loss", np.nan) for h in history], color="0.35", lw=1.5, ls="-.")
        a_train.set_ylabel("train loss (all heads, weighted sum)", color="0.35")
        a_train.tick_params(axis="y", colors="0.35")
        handles.append(Line2D([], [], color="0.35", lw=1.5, ls="-.", label="train (all heads, weighted sum)"))
    for ax in (a_loss, a_met):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="k", lw=1, ls=":")
            near_end = chosen_epoch > 0.8 * ep.max() and ep.max() > 1   # keep the label inside the frame
            ax.text(chosen_epoch, 1.01, f"chosen epoch {chosen_epoch} ", transform=ax.get_xaxis_transform(),
                    ha="right" if near_end else "center", va="bottom", fontsize=8)
    a_loss.set_ylabel("train / validation loss" if per_head_train else "validation loss")
    a_met.set_ylabel("validation " + ("accuracy" if cls else "MAE"))
    if cls:
        a_met.set_ylim(top=1.01)
    a_loss.set_title(f"{spec.name}: loss ({stage})", pad=14)
    a_met.set_title(f"{spec.name}: validation metric ({stage})", pad=14)
    fig.tight_layout()
    a_met.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8,
                 frameon=False)
    return _png(fig)


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


def _headline_row(spec: "TaskSpec", h: dict[str, Any]) -> list[str]:
    """One formatted row of the task summary table."""
    if spec.kind == CLASSIFICATION:
        b = h["baseline"]
        model = f"accuracy <b>{_pct(h['accuracy'])}</b>{_ci_pct(*h['accuracy_ci'])}"
        if "open_set_accuracy" in h:
            model += (f"<br>open set (<code>unknown</code> counts as wrong) {_pct(h['open_set_accuracy'])}"
                      f"{_ci_pct(*h['open_set_accuracy_ci'])}")
        base = (f"chance {_pct(b['chance'])}<br>majority class ({_esc(spec.labels[b['majority_class']])}) "
                f"{_pct(b['majority'])}{_ci_pct(*b['majority_ci'])}")
        val = _pct(h["val_accuracy"])
    else:
        b = h["baseline"]
        lo, hi = h["mae_ci"]
        model = f"MAE <b>{_num(h['mae'], 2)}</b> [{_num(lo, 2)}–{_num(hi, 2)}]"
        base = f"predict the training mean ({b['mean']:.1f}): MAE {_num(b['mae'], 2)}"
        val = "MAE " + _num(h["val_mae"], 2)
    kind = f"{spec.kind}, {len(spec.labels)} classes" if spec.labels else spec.kind
    return [f"<b>{_esc(spec.name)}</b><br><small>{_esc(kind)}</small>", str(h["faces"]), model, base, val,
            _esc(f"{spec.head}+{spec.features}")]


def _task_section(spec: "TaskSpec", ev: "Evaluation", d: ClassificationResult | RegressionResult,
                  rows: list[dict[str, Any]], h: dict[str, Any] | None,
                  thumbs: dict[tuple[str, int | None], str]) -> str:
    """Everything about one task: its figures (``h``; None when the page's overview table
    already shows this only task), validation and selection, curves, test plots."""
    history = ev.history
    kind = f"classification, {len(spec.labels)} classes" if spec.kind == CLASSIFICATION else "regression"
    parts = [f"<h2>{_esc(spec.name)} ({kind}, head {_esc(spec.head)} on {_esc(spec.features)} features)</h2>",
             _table(HEADLINE, [_headline_row(spec, h)], "num") if h is not None else "",
             "<h3>validation and head selection</h3>", _selection_html(spec, rows, len(history))]
    if history and rows:
        parts.append(_img(_curves_png(spec, history, rows), "learning curves"))
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


def _summary_rows(outcome: "TrainOutcome") -> dict[str, str]:
    """The run at a glance, every value formatted (no raw dicts, no long floats)."""
    m, meta = outcome.metrics, outcome.meta
    split = m.get("split", {})
    return {
        "model_version": meta["model_version"], "created_at": meta["created_at"],
        "data": f"{meta['data']['uri']} ({meta['data']['layout']})",
        "backbone": meta["backbone"]["id"], "photos": _num(outcome.photos), "faces found": _num(outcome.faces),
        "photos without a face (not used)": _num(outcome.no_face),
        "photos with errors": ", ".join(f"{k} {v}" for k, v in outcome.errors.items()) or "none",
        "split train / val / test": " / ".join(_num(split.get(k, 0)) for k in ("train", "val", "test")),
        "fit": f"{m.get('epochs_run')} epochs on {m.get('workers')} worker(s), {outcome.fit_seconds:.1f} s",
        "heads chosen": ", ".join(f"{k}: {v}" for k, v in m.get("heads", {}).items())}


def _strangers_html(m: dict) -> str:
    """Strangers measured at the job level (--unknown, people layout), as sentences and a table."""
    out = ""
    if m.get("unknown"):
        out = "<h2>faces of people not in the training set (--unknown)</h2><ul>" + "".join(
            f"<li>{_esc(k)}: {_pct(v['rejected'])} of {v['faces']} faces rejected as unknown "
            f"{_ci_pct(*wilson(round(v['rejected'] * v['faces']), v['faces']))}</li>"
            for k, v in m["unknown"].items()) + "</ul>"
    for k, v in m.get("strangers", {}).items():
        out += (f"<h2>{_esc(k)}: open set against strangers</h2><p>{v['faces']} faces of {v['people']} "
                f"unnamed people; thresholds picked on {v['used']['val']} of them (known faces rejected at "
                f"most {v['target_known_rejected']:.0%}, strangers rejected as many as possible, aim "
                f"{v['target_strangers_rejected']:.0%}), measured again on {v['used']['test']} faces of other "
                f"unnamed people.</p>" + _table(["", "known faces rejected", "strangers rejected"], [
                    [part, _pct(v[part]["known_rejected"]), _pct(v[part]["strangers_rejected"])]
                    for part in ("val", "test")], "num"))
    return out


def _bundle_validation(m: dict, spec: "TaskSpec", rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation rows behind the bundle's figure: the head fit's, or after
    ``--finetune`` the fine-tuning's at its best epoch (the weights the bundle holds)."""
    ft = m.get("finetune") or {}
    if not ft.get("history"):
        return rows
    chosen = {"variant": m.get("selection", {}).get(spec.name, {}).get("variant"), "best_epoch": ft.get("best_epoch")}
    return validation_rows(spec, ft["history"], chosen) or rows


def _finetune_html(outcome: "TrainOutcome", heads: dict[str, dict[str, Any]]) -> str:
    """With ``--finetune``: the frozen-feature heads (step 1) vs this bundle on the same test
    faces, and the fine-tuning's own curves (validation of the chosen heads, best epoch)."""
    ft = outcome.metrics.get("finetune")
    if not ft:
        return ""
    ev = outcome.evaluation
    rows = []
    for s in ev.specs:
        f, h = ft.get("frozen_test", {}).get(s.name, {}), heads[s.name]
        if s.kind == CLASSIFICATION:
            k = round(f.get("accuracy", float("nan")) * f.get("faces", 0)) if _finite(f.get("accuracy")) else 0
            rows.append([_esc(s.name), "accuracy", _pct(f.get("accuracy")) + _ci_pct(*wilson(k, f.get("faces", 0))),
                         _pct(h["accuracy"]) + _ci_pct(*h["accuracy_ci"])])
        else:
            lo, hi = h["mae_ci"]
            rows.append([_esc(s.name), "MAE", _num(f.get("mae"), 2),
                         f"{_num(h['mae'], 2)} [{_num(lo, 2)}–{_num(hi, 2)}]"])
    best = int(ft.get("best_epoch", -1))
    out = [f"<h2>fine-tuning ({_esc(ft.get('mode'))})</h2><p>The backbone was trained with the chosen heads for "
           f"{ft.get('epochs_run')} epochs ({_num(ft.get('seconds'), 1)} s); the weights of epoch {best + 1} (the best "
           f"mean validation criterion) are in the bundle.</p>",
           _table(["task", "test figure", "frozen features (step 1)", "fine-tuned (this bundle) [95 % CI]"], rows,
                  "num")]
    history = ft.get("history") or []
    for s in ev.specs:
        vrows = _bundle_validation(outcome.metrics, s, [])
        if history and vrows:
            out.append(_img(_curves_png(s, history, vrows, "fine-tuning"), f"fine-tuning curves {s.name}"))
    return "".join(out)


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 8px}
img{max-width:100%;display:block;margin:6px 0}
table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;font-size:13px;vertical-align:top}
table.num td{font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.row img{max-width:100%}
.thumbs{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;font-size:12px;width:150px}figcaption{line-height:1.3}figcaption small{word-break:break-all}
.note{color:#555;font-size:13px}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"""


def write_report(output_uri: str, outcome: "TrainOutcome", settings: "Settings",
                 log: Callable[[str], None] = print) -> str:
    """Render report.html into the bundle; returns its URI."""
    ev = outcome.evaluation
    m = outcome.metrics
    # thumbnails for the most confident mistakes only (a handful of photos re-cropped)
    want = []
    for s in ev.specs:
        if s.kind == CLASSIFICATION:
            d = ev.test[s.name]
            wrong = np.flatnonzero(d.pred != d.true)
            wrong = wrong[np.argsort(-d.prob[wrong, d.pred[wrong]])][:8]
            want += [_face_key(d, i) for i in wrong]
    try:
        thumbs = thumbnails(want, settings)
    except Exception as exc:  # the report must not lose a trained model
        log(f"report: thumbnails skipped ({type(exc).__name__}: {exc})")
        thumbs = {}
    selection = m.get("selection", {})
    overview, sections, heads = [], [], {}
    for s in ev.specs:
        d = ev.test[s.name]
        rows = validation_rows(s, ev.history, selection.get(s.name))
        h = heads[s.name] = headline(s, d, ev.train_counts[s.name], _bundle_validation(m, s, rows))
        overview.append(_headline_row(s, h))
        sections.append(_task_section(s, ev, d, rows, h if len(ev.specs) > 1 else None, thumbs))
    summary = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _summary_rows(outcome).items())
    tasks = _table(HEADLINE, overview, "num")
    title = f"faceray model {_esc(outcome.meta['model_version'])}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}</style></head><body>
<h1>faceray model report</h1><table>{summary}</table>
<h2>tasks at a glance</h2>{tasks}<p class=note>Intervals: 95 %, Wilson score for accuracies and shares,
percentile bootstrap (2,000 resamples, seed 0) for MAE. Baselines ignore the face: uniform guessing, always the most
frequent training class, or the training mean.</p>{_strangers_html(m)}{_finetune_html(outcome, heads)}
{''.join(sections)}
</body></html>"""
    fs, path = storage.resolve(output_uri)
    with fs.open_output_stream(f"{path}/report.html") as f:
        f.write(page.encode())
    return f"{output_uri.rstrip('/')}/report.html"
