"""From the fit to a bundle in memory: the head kept per task (best on validation), class
centroids from the training faces, and open-set thresholds calibrated on validation faces
so that ``target_frr`` of known faces are rejected — the budget spent, not left unused —
and, when faces of strangers are at hand, as many of them as possible; with what other
budgets would buy (``heads.budget_curve``), for the report."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from pipeline.contract import CLASSIFICATION
from pipeline.heads import (ModelBundle, TaskSpec, budget_curve, calibrate_open_set, calibrate_with_strangers,
                            class_centroids, split_variant)
from pipeline.training.split import Encoded


def select_heads(specs: list[TaskSpec], best: dict[str, dict]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Per task the variant (head type × input features) with the lowest validation
    criterion: its state (keyed ``task.<param>``) and why it was chosen.  Sets
    ``spec.head`` and ``spec.features``."""
    heads_state, chosen = {}, {}
    for s in specs:
        cands = {k.split("@")[1]: b for k, b in best.items() if k.split("@")[0] == s.name}
        v = min(cands, key=lambda c: cands[c]["crit"])
        s.head, s.features = split_variant(v)
        chosen[s.name] = {"head": s.head, "features": s.features, "variant": v, "best_epoch": cands[v]["epoch"],
                          **{f"val_crit_{c}": round(b["crit"], 5) for c, b in cands.items()}}
        heads_state.update({f"{s.name}.{n}": p for n, p in cands[v]["state"].items()})
    return heads_state, chosen


def calibrate(specs: list[TaskSpec], heads_state: dict[str, Any], train: Encoded, val: Encoded,
              target_frr: float, strangers: Encoded | None = None) -> tuple[ModelBundle, dict, dict[str, dict]]:
    """The calibrated bundle in memory, its centroids, and each open-set task's calibration.

    ``strangers``: validation faces of people outside every class (people layout); without
    them (or when empty) the thresholds come from known faces alone, as before."""
    centroids = {s.name: class_centroids(train.x[train.y[s.name] >= 0], train.y[s.name][train.y[s.name] >= 0],
                                         len(s.labels))
                 for s in specs if s.kind == CLASSIFICATION and s.open_set}
    raw_bundle = ModelBundle.in_memory(specs, heads_state, centroids)
    raw_val = raw_bundle.raw(val.x, val.features)
    use_strangers = strangers is not None and len(strangers.x) > 0
    raw_str = raw_bundle.raw(strangers.x) if use_strangers else {}
    calib = {}
    for s in specs:
        if s.name in centroids:
            m = val.y[s.name] >= 0
            if use_strangers:
                c = calibrate_with_strangers(raw_val[s.name][m], val.x[m], val.y[s.name][m], centroids[s.name],
                                             raw_str[s.name], strangers.x, target_frr)
                # round outwards: a face on a threshold stays on the side it was measured on
                s.min_prob, s.max_dist = math.floor(c.min_prob * 1e6) / 1e6, math.ceil(c.max_dist * 1e6) / 1e6
            else:
                c = calibrate_open_set(raw_val[s.name][m], val.x[m], val.y[s.name][m], centroids[s.name],
                                       target_frr)
                s.min_prob, s.max_dist = round(c.min_prob, 6), round(c.max_dist, 6)
            calib[s.name] = {**asdict(c), "target_frr": target_frr,
                             "budgets": budget_curve(raw_val[s.name][m], val.x[m], val.y[s.name][m], centroids[s.name],
                                                     raw_str.get(s.name), strangers.x if use_strangers else None)}
    return ModelBundle.in_memory(specs, heads_state, centroids), centroids, calib
