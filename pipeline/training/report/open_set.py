"""The open-set section (``calibration.calibrate``): the rule's distance for known faces
vs strangers with the threshold drawn, its ROC, counts of known faces rejected and
strangers accepted, and the strangers measured at the job level."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.contract import UNKNOWN
from pipeline.training.outcome import ClassificationResult, StrangerResult
from pipeline.training.report.render import (confusion_png, esc, fmt_ci, fmt_pct, html_table, img, integer_axis,
                                             png_b64, pyplot)
from pipeline.training.report.stats import confusion, roc_points, wilson

if TYPE_CHECKING:
    from pipeline.heads import TaskSpec

KNOWN_C, STRANGER_C, STANDIN_C = "tab:blue", "tab:red", "tab:orange"


def open_set_confusion(name: str, labels: list[str], d: ClassificationResult,
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
    return confusion_png(f"{name}: confusion matrix (test, as the bundle answers)", cm, rows, [*labels, UNKNOWN],
                          "answered")


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
    plt = pyplot()
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
    integer_axis(ax.yaxis)
    ax.set_title(f"{name}: accepted left of the threshold, unknown right of it")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    return png_b64(fig)


def _roc_png(name: str, spec: "TaskSpec", known: np.ndarray, other: np.ndarray, what: str) -> str:
    """ROC of the distance threshold (min_prob fixed), the calibrated point marked."""
    plt = pyplot()
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
    return png_b64(fig)


def open_set_section(name: str, spec: "TaskSpec", d: ClassificationResult,
                      strangers: StrangerResult | None) -> str:
    """The open-set rule shown, not only asserted: counts, histogram, ROC."""
    n_known = len(d.label)
    rej = int((d.label == UNKNOWN).sum())
    rows = [["known test faces rejected as <code>unknown</code>", f"{rej} of {n_known}",
             fmt_pct(rej / n_known if n_known else None) + fmt_ci(*wilson(rej, n_known))]]
    if strangers is not None and len(strangers.label):
        acc = int((strangers.label != UNKNOWN).sum())
        ns = len(strangers.label)
        rows.append(["strangers accepted as someone", f"{acc} of {ns}", fmt_pct(acc / ns) + fmt_ci(*wilson(acc, ns))])
        named = {}
        for lab in strangers.label[strangers.label != UNKNOWN]:
            named[lab] = named.get(lab, 0) + 1
        if named:
            top = sorted(named.items(), key=lambda kv: -kv[1])[:5]
            rows.append(["accepted strangers were named", "", ", ".join(f"{esc(k)} ({v})" for k, v in top)])
    else:
        rows.append(["strangers accepted", "not measured",
                     "no faces of untrained people given (<code>--unknown</code> or the people layout's strangers)"])
    prob = (f"that class has probability ≥ {spec.min_prob:.3f} and " if spec.min_prob > 0 else "")
    among = " among the classes probable enough" if spec.min_prob > 0 else ""
    text = (f"<p>Open set: a face gets a class only if {prob}its centroid (mean training embedding) is within "
            f"cosine distance {spec.max_dist:.3f}; otherwise it is <code>unknown</code>. The distance drawn below "
            f"is, per face, that of the nearest centroid{among}.</p>")
    table = html_table(["", "count", "share [95 % CI]"], rows, "num")
    known, other, what = _open_set_data(d, strangers)
    if not len(known):
        return f"<h3>{esc(name)}: open set</h3>{text}{table}"
    plots = img(_distance_png(name, spec, known, other, what), "distance histogram")
    if other is not None and len(other):
        plots += img(_roc_png(name, spec, known, other, what), "ROC")
    note = ("" if what != "stand-in strangers" else
            "<p class=note>No real strangers were given: the stand-in is each known test face's distance to the "
            "nearest centroid of <i>another</i> class (how it would look had its person not been trained), "
            "the estimate the thresholds were calibrated on. Pass <code>--unknown</code> to measure real ones.</p>")
    return f"<h3>{esc(name)}: open set</h3>{text}{table}{note}<div class=row>{plots}</div>"


def strangers_html(m: dict) -> str:
    """Strangers measured at the job level (--unknown, people layout), as sentences and a table."""
    out = ""
    if m.get("unknown"):
        out = "<h2>faces of people not in the training set (--unknown)</h2><ul>" + "".join(
            f"<li>{esc(k)}: {fmt_pct(v['rejected'])} of {v['faces']} faces rejected as unknown "
            f"{fmt_ci(*wilson(round(v['rejected'] * v['faces']), v['faces']))}</li>"
            for k, v in m["unknown"].items()) + "</ul>"
    for k, v in m.get("strangers", {}).items():
        out += (f"<h2>{esc(k)}: open set against strangers</h2><p>{v['faces']} faces of {v['people']} "
                f"unnamed people; thresholds picked on {v['used']['val']} of them (known faces rejected at "
                f"most {v['target_known_rejected']:.0%}, strangers rejected as many as possible, aim "
                f"{v['target_strangers_rejected']:.0%}), measured again on {v['used']['test']} faces of other "
                f"unnamed people.</p>" + html_table(["", "known faces rejected", "strangers rejected"], [
                    [part, fmt_pct(v[part]["known_rejected"]), fmt_pct(v[part]["strangers_rejected"])]
                    for part in ("val", "test")], "num"))
    return out


def budget_html(m: dict) -> str:
    """What the known-rejection budget (``--target-frr``) buys, per open-set task: known
    faces and strangers rejected on validation at the budget used and at others."""
    out = ""
    for task, c in (m.get("open_set") or {}).items():
        rows = c.get("budgets") or []
        if not rows:
            continue
        who = "strangers" if any(r.get("real_strangers") for r in rows) else "stand-in strangers"
        body = [[("<b>" if abs(r["budget"] - c["target_frr"]) < 1e-9 else "") + fmt_pct(r["budget"]) +
                 (" (used)</b>" if abs(r["budget"] - c["target_frr"]) < 1e-9 else ""),
                 fmt_pct(r["known_rejected"]), fmt_pct(r["strangers_rejected"])] for r in rows]
        out += (f"<h3>{esc(task)}: what the known-rejection budget buys</h3><p>Thresholds calibrated to reject "
                f"<code>--target-frr</code> {fmt_pct(c['target_frr'])} of the known validation faces "
                f"(measured: {fmt_pct(c['val_known_reject'])}); {who} rejected {fmt_pct(c['est_unknown_reject'])}. "
                "Other budgets, on the same validation faces:</p>"
                + html_table(["budget (known faces rejected at most)", "known rejected", f"{who} rejected"], body, "num"))
    return out

