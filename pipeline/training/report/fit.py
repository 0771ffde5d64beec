"""The fit's section (``ddp.fit`` → ``calibration.select_heads``): every candidate head's
validation figures at its own best epoch, why the chosen one was chosen, learning curves."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.contract import CLASSIFICATION
from pipeline.training.report.render import esc, fmt_num, fmt_pct, html_table, png_b64, pyplot
from pipeline.training.report.stats import finite

if TYPE_CHECKING:
    from pipeline.heads import TaskSpec


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
        vals = [(h.get(key), i) for i, h in enumerate(history) if finite(h.get(key))]
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


def selection_html(spec: "TaskSpec", rows: list[dict[str, Any]], history_epochs: int) -> str:
    """Why this head: every candidate's validation figures, the chosen one marked."""
    if not rows:
        return ""
    cls = spec.kind == CLASSIFICATION
    crit = "validation loss (cross-entropy)" if cls else f"validation MAE / training std ({spec.std:.2f})"
    chosen = next((r for r in rows if r["chosen"]), None)
    why = (f"<p>Head chosen: <b>{esc(spec.head)} on {esc(spec.features)} features</b> (candidate "
           f"{esc(chosen['variant'])}), the lowest {crit} among {len(rows)} candidates (head × input features), "
           f"at epoch {chosen['epoch'] + 1}.</p>") if chosen else ""
    if chosen and history_epochs and chosen["epoch"] + 1 >= history_epochs:
        why += ("<p class=note>The chosen epoch is the last one run: validation was still improving, so more "
                "<code>--epochs</code> may give a better model.</p>")
    body = [[("<b>" + esc(r["variant"]) + " ✔</b>") if r["chosen"] else esc(r["variant"]),
             str(r["epoch"] + 1), fmt_num(r["criterion"], 4), fmt_num(r["loss"], 4),
             (fmt_pct(r["metric"]) if cls else fmt_num(r["metric"], 2))] for r in rows]
    return why + html_table(["candidate", "best epoch", "criterion", "val loss", "val accuracy" if cls else "val MAE"],
                        body, "num")


def curves_png(spec: "TaskSpec", history: list[dict], rows: list[dict[str, Any]], stage: str = "heads") -> str:
    """Loss and metric per epoch: validation for every candidate head of the task (one
    colour each, the chosen one bold), the training loss beside it, the chosen epoch marked.
    With per-head training losses in the history (``train_<task@variant>_loss``) the chosen
    head's is drawn on the validation loss's axis; otherwise the only training loss is the
    weighted sum over every task and candidate head (what the optimiser sees), on its own axis."""
    plt = pyplot()
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
    return png_b64(fig)
