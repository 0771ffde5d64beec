"""Keep the better model on validation, and say so with both figures and their intervals.

Two comparisons, on the same validation (and, for the report, test) faces:

* trained vs built-in, for every task a built-in network answers (``builtin.py``): the
  trained head against that network's own output layer.  A task whose trained head does
  not beat it on validation beyond chance (``beyond_chance``) ships the output layer
  instead, marked ``prefer_builtin`` — the bundle then answers as the built-in network
  does, in scoring and at the endpoint alike.
* frozen vs tuned (``--finetune``): the tuned backbone is kept only when its heads do
  better on validation than the frozen fit's.

Figures: accuracy (closed set) with its Wilson 95 % interval, or MAE with a bootstrap
95 % interval; the difference on the same faces with a paired bootstrap 95 % interval.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.contract import CLASSIFICATION
from pipeline.heads import BUILTIN, ModelBundle, TaskSpec
from pipeline.training.builtin import BuiltinMatch
from pipeline.training.split import Encoded


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def boot_ci(v: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval of a mean."""
    v = np.asarray(v, float)
    if not len(v):
        return float("nan"), float("nan")
    boots = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b − a) over the same faces and its paired bootstrap 95 % interval."""
    d = np.asarray(b, float) - np.asarray(a, float)
    if not len(d):
        return float("nan"), float("nan"), float("nan")
    boots = d[np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def per_face(spec: TaskSpec, raw: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per labelled face: 1/0 closed-set correct (classification) or absolute error."""
    if spec.kind == CLASSIFICATION:
        m = y >= 0
        return (raw[m].argmax(1) == y[m]).astype(float)
    m = np.isfinite(y)
    return np.abs(raw[m, 0] - y[m]).astype(float)


def _loss(spec: TaskSpec, raw: np.ndarray, y: np.ndarray) -> float:
    """Mean validation loss: cross-entropy of the true class, or MAE / target std."""
    if spec.kind == CLASSIFICATION:
        m = y >= 0
        return float(-np.log(np.clip(raw[m, y[m]], 1e-12, 1)).mean()) if m.any() else 0.0
    m = np.isfinite(y)
    return float(np.abs(raw[m, 0] - y[m]).mean() / max(spec.std, 1e-6)) if m.any() else 0.0


def figure(spec: TaskSpec, v: np.ndarray) -> dict[str, Any]:
    """The figure of per-face values and its interval."""
    if spec.kind == CLASSIFICATION:
        lo, hi = wilson(int(v.sum()), len(v))
        return {"accuracy": float(v.mean()) if len(v) else float("nan"), "ci": [lo, hi], "faces": len(v)}
    lo, hi = boot_ci(v)
    return {"mae": float(v.mean()) if len(v) else float("nan"), "ci": [lo, hi], "faces": len(v)}


def beyond_chance(spec: TaskSpec, difference: dict[str, Any]) -> bool:
    """The paired interval of (trained − built-in) lies clear of 0 on the better side:
    higher accuracy, lower MAE.  The built-in network is the default (it learnt from far
    more faces than any user set); a trained head replaces it only on that evidence, so a
    tie or a lucky face on a small validation set never ships a worse model."""
    lo, hi = difference["ci"]
    return bool(lo > 0) if spec.kind == CLASSIFICATION else bool(hi < 0)


def _compare(spec: TaskSpec, a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> dict[str, Any]:
    d, lo, hi = paired_ci(a, b)
    return {names[0]: figure(spec, a), names[1]: figure(spec, b),
            "difference": {"value": d, "ci": [lo, hi], "of": f"{names[1]} − {names[0]}"}}


def _raws(specs: list[TaskSpec], state: dict[str, Any], part: Encoded) -> dict[str, np.ndarray]:
    return ModelBundle.in_memory(specs, state, {}).raw(part.head_x(), part.features) if len(part.x) else {}


def versus_builtin(specs: list[TaskSpec], heads_state: dict[str, Any], chosen: dict[str, dict],
                   matches: dict[str, BuiltinMatch], init: dict[str, dict], val: Encoded, test: Encoded,
                   tuned: bool = False, swap: bool = True) -> tuple[dict[str, Any], dict[str, dict]]:
    """Trained vs built-in per task a built-in answers (complete matches), on validation
    (the decision) and test (for the report).  A task that loses — or whose fit kept the
    untouched output layer — gets the output layer as its head, ``spec.prefer_builtin`` set
    (it reads the base network's features even where that network was tuned for others).
    ``tuned``: the heads are a fine-tuning's (the parts carry its features, ``head_x``);
    ``swap`` False: measured and recorded, nothing swapped (``TrainConfig.prefer_builtin``).
    Returns the heads' state (changed where the built-in ships) and a record per task."""
    records: dict[str, dict] = {}
    mine = [s for s in specs if s.name in matches and matches[s.name].complete and not s.open_set]
    if not mine:
        return heads_state, records
    trained_specs = [replace(s) for s in mine]
    builtin_specs = [replace(s, head=BUILTIN, features=matches[s.name].features, prefer_builtin=True) for s in mine]
    builtin_state = {f"{s.name}.{n}": p for s in mine for n, p in init[f"{s.name}@{matches[s.name].variant}"].items()}
    trained_state = {k: v for k, v in heads_state.items() if k.split(".", 1)[0] in {s.name for s in mine}}
    parts = {"val": val, "test": test}
    raw_t = {k: _raws(trained_specs, trained_state, p) for k, p in parts.items()}
    raw_b = {k: _raws(builtin_specs, builtin_state, p) for k, p in parts.items()}
    out = dict(heads_state)
    for s, sb in zip(mine, builtin_specs):
        m = matches[s.name]
        rec: dict[str, Any] = {"network": m.network, "metric": "accuracy" if s.kind == CLASSIFICATION else "mae"}
        faces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k, p in parts.items():
            if len(p.x):
                faces[k] = (per_face(sb, raw_b[k][s.name], p.y[s.name]), per_face(s, raw_t[k][s.name], p.y[s.name]))
                rec[k] = _compare(s, *faces[k], ("builtin", "trained"))
        untouched = not tuned and chosen[s.name]["head"] == BUILTIN and chosen[s.name]["best_epoch"] == -1
        wins = "val" in rec and beyond_chance(s, rec["val"]["difference"])
        if (untouched or not wins) and swap:
            rec["shipped"] = "builtin"
            rec["why"] = ("the untouched output layer had the lowest validation loss of every head tried"
                          if untouched else f"the trained head did not beat the built-in {m.network} network on "
                                            "validation beyond chance (paired 95 % interval of the difference "
                                            "not clear of 0)")
            for n in [k for k in out if k.split(".", 1)[0] == s.name]:
                del out[n]
            out.update({k: v for k, v in builtin_state.items() if k.split(".", 1)[0] == s.name})
            s.head, s.features, s.prefer_builtin = BUILTIN, m.features, True
        else:
            rec["shipped"] = "trained"
            rec["why"] = (f"the trained head beat the built-in {m.network} network on validation beyond chance"
                          if wins or untouched else "kept as asked (prefer_builtin off), though it did not beat "
                          f"the built-in {m.network} network on validation beyond chance")
        records[s.name] = rec
    return out, records


def frozen_vs_tuned(specs: list[TaskSpec], frozen: ModelBundle, tuned: ModelBundle, frozen_val: Encoded,
                    tuned_val: Encoded, frozen_test: Encoded, tuned_test: Encoded,
                    force: bool = False) -> tuple[bool, dict[str, dict]]:
    """Whether the tuned model is kept (its mean relative validation error — 1 − accuracy,
    or MAE / target std — is lower than the frozen one's; on a tie, its mean validation
    loss is) and a record per tuned task."""
    records, err_f, err_t, loss_f, loss_t = {}, [], [], [], []
    for k, (fp, tp) in {"val": (frozen_val, tuned_val), "test": (frozen_test, tuned_test)}.items():
        if not len(fp.x):
            continue
        rf, rt = frozen.raw(fp.head_x(), fp.features), tuned.raw(tp.head_x(), tp.features)
        for s in specs:
            a, b = per_face(s, rf[s.name], fp.y[s.name]), per_face(s, rt[s.name], tp.y[s.name])
            records.setdefault(s.name, {"metric": "accuracy" if s.kind == CLASSIFICATION else "mae"})[k] = \
                _compare(s, a, b, ("frozen", "tuned"))
            if k == "val" and len(a):
                scale = 1.0 if s.kind == CLASSIFICATION else max(s.std, 1e-6)
                err_f.append((1 - a.mean()) if s.kind == CLASSIFICATION else a.mean() / scale)
                err_t.append((1 - b.mean()) if s.kind == CLASSIFICATION else b.mean() / scale)
                loss_f.append(_loss(s, rf[s.name], fp.y[s.name]))
                loss_t.append(_loss(s, rt[s.name], tp.y[s.name]))
    ef, et = float(np.mean(err_f)) if err_f else 0.0, float(np.mean(err_t)) if err_t else 0.0
    wins = bool(err_t) and (et < ef - 1e-9 or (abs(et - ef) <= 1e-9 and np.mean(loss_t) < np.mean(loss_f)))
    keep = wins or force
    for rec in records.values():
        rec["shipped"] = "tuned" if keep else "frozen"
        if force and not wins:
            rec["forced"] = True     # TrainConfig.keep_tuned: measured, though it lost
    return keep, records


def _fmt(spec_metric: str, f: dict[str, Any]) -> str:
    if spec_metric == "accuracy":
        return f"{f['accuracy']:.1%} [{f['ci'][0]:.1%}, {f['ci'][1]:.1%}]"
    return f"MAE {f['mae']:.2f} [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]"


def _diff(spec_metric: str, d: dict[str, Any]) -> str:
    if spec_metric == "accuracy":
        return f"{d['value'] * 100:+.1f} pts [{d['ci'][0] * 100:+.1f}, {d['ci'][1] * 100:+.1f}]"
    return f"{d['value']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def builtin_line(task: str, rec: dict[str, Any]) -> str:
    """One summary line: both validation figures, their paired difference, what shipped."""
    v, mt = rec.get("val"), rec["metric"]
    figures = (f"built-in {_fmt(mt, v['builtin'])} vs trained {_fmt(mt, v['trained'])} on {v['builtin']['faces']} "
               f"validation faces (trained − built-in {_diff(mt, v['difference'])})") if v else "no validation faces"
    shipped = ("ships the BUILT-IN answer (prefer_builtin): " if rec["shipped"] == "builtin"
               else "ships the trained head: ")
    return f"{task} vs built-in {rec['network']}: {figures}; {shipped}{rec['why']}"


def tuned_line(task: str, rec: dict[str, Any]) -> str:
    v, mt = rec.get("val"), rec["metric"]
    figures = (f"frozen {_fmt(mt, v['frozen'])} vs tuned {_fmt(mt, v['tuned'])} on validation "
               f"(tuned − frozen {_diff(mt, v['difference'])})") if v else "no validation faces"
    return (f"{task} frozen vs tuned: {figures}; ships the {rec['shipped'].upper()} model"
            + (" (kept as asked, though it lost)" if rec.get("forced") else ""))
