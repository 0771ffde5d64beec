"""The training job: read → embed (cached) → split → fit → calibrate → evaluate → write
the bundle, its metrics and its report.

Two ways in, branched once (``Examples``): labelled photos go through the scoring stages
(``embed_labelled``); named people (``--layout people``) bring their embeddings from the
prediction table they were clustered from, and their unnamed people as strangers for the
open-set calibration.  Everything after the split is the same for both."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage, table
from pipeline.contract import CLASSIFICATION, NO_FACE, OK, UsageError
from pipeline.heads import ModelBundle
from pipeline.settings import Settings
from pipeline.training.builtin import init_states, match_specs
from pipeline.training.calibration import calibrate, select_heads
from pipeline.training.config import TrainConfig
from pipeline.training.ddp import check_cluster, fit
from pipeline.training.embeddings import backbone_info, embedding_precision, embed_labelled
from pipeline.training.evaluation import evaluate, open_set_rates, stranger_metrics
from pipeline.training.outcome import Evaluation, TrainOutcome
from pipeline.training.split import Encoded, encode, make_specs, strata_for, stratified_split
from pipeline.training.versus import builtin_line, frozen_vs_tuned, versus_builtin


@dataclass
class Examples:
    """What the fit reads, whatever the layout: one row per example face, its embedding and
    labels, and what the summary says about where they came from."""

    table: pa.Table                     # image_uri, one column per task
    tasks: list[tuple[str, str]]
    x: np.ndarray                       # N×128 unit embeddings
    photos: int
    faces: int
    no_face: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    embed_info: dict[str, Any] = field(default_factory=dict)
    face_index: np.ndarray | None = None   # None: each photo's main face
    strangers: Encoded | None = None       # people layout: unnamed faces, split val/test
    data_lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)   # model.json "data" beyond uri/layout
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json entries of the source
    features: dict[str, np.ndarray] = field(default_factory=dict)  # attribute features (N×d) by name
    chips: np.ndarray | None = None        # N×S×S×3 main chips (fine-tuning)


def wanted_features(tasks: list[tuple[str, str]], cfg: TrainConfig) -> tuple[str, ...]:
    """The attribute feature sets some head could read: those of ``cfg.features`` when a task
    is not open-set (open-set tasks stay on the identity embedding); none otherwise, so an
    identity-only training never runs the attribute networks."""
    from pipeline.heads import IDENTITY, default_open_set
    from pipeline.training.split import parse_features

    rejecting = set(cfg.open_set) if cfg.open_set is not None else {n for n, _ in tasks if default_open_set(n)}
    if all(n in rejecting for n, _ in tasks):
        return ()
    return tuple(f for f in parse_features(cfg.features) if f != IDENTITY)


def _from_photos(data_uri: str, layout: str, task: str | None, settings: Settings, cache_uri: str | None,
                 cfg: TrainConfig, log: Callable[[str], None]) -> Examples:
    """Labelled photos: the scoring stages' main face per photo, embedded (cached), with
    the attribute features some head could read."""
    from pipeline.datasets import read_labelled
    from pipeline.geometry import DLIB_CHIP
    from pipeline.training.evaluation import feature_columns

    from pipeline.training.builtin import match_table

    ls = read_labelled(data_uri, layout, task)
    log(f"{ls.table.num_rows} labelled photos in {data_uri} ({layout}), tasks {ls.tasks}")
    # a task a built-in network answers also reads that network's output-layer features
    outputs = {m.features for m in match_table(ls.tasks, ls.table, cfg.open_set).values()}
    features = tuple(dict.fromkeys([*wanted_features(ls.tasks, cfg), *sorted(outputs)]))
    tune = cfg.finetune != "none"
    emb, embed_info = embed_labelled(ls.table, data_uri, settings, cache_uri, cfg.flip_tta, log, features, tune)
    status = emb.column("status").to_pylist()
    errors: dict[str, int] = {}
    for st in status:
        if st not in (OK, NO_FACE):
            errors[st] = errors.get(st, 0) + 1
    usable = pc.is_valid(emb.column("main_face"))
    rows = emb.filter(usable)
    return Examples(ls.table.filter(usable), ls.tasks, table.embedding_matrix(rows.column("embedding")),
                    ls.table.num_rows, int(pc.sum(emb.column("face_count")).as_py() or 0), status.count(NO_FACE),
                    errors, ls.skipped, embed_info, data={"embedding_cache": embed_info.get("cache")},
                    features=feature_columns(rows, features),
                    chips=table.chip_matrix(rows.column("chip"), DLIB_CHIP.size) if tune else None)


def _from_people(people_uri: str, names_uri: str, task: str | None, seed: int,
                 log: Callable[[str], None], layout: str = "people", labels_uri: str | None = None) -> Examples:
    """Named people (or, layout labels, the labels log's named faces of a table): their faces'
    embeddings read from the table, strangers beside (pipeline/training/people.py)."""
    from pipeline.training.people import read_named

    name = task or "identity"
    named = read_named(layout, people_uri, names_uri, labels_uri, name, seed, log)
    lines = named.lines(names_uri)
    log("\n".join(lines))
    n_photos = len(pc.unique(named.table.column("image_uri")))
    return Examples(named.table, [(name, CLASSIFICATION)], named.x, n_photos, named.table.num_rows,
                    embed_info={"embedded": 0, "source_table": named.source_table},
                    face_index=named.face_index, strangers=named.strangers, data_lines=lines,
                    data={"names": names_uri or None, "labels": labels_uri, "source_table": named.source_table},
                    metrics={"people": {"named_people": named.named_people, "faces": named.table.num_rows,
                                        "photos": n_photos, "stranger_people": named.stranger_people,
                                        "stranger_faces": named.stranger_faces,
                                        "faces_without_embedding": named.missing}})


def train(data_uri: str, output_uri: str, layout: str = "folders", task: str | None = None,
          cfg: TrainConfig | None = None, settings: Settings | None = None, cache_uri: str | None = None,
          unknown_uri: str | None = None, report: bool = True, keep_checkpoints: bool = False,
          log: Callable[[str], None] = print, names_uri: str | None = None,
          labels_uri: str | None = None) -> TrainOutcome:
    """The whole training job; misuse raises ``UsageError`` before the fit where it can.

    ``layout`` people: ``data_uri`` is a cluster_faces.py output and ``names_uri`` its
    ``person,name`` CSV (nothing is embedded); any other layout is labelled photos."""
    from pipeline.training import finetune
    from pipeline.training.people import check_flags

    cfg = cfg or TrainConfig()
    settings = settings or Settings()
    started = time.monotonic()
    check_flags(layout, names_uri, labels_uri)
    finetune.check_flags(cfg.finetune, layout, cfg.features)
    check_cluster(cfg)
    storage.check_writable(output_uri)
    if cfg.features != "identity":
        from pipeline.training.split import parse_features

        parse_features(cfg.features)   # a bad --features answers before the embedding pass
    if layout in ("people", "labels"):
        cfg = replace(cfg, features="identity")   # the people and labels layouts bring embeddings only
        ex = _from_people(data_uri, names_uri or "", task, cfg.seed, log, layout, labels_uri)
    else:
        ex = _from_photos(data_uri, layout, task, settings, cache_uri, cfg, log)
    labelled = ex.table
    specs = make_specs(ex.tasks, labelled, cfg.hidden, cfg.open_set)
    split = stratified_split(strata_for(labelled, ex.tasks), cfg.val_frac, cfg.test_frac, cfg.seed)
    enc = Encoded(ex.x, encode(labelled, specs), split, labelled.column("image_uri").to_pylist(), ex.face_index,
                  ex.features, ex.chips)
    tr, va, te = enc.part("train"), enc.part("val"), enc.part("test")
    if len(va.x) == 0:
        raise UsageError(f"validation split is empty ({len(enc.x)} usable examples): raise --val-frac")
    log(f"split (seed {cfg.seed}): train {len(tr.x)}, val {len(va.x)}, test {len(te.x)}")

    matches = match_specs(specs)
    for m in matches.values():
        log(m.describe())
    init = init_states(specs, matches, tr.features, settings.cache_dir)
    t_fit = time.monotonic()
    best, history, last = fit(tr, va, specs, cfg, f"{output_uri.rstrip('/')}/checkpoints", log, init=init)
    fit_seconds = time.monotonic() - t_fit
    heads_state, chosen = select_heads(specs, best)
    tuned_weights: dict[str, bytes] = {}
    tuning: dict[str, Any] = {}
    if cfg.finetune != "none":
        tuned_weights, heads_state, tuning, enc = _fine_tune(enc, specs, best, chosen, heads_state, cfg, settings,
                                                             output_uri, log)
        tr, va, te = enc.part("train"), enc.part("val"), enc.part("test")
        fit_seconds = time.monotonic() - t_fit
    # the model kept so far (frozen or tuned) against the built-in networks, on the same faces
    heads_state, versus = versus_builtin(specs, heads_state, chosen, matches, init, va, te, bool(tuned_weights),
                                         swap=cfg.prefer_builtin)
    for name, rec in versus.items():
        log(builtin_line(name, rec))
    tuned_weights = _read_networks(tuned_weights, specs, log)
    s_val = ex.strangers.part("val") if ex.strangers is not None else None
    bundle, centroids, calib = calibrate(specs, heads_state, tr, va, cfg.target_frr, s_val)
    tuned = tuned_weights.get("identity")
    networks = {k: v for k, v in tuned_weights.items() if k != "identity"}
    if tuned_weights:  # what scoring will run: the heads on the tuned networks' outputs
        bundle = ModelBundle.in_memory(specs, heads_state, centroids, tuned, networks)
    test_metrics, results = evaluate(bundle, te if len(te.x) else va)
    evaluation = Evaluation(specs, results, {s.name: tr.y[s.name] for s in specs}, history)
    metrics: dict[str, Any] = {
        "test": test_metrics, "open_set": calib, "heads": {k: v["variant"] for k, v in chosen.items()},
        "features": {k: v["features"] for k, v in chosen.items()},
        "selection": chosen, "epochs_run": len(history), "workers": cfg.workers,
        "resumed_from": last.get("resumed_from", -1),
        "rows_per_s_per_worker": float(np.median([h["rows_per_s_per_worker"] for h in history])) if history else 0.0,
        "split": {"train": len(tr.x), "val": len(va.x), "test": len(te.x)},
        "photos": ex.photos, "faces": ex.faces, "no_face": ex.no_face, "errors": ex.errors,
        "fit_seconds": round(fit_seconds, 1), **ex.metrics, **({"finetune": tuning} if tuning else {}),
        **({"builtin": versus} if versus else {}),
        **({"builtin_match": {k: asdict(m) for k, m in matches.items()}} if matches else {})}
    if ex.strangers is not None:
        people = ex.metrics["people"]
        metrics["strangers"], evaluation.strangers = open_set_rates(
            bundle, va, te if len(te.x) else va, ex.strangers, people["stranger_people"], people["stranger_faces"],
            cfg.target_frr)
    if unknown_uri:
        metrics["unknown"], evaluation.strangers = stranger_metrics(bundle, unknown_uri, settings, cache_uri,
                                                                    cfg.flip_tta, log)
    extra = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "backbone": {**backbone_info(settings), "precision": embedding_precision(settings)},
             "data": {"uri": data_uri, "layout": layout, **ex.data},
             "training": asdict(cfg),
             **({"finetune": {"mode": cfg.finetune, "best_epoch": tuning["best_epoch"]}} if tuned_weights else {}),
             **({"prefer_builtin": sorted(k for k, r in versus.items() if r["shipped"] == "builtin")}
                if versus else {}),
             "metrics": {"test": test_metrics, "open_set": calib, "heads": metrics["heads"],
                         **({"strangers": metrics["strangers"]} if "strangers" in metrics else {})}}
    meta = ModelBundle.write(output_uri, specs, heads_state, centroids, extra, backbone=tuned, networks=networks)
    metrics["model_version"] = meta["model_version"]
    fs, out_path = storage.resolve(output_uri)
    with fs.open_output_stream(f"{out_path}/metrics.json") as f:
        f.write(json.dumps({**metrics, "history": history}, indent=2, default=_json_default).encode())
    outcome = TrainOutcome(output_uri, meta, metrics, ex.photos, ex.faces, ex.no_face, ex.errors, ex.skipped,
                           ex.embed_info, fit_seconds, evaluation, data_lines=ex.data_lines)
    if report:
        from pipeline.training.report import write_report

        outcome.report_uri = write_report(output_uri, outcome, settings, log)
    if not keep_checkpoints:
        try:
            fs.delete_dir(f"{out_path}/checkpoints")
        except OSError:
            pass
    log(f"done in {time.monotonic() - started:.1f} s")
    return outcome


def _fine_tune(enc: Encoded, specs: list, best: dict, chosen: dict, heads_state: dict, cfg: TrainConfig,
               settings: Settings, output_uri: str, log: Callable[[str], None]
               ) -> tuple[dict[str, bytes], dict, dict[str, Any], Encoded]:
    """Step 2 of the recipe: the networks the chosen heads read (the identity backbone, an
    attribute network, or both) tuned with those heads; every example's inputs made again
    by the tuned networks through ``Embedder`` / ``AttributeNets`` (the networks and pixels
    scoring will use); and the tuned model kept only when it beats the frozen one on
    validation (``versus.frozen_vs_tuned``): a worse tuned model never ships.  Returns the
    tuned weights by network (``identity`` or an attribute name; empty: the frozen fit
    ships), the heads' state, what happened, and the examples as the bundle sees them."""
    from pipeline.attributes import AttributeNets
    from pipeline.embed import Embedder
    from pipeline.training.finetune import finetune, networks_read
    from pipeline.training.versus import frozen_vs_tuned, tuned_line

    tr, va, te = enc.part("train"), enc.part("val"), enc.part("test")
    frozen, _, _ = calibrate(specs, heads_state, tr, va, cfg.target_frr)
    frozen_test, _ = evaluate(frozen, te if len(te.x) else va)
    identity, networks = networks_read(specs)
    info: dict[str, Any] = {"mode": cfg.finetune, "frozen_test": frozen_test,
                            "networks": (["identity"] if identity else []) + networks}
    init = {f"{s.name}@{chosen[s.name]['variant']}": best[f"{s.name}@{chosen[s.name]['variant']}"]["state"]
            for s in specs}
    t0 = time.monotonic()
    weights, heads, history, last = finetune(tr, va, specs, init, cfg, settings.weights,
                                             f"{output_uri.rstrip('/')}/checkpoints", log, settings.cache_dir)
    seconds = time.monotonic() - t0
    x = Embedder(weights["identity"], precision=settings.precision)(enc.chips) if identity else enc.x
    tuned_nets = {k: v for k, v in weights.items() if k != "identity"}
    if tuned_nets:   # the tuned networks' feature sets ride beside the base ones (Encoded.head_x)
        from pipeline.attributes import FEATURE_NETWORK

        out = AttributeNets(precision=settings.precision, cache_dir=settings.cache_dir, tuned=tuned_nets).run(enc.chips)
        tuned_feats = {k: out.features[k] for k in enc.features if FEATURE_NETWORK[k] in tuned_nets}
    else:
        tuned_feats = {}
    tuned_enc = replace(enc, x=x, tuned=tuned_feats)
    ttr, tva, tte = tuned_enc.part("train"), tuned_enc.part("val"), tuned_enc.part("test")
    tuned_bundle, _, _ = calibrate(specs, heads, ttr, tva, cfg.target_frr)
    keep, records = frozen_vs_tuned(specs, frozen, tuned_bundle, va, tva, te, tte, force=cfg.keep_tuned)
    info.update({"epochs_run": len(history), "best_epoch": last["best_epoch"], "seconds": round(seconds, 1),
                 "history": history, "versus_frozen": records, "kept": "tuned" if keep else "frozen",
                 "chips_per_s_per_worker": float(np.median([h["rows_per_s_per_worker"] for h in history]))})
    log(f"fine-tuned ({cfg.finetune}: {', '.join(info['networks'])}) in {seconds:.1f} s, "
        f"best epoch {last['best_epoch'] + 1} of {len(history)}")
    for name, rec in records.items():
        log(tuned_line(name, rec))
    if not keep:
        return {}, heads_state, info, enc
    return weights, heads, info, tuned_enc


def _read_networks(weights: dict[str, bytes], specs: list, log: Callable[[str], None]) -> dict[str, bytes]:
    """The tuned networks some shipped head reads (a prefer_builtin head reads the base
    network: a network tuned for it alone is left out of the bundle)."""
    from pipeline.attributes import FEATURE_NETWORK
    from pipeline.heads import IDENTITY

    read = {IDENTITY if s.features == IDENTITY else FEATURE_NETWORK[s.features] for s in specs if not s.prefer_builtin}
    for k in sorted(set(weights) - read):
        log(f"tuned {k} network left out of the bundle: no shipped head reads it")
    return {k: v for k, v in weights.items() if k in read}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
