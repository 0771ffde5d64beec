"""What shipped and why (``versus``): trained vs the built-in network for every task one
answers, frozen vs fine-tuned, with both figures and their intervals on the same faces."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.contract import CLASSIFICATION
from pipeline.training.report.fit import curves_png, validation_rows
from pipeline.training.report.render import esc, fmt_ci, fmt_num, fmt_pct, html_table, img
from pipeline.training.report.stats import finite, wilson

if TYPE_CHECKING:
    from pipeline.heads import TaskSpec
    from pipeline.training.outcome import TrainOutcome


def bundle_validation(m: dict, spec: "TaskSpec", rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation rows behind the bundle's figure: the head fit's, or when a tuned
    model shipped the fine-tuning's at its best epoch (the weights the bundle holds)."""
    ft = m.get("finetune") or {}
    if not ft.get("history") or ft.get("kept") != "tuned":
        return rows
    chosen = {"variant": m.get("selection", {}).get(spec.name, {}).get("variant"), "best_epoch": ft.get("best_epoch")}
    return validation_rows(spec, ft["history"], chosen) or rows


def _figure(metric: str, f: dict[str, Any]) -> str:
    lo, hi = f["ci"]
    if metric == "accuracy":
        return fmt_pct(f["accuracy"]) + fmt_ci(lo, hi)
    return f"MAE {fmt_num(f['mae'], 2)} [{fmt_num(lo, 2)}–{fmt_num(hi, 2)}]"


def _difference(metric: str, d: dict[str, Any]) -> str:
    lo, hi = d["ci"]
    if metric == "accuracy":
        return f"{100 * d['value']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{d['value']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _pair_rows(task: str, rec: dict[str, Any], names: tuple[str, str], shipped: str) -> list[list[str]]:
    rows = []
    for part in ("val", "test"):
        if part not in rec:
            continue
        r = rec[part]
        rows.append([f"<b>{esc(task)}</b>" if part == "val" else "", "validation (decides)" if part == "val" else "test",
                     str(r[names[0]]["faces"]), _figure(rec["metric"], r[names[0]]), _figure(rec["metric"], r[names[1]]),
                     _difference(rec["metric"], r["difference"]), f"<b>{esc(shipped)}</b>" if part == "val" else ""])
    return rows


def choice_html(outcome: "TrainOutcome") -> str:
    """Per task: the built-in network, the frozen fit and the tuned model on the same
    validation and test faces, which one shipped and why; which labels matched a built-in."""
    m = outcome.metrics
    out = []
    matches = m.get("builtin_match") or {}
    if matches:
        from pipeline.training.builtin import BuiltinMatch

        items = "".join(f"<li>{esc(BuiltinMatch(**v).describe())}</li>" for v in matches.values())
        out.append("<h2>built-in networks</h2><p>A task whose labels (any order or case) or kind match a built-in "
                   "network gets a head that starts as that network's own output layer: before any training step it "
                   f"answers as the network does.</p><ul>{items}</ul>")
    versus = m.get("builtin") or {}
    if versus:
        rows = [row for task, rec in versus.items()
                for row in _pair_rows(task, rec, ("builtin", "trained"),
                                      "built-in (prefer_builtin)" if rec["shipped"] == "builtin" else "trained")]
        why = "".join(f"<li><b>{esc(k)}</b>: {esc(r['why'])}</li>" for k, r in versus.items())
        out.append("<h3>trained vs built-in</h3>" + html_table(
            ["task", "faces", "n", "built-in [95 % CI]", "trained [95 % CI]", "trained − built-in (paired 95 % CI)",
             "shipped"], rows, "num") + f"<ul>{why}</ul><p class=note>A trained head replaces the built-in "
            "network only when the paired interval of the difference on validation lies clear of 0: a tie, or a "
            "lucky face on a small validation set, ships the network trained on far more faces. A "
            "<code>prefer_builtin</code> task's head in the bundle is that network's output layer, so scoring and "
            "the endpoint give the built-in answer (in the task's own labels).</p>")
    ft = m.get("finetune") or {}
    if ft.get("versus_frozen"):
        rows = [row for task, rec in ft["versus_frozen"].items()
                for row in _pair_rows(task, rec, ("frozen", "tuned"), rec["shipped"] + (" (forced)" if rec.get("forced")
                                                                                        else ""))]
        out.append("<h3>frozen vs fine-tuned</h3>" + html_table(
            ["task", "faces", "n", "frozen [95 % CI]", "tuned [95 % CI]", "tuned − frozen (paired 95 % CI)",
             "shipped"], rows, "num") + "<p class=note>The tuned model ships only when its mean validation error "
            "(1 − accuracy, or MAE over the target's std, over the tasks) is lower than the frozen fit's (a tie: "
            "its validation loss).</p>")
    return "".join(out)


def finetune_html(outcome: "TrainOutcome", heads: dict[str, dict[str, Any]]) -> str:
    """With ``--finetune``: which networks were tuned, what happened, the frozen-feature
    heads (step 1) vs this bundle on the same test faces, and the fine-tuning's own curves
    (validation of the chosen heads, best epoch)."""
    ft = outcome.metrics.get("finetune")
    if not ft:
        return ""
    ev = outcome.evaluation
    nets = ", ".join(ft.get("networks") or []) or "none"
    if not ft.get("history"):
        return f"<h2>fine-tuning ({esc(ft.get('mode'))})</h2><p>Nothing was tuned (networks read: {esc(nets)}).</p>"
    rows = []
    for s in ev.specs:
        f, h = ft.get("frozen_test", {}).get(s.name, {}), heads[s.name]
        if s.kind == CLASSIFICATION:
            k = round(f.get("accuracy", float("nan")) * f.get("faces", 0)) if finite(f.get("accuracy")) else 0
            rows.append([esc(s.name), "accuracy", fmt_pct(f.get("accuracy")) + fmt_ci(*wilson(k, f.get("faces", 0))),
                         fmt_pct(h["accuracy"]) + fmt_ci(*h["accuracy_ci"])])
        else:
            lo, hi = h["mae_ci"]
            rows.append([esc(s.name), "MAE", fmt_num(f.get("mae"), 2),
                         f"{fmt_num(h['mae'], 2)} [{fmt_num(lo, 2)}–{fmt_num(hi, 2)}]"])
    best = int(ft.get("best_epoch", -1))
    kept = ("the weights of epoch {} (the best mean validation criterion) are in the bundle".format(best + 1)
            if ft.get("kept") == "tuned" else "the tuned model lost to the frozen fit on validation, so the bundle "
            "holds the frozen fit")
    out = [f"<h2>fine-tuning ({esc(ft.get('mode'))}: {esc(nets)})</h2><p>The network(s) the chosen heads read "
           f"({esc(nets)}) were trained with those heads for {ft.get('epochs_run')} epochs "
           f"({fmt_num(ft.get('seconds'), 1)} s); {kept}.</p>",
           html_table(["task", "test figure", "frozen features (step 1)", "this bundle [95 % CI]"], rows, "num")]
    history = ft.get("history") or []
    for s in ev.specs:
        vrows = bundle_validation(outcome.metrics, s, [])
        if history and vrows:
            out.append(img(curves_png(s, history, vrows, "fine-tuning"), f"fine-tuning curves {s.name}"))
    return "".join(out)
