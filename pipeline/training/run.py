"""The training job: read → embed (cached) → split → fit → calibrate → evaluate → write
the bundle, its metrics and its report."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc

from pipeline import storage, table
from pipeline.contract import NO_FACE, OK, UsageError
from pipeline.heads import ModelBundle
from pipeline.settings import Settings
from pipeline.training.calibration import calibrate, select_heads
from pipeline.training.config import TrainConfig
from pipeline.training.ddp import check_cluster, fit
from pipeline.training.embeddings import backbone_info, embed_labelled
from pipeline.training.evaluation import evaluate, stranger_metrics
from pipeline.training.outcome import Evaluation, TrainOutcome
from pipeline.training.split import Encoded, encode, make_specs, strata_for, stratified_split


def train(data_uri: str, output_uri: str, layout: str = "folders", task: str | None = None,
          cfg: TrainConfig | None = None, settings: Settings | None = None, cache_uri: str | None = None,
          unknown_uri: str | None = None, report: bool = True, keep_checkpoints: bool = False,
          log: Callable[[str], None] = print) -> TrainOutcome:
    """The whole training job; misuse raises ``UsageError`` before the fit where it can."""
    from pipeline.datasets import read_labelled

    cfg = cfg or TrainConfig()
    settings = settings or Settings()
    started = time.monotonic()
    check_cluster(cfg)
    storage.check_writable(output_uri)
    ls = read_labelled(data_uri, layout, task)
    log(f"{ls.table.num_rows} labelled photos in {data_uri} ({layout}), tasks {ls.tasks}")
    emb, embed_info = embed_labelled(ls.table, data_uri, settings, cache_uri, cfg.flip_tta, log)
    status = emb.column("status").to_pylist()
    errors: dict[str, int] = {}
    for st in status:
        if st not in (OK, NO_FACE):
            errors[st] = errors.get(st, 0) + 1
    no_face = status.count(NO_FACE)
    faces = int(pc.sum(emb.column("face_count")).as_py() or 0)
    usable = pc.is_valid(emb.column("main_face"))
    labelled = ls.table.filter(usable)
    specs = make_specs(ls.tasks, labelled, cfg.hidden, cfg.open_set)
    split = stratified_split(strata_for(labelled, ls.tasks), cfg.val_frac, cfg.test_frac, cfg.seed)
    enc = Encoded(table.embedding_matrix(emb.filter(usable).column("embedding")), encode(labelled, specs),
                  split, labelled.column("image_uri").to_pylist())
    tr, va, te = enc.part("train"), enc.part("val"), enc.part("test")
    if len(va.x) == 0:
        raise UsageError(f"validation split is empty ({len(enc.x)} usable photos): raise --val-frac")
    log(f"split (seed {cfg.seed}): train {len(tr.x)}, val {len(va.x)}, test {len(te.x)}")

    t_fit = time.monotonic()
    best, history, last = fit(tr, va, specs, cfg, f"{output_uri.rstrip('/')}/checkpoints", log)
    fit_seconds = time.monotonic() - t_fit
    heads_state, chosen = select_heads(specs, best)
    bundle, centroids, calib = calibrate(specs, heads_state, tr, va, cfg.target_frr)
    test_metrics, results = evaluate(bundle, te if len(te.x) else va)
    evaluation = Evaluation(specs, results, {s.name: tr.y[s.name] for s in specs}, history)
    metrics: dict[str, Any] = {
        "test": test_metrics, "open_set": calib, "heads": {k: v["head"] for k, v in chosen.items()},
        "selection": chosen, "epochs_run": len(history), "workers": cfg.workers,
        "resumed_from": last.get("resumed_from", -1),
        "rows_per_s_per_worker": float(np.median([h["rows_per_s_per_worker"] for h in history])) if history else 0.0,
        "split": {"train": len(tr.x), "val": len(va.x), "test": len(te.x)},
        "photos": ls.table.num_rows, "faces": faces, "no_face": no_face, "errors": errors,
        "fit_seconds": round(fit_seconds, 1)}
    if unknown_uri:
        metrics["unknown"], evaluation.strangers = stranger_metrics(bundle, unknown_uri, settings, cache_uri,
                                                                    cfg.flip_tta, log)
    extra = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "backbone": backbone_info(settings),
             "data": {"uri": data_uri, "layout": layout, "embedding_cache": embed_info.get("cache")},
             "training": asdict(cfg),
             "metrics": {"test": test_metrics, "open_set": calib, "heads": metrics["heads"]}}
    meta = ModelBundle.write(output_uri, specs, heads_state, centroids, extra)
    metrics["model_version"] = meta["model_version"]
    fs, out_path = storage.resolve(output_uri)
    with fs.open_output_stream(f"{out_path}/metrics.json") as f:
        f.write(json.dumps({**metrics, "history": history}, indent=2, default=_json_default).encode())
    outcome = TrainOutcome(output_uri, meta, metrics, ls.table.num_rows, faces, no_face, errors, ls.skipped,
                           embed_info, fit_seconds, evaluation)
    if report:
        from pipeline.reports import write_report

        outcome.report_uri = write_report(output_uri, outcome, settings, log)
    if not keep_checkpoints:
        try:
            fs.delete_dir(f"{out_path}/checkpoints")
        except OSError:
            pass
    log(f"done in {time.monotonic() - started:.1f} s")
    return outcome


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
