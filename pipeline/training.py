"""Training the heads: embedding pass (+ Parquet cache), split, Ray Train DDP fit, open-set
calibration, evaluation, and the bundle.

* **Embedding pass** — the labelled manifest goes through the scoring job's own stages
  (``CropStage`` → ``EmbedStage`` on Ray Data actor pools).  Each photo contributes its
  **main face** (``pipeline.faces.main_face_index``: the face the photo is "of"); photos
  without a face or with an error are counted and reported, never used silently.  Results
  are cached as Parquet under ``<cache>/<key>.parquet``, key = data URI + backbone +
  detector settings; rows are matched by (image_uri, size), so a retrain with other
  settings, or on a grown set, embeds only what is new.
* **Split** — seeded, stratified on the first classification task (or regression
  quintiles), sizes from ``val_frac``/``test_frac``; every class keeps ≥ 1 training face.
* **Fit** — ``TorchTrainer`` with one head per task on the shared embedding.  With
  ``head="auto"`` a linear and an MLP head are trained side by side in the same run
  (disjoint parameters, so they do not interact) and the better one on validation is kept
  per task.  Cross-entropy with class weights (inverse frequency) for classes, Huber on
  standardised targets for regression (plus a Laplace scale for the score); a missing
  label is masked out of its task's loss.  Early stopping on validation, a checkpoint per
  epoch to the bundle's storage, ``FailureConfig(max_failures)`` resumes a killed worker
  from the last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.heads import (CLASSIFICATION, EMBEDDING_DIM, ModelBundle, TaskSpec,
                            calibrate_open_set, class_centroids, default_open_set, regression_scale)
from pipeline.settings import Settings

EMBED_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("face_count", pa.int32()),
    pa.field("main_face", pa.int32()),                       # null: no usable face
    pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),
])


class UsageError(ValueError):
    """Flags that cannot work on this cluster (e.g. --use-gpu without GPUs)."""


# ---------------------------------------------------------------- embedding pass + cache


def backbone_info(settings: Settings) -> dict[str, Any]:
    """Backbone id, weights hash and chip geometry: recorded in the bundle and keying the
    cache (by content, so other weights under the same file name never reuse embeddings)."""
    from pipeline.backbone import DLIB_RESNET, read_weights_bytes

    data, _ = read_weights_bytes(settings.weights)
    geo = DLIB_RESNET.geometry
    return {"id": DLIB_RESNET.id, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "geometry": {"size": geo.size, "net_input": geo.net_input,
                         "template_norm": [list(p) for p in geo.template_norm]}}


def cache_key(data_uri: str, settings: Settings, flip_tta: bool) -> str:
    detector = {"det_max_side": settings.det_max_side, "det_score": settings.det_score,
                "det_score_large": settings.det_score_large, "min_face": settings.min_face,
                "model": settings.detector_model}
    blob = json.dumps({"data": data_uri.rstrip("/"), "backbone": backbone_info(settings),
                       "detector": detector, "flip": flip_tta}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def main_faces(face_rows: pa.Table) -> pa.Table:
    """Prediction-table rows (one per face) → one row per photo with its main face."""
    from pipeline.faces import Face, main_face_index

    rows = face_rows.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    uris = rows.column("image_uri").to_pylist()
    status = rows.column("status").to_pylist()
    error = rows.column("error").to_pylist()
    count = rows.column("face_count").to_pylist()
    width, height = rows.column("width").to_pylist(), rows.column("height").to_pylist()
    bbox = rows.column("bbox").to_pylist()
    lms = rows.column("landmarks").to_pylist()
    det = rows.column("det_score").to_pylist()
    emb_col = rows.column("embedding").combine_chunks()
    out: dict[str, list] = {k: [] for k in ("image_uri", "status", "error", "face_count", "main_face", "row")}
    i = 0
    while i < len(uris):
        j = i
        while j < len(uris) and uris[j] == uris[i]:
            j += 1
        main, row = None, None
        if count[i] and status[i] == "ok":
            faces = [Face(np.array([bbox[k][c] for c in "xywh"], np.float32),
                          np.asarray(lms[k], np.float32).reshape(5, 2), float(det[k])) for k in range(i, j)]
            main = int(main_face_index(faces, width[i], height[i]))
            row = i + main
        for k, v in (("image_uri", uris[i]), ("status", status[i]), ("error", error[i]),
                     ("face_count", count[i] or 0), ("main_face", main), ("row", row)):
            out[k].append(v)
        i = j
    valid = np.array([r is not None for r in out["row"]], bool)
    mat = np.zeros((len(valid), EMBEDDING_DIM), np.float32)
    if valid.any():
        taken = emb_col.take(pa.array([r for r in out["row"] if r is not None], pa.int64()))
        mat[valid] = embedding_matrix(taken)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel(), pa.float32()), EMBEDDING_DIM,
                                            mask=pa.array(~valid))
    return pa.table({"image_uri": pa.array(out["image_uri"], pa.string()),
                     "status": pa.array(out["status"], pa.string()),
                     "error": pa.array(out["error"], pa.string()),
                     "face_count": pa.array(out["face_count"], pa.int32()),
                     "main_face": pa.array(out["main_face"], pa.int32()),
                     "embedding": emb})


def run_stages(manifest: pa.Table, data_uri: str, settings: Settings, flip_tta: bool = False,
               log: Callable[[str], None] = print) -> pa.Table:
    """CropStage → EmbedStage on Ray Data actor pools (the scoring job's stages), face rows back."""
    import ray

    from pipeline.resources import plan_resources
    from pipeline.stages import face_dataset

    plan = plan_resources(ray.cluster_resources())
    log(f"embedding {manifest.num_rows} photos: {plan.describe()}")
    ds = face_dataset(manifest, data_uri, settings, plan, flip_tta=flip_tta)
    parts = ray.get(ds.to_arrow_refs())
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else pa.table({})


def embed_labelled(manifest: pa.Table, data_uri: str, settings: Settings, cache_uri: str | None,
                   flip_tta: bool = False, log: Callable[[str], None] = print) -> tuple[pa.Table, dict]:
    """Main-face embeddings for every photo of ``manifest`` (manifest order), via the cache."""
    key = cache_key(data_uri, settings, flip_tta)
    cached = None
    cache_file = None
    if cache_uri:
        fs, cpath = storage.resolve(cache_uri)
        cache_file = f"{cpath}/{key}.parquet"
        try:
            import pyarrow.parquet as pq

            with fs.open_input_file(cache_file) as f:
                cached = pq.read_table(f).cast(EMBED_SCHEMA)
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            cached = None
    want = manifest.select(["image_uri", "size"])
    if cached is not None:
        have = set(zip(cached.column("image_uri").to_pylist(), cached.column("size").to_pylist()))
        todo_mask = [(u, s) not in have for u, s in zip(want.column("image_uri").to_pylist(),
                                                        want.column("size").to_pylist())]
        todo = want.filter(pa.array(todo_mask))
    else:
        todo = want
    info = {"cache": f"{cache_uri.rstrip('/')}/{key}.parquet" if cache_uri else None,
            "embedded": todo.num_rows, "from_cache": want.num_rows - todo.num_rows}
    if todo.num_rows:
        t0 = time.monotonic()
        rows = run_stages(todo, data_uri, settings, flip_tta, log)
        new = main_faces(rows)
        sizes = dict(zip(todo.column("image_uri").to_pylist(), todo.column("size").to_pylist()))
        new = new.append_column("size", pa.array([sizes[u] for u in new.column("image_uri").to_pylist()], pa.int64()))
        new = new.select(EMBED_SCHEMA.names).cast(EMBED_SCHEMA)
        info["embed_seconds"] = round(time.monotonic() - t0, 1)
        log(f"embedded {todo.num_rows} photos in {info['embed_seconds']} s")
        if cached is not None:
            uris = pa.array(sorted(set(new.column("image_uri").to_pylist())), pa.string())
            cached = cached.filter(pc.invert(pc.is_in(cached.column("image_uri"), uris)))
            cached = pa.concat_tables([cached, new])
        else:
            cached = new
        if cache_file:
            import pyarrow.parquet as pq

            fs.create_dir(os.path.dirname(cache_file) if not storage.is_s3(cache_uri) else cpath, recursive=True)
            with fs.open_output_stream(cache_file) as f:
                pq.write_table(cached, f)
    else:
        log(f"all {want.num_rows} photos found in the embedding cache {info['cache']}")
    # manifest order, newest cached row per (uri, size)
    idx = {(u, s): i for i, (u, s) in enumerate(zip(cached.column("image_uri").to_pylist(),
                                                     cached.column("size").to_pylist()))}
    order = [idx[(u, s)] for u, s in zip(want.column("image_uri").to_pylist(), want.column("size").to_pylist())]
    return cached.take(pa.array(order, pa.int64())), info


# ---------------------------------------------------------------- split + encoding


def stratified_split(strata: list[str], val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """'train'/'val'/'test' per row; every stratum keeps at least one training row."""
    rng = np.random.default_rng(seed)
    out = np.array(["train"] * len(strata), dtype=object)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    carry_v = carry_t = 0.0  # carry rounding remainders so small strata add up to the fractions
    for s in sorted(groups):
        idx = np.array(groups[s])
        rng.shuffle(idx)
        n = len(idx)
        want_t, want_v = n * test_frac + carry_t, n * val_frac + carry_v
        n_t, n_v = int(round(want_t)), int(round(want_v))
        while n_t + n_v > n - 1 and (n_t or n_v):  # keep one for training
            if n_t >= n_v and n_t:
                n_t -= 1
            else:
                n_v -= 1
        carry_t, carry_v = want_t - n_t, want_v - n_v
        out[idx[:n_t]] = "test"
        out[idx[n_t:n_t + n_v]] = "val"
    return out


def strata_for(table: pa.Table, tasks: list[tuple[str, str]]) -> list[str]:
    cls = [n for n, k in tasks if k == CLASSIFICATION]
    if cls:
        return [str(v) for v in table.column(cls[0]).to_pylist()]
    vals = np.asarray(table.column(tasks[0][0]).to_numpy(zero_copy_only=False), np.float64)
    finite = vals[np.isfinite(vals)]
    edges = np.quantile(finite, [0.2, 0.4, 0.6, 0.8]) if len(finite) else []
    return [("nan" if not np.isfinite(v) else str(int(np.searchsorted(edges, v)))) for v in vals]


@dataclass
class Encoded:
    """Embeddings and per-task targets (-1 / NaN = missing) of the usable rows."""

    x: np.ndarray
    y: dict[str, np.ndarray]
    split: np.ndarray
    uris: list[str]

    def part(self, name: str) -> "Encoded":
        m = self.split == name
        return Encoded(self.x[m], {k: v[m] for k, v in self.y.items()}, self.split[m],
                       [u for u, keep in zip(self.uris, m) if keep])


def encode(table: pa.Table, specs: list[TaskSpec]) -> dict[str, np.ndarray]:
    y = {}
    for s in specs:
        col = table.column(s.name)
        if s.kind == CLASSIFICATION:
            lut = {lab: i for i, lab in enumerate(s.labels)}
            y[s.name] = np.array([lut.get(v, -1) if v is not None else -1 for v in col.to_pylist()], np.int64)
        else:
            y[s.name] = np.array([np.nan if v is None else v for v in col.to_pylist()], np.float32)
    return y


def embedding_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, EMBEDDING_DIM)


# ---------------------------------------------------------------- the Ray Train loop


def task_losses(out: dict, ys: dict, specs: list[TaskSpec], variants: list[str], class_w: dict,
                huber_delta: float, weighted: bool = True) -> dict:
    """Loss per ``task@variant``; a row without a label for a task adds nothing to it.

    Classification: class-weighted cross-entropy (label -1 = missing).  Regression: Huber
    on the standardised target (NaN = missing) plus a Laplace NLL for the scale output,
    computed on the detached residual so it does not pull the value.
    """
    import torch
    import torch.nn.functional as F

    res = {}
    for s in specs:
        y = ys[s.name]
        for v in variants:
            o = out[f"{s.name}@{v}"]
            if s.kind == CLASSIFICATION:
                mask = y >= 0
                w = class_w[s.name] if weighted else torch.ones(len(s.labels))
                safe = y.clamp(min=0)
                per = F.cross_entropy(o, safe, weight=w, reduction="none")
                denom = (w[safe] * mask).sum()
                res[f"{s.name}@{v}"] = torch.where(mask, per, torch.zeros_like(per)).sum() / denom.clamp(min=1e-8)
            else:
                mask = torch.isfinite(y)
                t = torch.where(mask, (y - s.mean) / s.std, torch.zeros_like(y))
                value, b = o[:, 0], F.softplus(o[:, 1]) + 1e-3
                per = F.huber_loss(value, t, delta=huber_delta, reduction="none")
                per = per + (t - value).abs().detach() / b + torch.log(b)
                res[f"{s.name}@{v}"] = torch.where(mask, per, torch.zeros_like(per)).sum() / mask.sum().clamp(min=1)
    return res



def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: DDP over the shard, full validation, checkpoint per epoch."""
    import copy

    import ray.train
    import ray.train.torch
    import torch

    from pipeline.heads import TaskSpec, build_heads

    specs = [TaskSpec.from_json(d) for d in config["specs"]]
    variants: list[str] = config["variants"]
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    class MultiHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = build_heads(specs, variants)

        def forward(self, x):
            return {k: h(x) for k, h in self.heads.items()}

    model = MultiHead()
    ddp = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    class_w = {k: torch.tensor(v, dtype=torch.float32) for k, v in config["class_weights"].items()}
    task_w = config["task_weights"]
    huber = config["huber_delta"]

    def losses(out: dict, ys: dict, weighted: bool = True) -> dict:
        return task_losses(out, ys, specs, variants, class_w, huber, weighted)

    def to_tensors(batch: dict) -> tuple[torch.Tensor, dict]:
        x = torch.as_tensor(np.asarray(batch["x"]), dtype=torch.float32)
        ys = {}
        for s in specs:
            arr = np.asarray(batch[f"y_{s.name}"])
            ys[s.name] = torch.as_tensor(arr, dtype=torch.int64 if s.kind == CLASSIFICATION else torch.float32)
        return x, ys

    val_x, val_y = to_tensors(config["val"])
    start_epoch, resumed_from = 0, -1
    best: dict[str, dict] = {}
    history: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        best, history = st["best"], st["history"]
        start_epoch = resumed_from = st["epoch"] + 1

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        t0, seen, total = time.monotonic(), 0, 0.0
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                                        local_shuffle_buffer_size=config["shuffle_buffer"]):
            x, ys = to_tensors(batch)
            parts = losses(ddp(x), ys)
            loss = sum(task_w.get(k.split("@")[0], 1.0) * v for k, v in parts.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
            total += float(loss.detach()) * len(x)
        train_s = time.monotonic() - t0
        model.eval()
        with torch.no_grad():
            out = model(val_x)
            vloss = losses(out, val_y, weighted=False)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(seen, 1),
                                   "rows_per_s_per_worker": seen / max(train_s, 1e-9),
                                   "world_size": world, "resumed_from": resumed_from}
        for s in specs:
            y = val_y[s.name]
            for v in variants:
                k = f"{s.name}@{v}"
                o = out[k]
                if s.kind == CLASSIFICATION:
                    m = y >= 0
                    acc = float((o.argmax(1)[m] == y[m]).float().mean()) if m.any() else float("nan")
                    crit = float(vloss[k])
                    metrics[f"val_{k}_acc"] = acc
                else:
                    m = torch.isfinite(y)
                    mae = float(((o[:, 0] * s.std + s.mean)[m] - y[m]).abs().mean()) if m.any() else float("nan")
                    crit = mae / s.std
                    metrics[f"val_{k}_mae"] = mae
                metrics[f"val_{k}_loss"] = float(vloss[k])
                if k not in best or crit < best[k]["crit"] - 1e-5:
                    best[k] = {"crit": crit, "epoch": epoch,
                               "state": copy.deepcopy({n: p.detach().clone() for n, p in
                                                       model.heads[k].state_dict().items()})}
        history.append({k: v for k, v in metrics.items()})
        last_best = max(b["epoch"] for b in best.values())
        stop = (epoch - last_best >= config["patience"]) or epoch == config["epochs"] - 1
        if world > 1:  # every rank must take the same decision (report is a barrier)
            import torch.distributed as dist

            flag = torch.tensor([1.0 if stop else 0.0])
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        metrics["stopped"] = stop
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                            "best": best, "history": history}, os.path.join(d, "train_state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
        if stop:
            break


# ---------------------------------------------------------------- driver side


@dataclass
class TrainConfig:
    workers: int = 2
    use_gpu: bool = False
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 8
    head: str = "auto"                  # linear | mlp | auto (train both, keep the better per task)
    hidden: int = 256
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0
    task_weights: dict[str, float] = field(default_factory=dict)
    open_set: list[str] | None = None   # tasks with "unknown" rejection; None: identity-like names
    target_frr: float = 0.02            # share of known validation faces the open set may reject
    huber_delta: float = 0.2            # in target standard deviations
    max_failures: int = 2
    flip_tta: bool = False
    shuffle_buffer: int = 1024


@dataclass
class TrainOutcome:
    bundle_uri: str
    meta: dict
    metrics: dict
    photos: int
    faces: int
    no_face: int
    errors: dict[str, int]
    skipped: dict[str, int]
    embed_info: dict
    fit_seconds: float
    report_uri: str | None = None
    tables: dict = field(default_factory=dict)   # test/unknown predictions for the report

    def lines(self) -> list[str]:
        out = [f"photos read:   {self.photos}" + (f" (files skipped: {self.skipped})" if self.skipped else ""),
               f"faces found:   {self.faces} in {self.photos - self.no_face - sum(self.errors.values())} photos "
               f"(main face used per photo)",
               f"no face:       {self.no_face} photos (not used for training)",
               f"errors:        {', '.join(f'{k} {v}' for k, v in sorted(self.errors.items())) or 'none'}",
               f"embeddings:    {self.embed_info.get('embedded', 0)} computed, "
               f"{self.embed_info.get('from_cache', 0)} from cache {self.embed_info.get('cache') or '(no cache)'}",
               f"fit:           {self.fit_seconds:.1f} s, {self.metrics.get('epochs_run')} epochs on "
               f"{self.metrics.get('workers')} worker(s), heads {self.metrics.get('heads')}"]
        for task, m in self.metrics.get("test", {}).items():
            parts = [f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float))]
            out.append(f"test {task}: " + ", ".join(parts))
        if "unknown" in self.metrics:
            out.append("unknown faces: " + ", ".join(f"{t} rejected {v['rejected']:.1%} of {v['faces']}"
                                                     for t, v in self.metrics["unknown"].items()))
        out.append(f"model:         {self.bundle_uri} (version {self.meta['model_version']})")
        if self.report_uri:
            out.append(f"report:        {self.report_uri}")
        return out


def check_cluster(cfg: TrainConfig) -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    if cfg.use_gpu and res.get("GPU", 0) < cfg.workers:
        raise UsageError(f"--use-gpu needs {cfg.workers} GPU(s) but the cluster has {res.get('GPU', 0):g}; "
                         "drop --use-gpu to train on CPUs")
    if cfg.workers < 1:
        raise UsageError("--workers must be at least 1")
    return res


def fit(train: Encoded, val: Encoded, specs: list[TaskSpec], cfg: TrainConfig, storage_uri: str,
        log: Callable[[str], None] = print) -> tuple[dict, list[dict], dict]:
    """One Ray Train run; returns the best state per task@variant, the history, last metrics."""
    import ray
    import torch
    from ray.data.extensions import ArrowTensorArray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = check_cluster(cfg)
    variants = ["linear", "mlp"] if cfg.head == "auto" else [cfg.head]
    class_weights = {}
    for s in specs:
        if s.kind == CLASSIFICATION:
            y = train.y[s.name]
            counts = np.bincount(y[y >= 0], minlength=len(s.labels)).astype(np.float64)
            w = np.where(counts > 0, counts.sum() / (len(s.labels) * np.maximum(counts, 1)), 0.0)
            class_weights[s.name] = w.tolist()
    cols = {"x": ArrowTensorArray.from_numpy(train.x.astype(np.float32))}
    cols.update({f"y_{k}": pa.array(v) for k, v in train.y.items()})
    ds = ray.data.from_arrow(pa.table(cols))
    config = {"specs": [s.to_json() for s in specs], "variants": variants, "seed": cfg.seed,
              "lr": cfg.lr, "weight_decay": cfg.weight_decay, "class_weights": class_weights,
              "task_weights": cfg.task_weights, "huber_delta": cfg.huber_delta, "epochs": cfg.epochs,
              "patience": cfg.patience, "batch_size": cfg.batch_size, "shuffle_buffer": cfg.shuffle_buffer,
              "val": {"x": val.x, **{f"y_{k}": v for k, v in val.y.items()}}}
    cpu_per_worker = 1.0 if cfg.use_gpu else min(1.0, float(res.get("CPU", 1)) / cfg.workers)
    fs, path = storage.resolve(storage_uri)
    run_name = f"train-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(
        _train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpu_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds})
    log(f"Ray Train: {cfg.workers} worker(s), heads {variants}, {len(train.x)} train / {len(val.x)} val faces, "
        f"checkpoints under {storage_uri.rstrip('/')}/{run_name}")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        st = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
    return st["best"], st["history"], dict(result.metrics or {}) | {"run_name": run_name, "run_path": f"{path}/{run_name}"}


def make_specs(ls_tasks: list[tuple[str, str]], table: pa.Table, cfg: TrainConfig) -> list[TaskSpec]:
    open_set = set(cfg.open_set) if cfg.open_set is not None else {n for n, _ in ls_tasks if default_open_set(n)}
    specs = []
    for name, kind in ls_tasks:
        if kind == CLASSIFICATION:
            labels = sorted({v for v in table.column(name).to_pylist() if v is not None})
            if len(labels) < 2:
                raise ValueError(f"task {name!r} has {len(labels)} label(s) among photos with a face: need ≥ 2")
            specs.append(TaskSpec(name, kind, labels, hidden=cfg.hidden, open_set=name in open_set,
                                  exclusive=name in open_set))
        else:
            mean, std = regression_scale(np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64))
            specs.append(TaskSpec(name, kind, hidden=cfg.hidden, mean=mean, std=std))
    return specs


def evaluate(bundle: ModelBundle, part: Encoded) -> tuple[dict, dict]:
    """Test metrics per task (closed-set and with the open-set rule) and raw predictions."""
    ids = np.arange(len(part.x))
    preds = bundle.predict(part.x, ids)
    raw = bundle.raw(part.x)
    metrics, detail = {}, {}
    for s in bundle.specs:
        y = part.y[s.name]
        if s.kind == CLASSIFICATION:
            m = y >= 0
            closed = raw[s.name].argmax(1)
            labels, scores = preds[s.name]
            true = np.asarray(s.labels, dtype=object)[y[m]]
            open_ok = labels[m] == true
            rej = labels[m] == "unknown"
            metrics[s.name] = {"faces": int(m.sum()), "accuracy": float((closed[m] == y[m]).mean()) if m.any() else float("nan"),
                               "open_set_accuracy": float(open_ok.mean()) if m.any() else float("nan"),
                               "known_rejected": float(rej.mean()) if m.any() else 0.0}
            detail[s.name] = {"true": y[m], "pred": closed[m], "prob": raw[s.name][m], "label": labels[m],
                              "score": scores[m], "uris": [u for u, k in zip(part.uris, m) if k]}
        else:
            m = np.isfinite(y)
            v = preds[s.name][0][m]
            metrics[s.name] = {"faces": int(m.sum()), "mae": float(np.abs(v - y[m]).mean()) if m.any() else float("nan"),
                               "baseline_mae": float(np.abs(s.mean - y[m]).mean()) if m.any() else float("nan")}
            detail[s.name] = {"true": y[m], "pred": v, "uris": [u for u, k in zip(part.uris, m) if k]}
    return metrics, detail


def train(data_uri: str, output_uri: str, layout: str = "folders", task: str | None = None,
          cfg: TrainConfig | None = None, settings: Settings | None = None, cache_uri: str | None = None,
          unknown_uri: str | None = None, report: bool = True, keep_checkpoints: bool = False,
          log: Callable[[str], None] = print) -> TrainOutcome:
    """The whole training job: read → embed (cached) → split → fit → calibrate → bundle."""
    from pipeline.datasets import read_labelled

    cfg = cfg or TrainConfig()
    settings = settings or Settings.from_env()
    started = time.monotonic()
    check_cluster(cfg)
    storage.check_writable(output_uri)
    ls = read_labelled(data_uri, layout, task)
    log(f"{ls.table.num_rows} labelled photos in {data_uri} ({layout}), tasks {ls.tasks}")
    emb, embed_info = embed_labelled(ls.table, data_uri, settings, cache_uri, cfg.flip_tta, log)
    status = emb.column("status").to_pylist()
    errors: dict[str, int] = {}
    for st in status:
        if st not in ("ok", "no_face"):
            errors[st] = errors.get(st, 0) + 1
    no_face = sum(1 for st in status if st == "no_face")
    faces = int(pc.sum(emb.column("face_count")).as_py() or 0)
    usable = pc.is_valid(emb.column("main_face"))
    table = ls.table.filter(usable)
    x = embedding_matrix(emb.filter(usable).column("embedding"))
    specs = make_specs(ls.tasks, table, cfg)
    split = stratified_split(strata_for(table, ls.tasks), cfg.val_frac, cfg.test_frac, cfg.seed)
    enc = Encoded(x, encode(table, specs), split, table.column("image_uri").to_pylist())
    tr, va, te = enc.part("train"), enc.part("val"), enc.part("test")
    if len(va.x) == 0:
        raise ValueError(f"validation split is empty ({len(enc.x)} usable photos): raise --val-frac")
    log(f"split (seed {cfg.seed}): train {len(tr.x)}, val {len(va.x)}, test {len(te.x)}")

    t_fit = time.monotonic()
    best, history, last = fit(tr, va, specs, cfg, f"{output_uri.rstrip('/')}/checkpoints", log)
    fit_seconds = time.monotonic() - t_fit

    # pick the head type per task on validation, and rename task@variant → task
    heads_state, chosen = {}, {}
    for s in specs:
        cands = {k.split("@")[1]: b for k, b in best.items() if k.split("@")[0] == s.name}
        v = min(cands, key=lambda c: cands[c]["crit"])
        s.head, chosen[s.name] = v, {"head": v, "best_epoch": cands[v]["epoch"],
                                     **{f"val_crit_{c}": round(b["crit"], 5) for c, b in cands.items()}}
        heads_state.update({f"{s.name}.{n}": p for n, p in cands[v]["state"].items()})

    # centroids (training faces) and open-set thresholds (validation faces)
    centroids = {s.name: class_centroids(tr.x[tr.y[s.name] >= 0], tr.y[s.name][tr.y[s.name] >= 0], len(s.labels))
                 for s in specs if s.kind == CLASSIFICATION and s.open_set}
    bundle = _bundle_in_memory(specs, heads_state, centroids)
    calib = {}
    raw_val = bundle.raw(va.x)
    for s in specs:
        if s.name in centroids:
            m = va.y[s.name] >= 0
            c = calibrate_open_set(raw_val[s.name][m], va.x[m], va.y[s.name][m], centroids[s.name], cfg.target_frr)
            s.min_prob, s.max_dist = round(c.min_prob, 6), round(c.max_dist, 6)
            calib[s.name] = asdict(c)
    bundle = _bundle_in_memory(specs, heads_state, centroids)
    test_metrics, detail = evaluate(bundle, te if len(te.x) else va)
    metrics: dict[str, Any] = {
        "test": test_metrics, "open_set": calib, "heads": {k: v["head"] for k, v in chosen.items()},
        "selection": chosen, "epochs_run": len(history), "workers": cfg.workers,
        "resumed_from": last.get("resumed_from", -1),
        "rows_per_s_per_worker": float(np.median([h["rows_per_s_per_worker"] for h in history])) if history else 0.0,
        "split": {"train": len(tr.x), "val": len(va.x), "test": len(te.x)},
        "photos": ls.table.num_rows, "faces": faces, "no_face": no_face, "errors": errors,
        "fit_seconds": round(fit_seconds, 1)}
    unknown_detail = None
    if unknown_uri:
        metrics["unknown"], unknown_detail = _unknown_metrics(bundle, unknown_uri, settings, cache_uri, cfg, log)

    extra = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "backbone": backbone_info(settings),
             "data": {"uri": data_uri, "layout": layout, "embedding_cache": embed_info.get("cache")},
             "training": {k: v for k, v in asdict(cfg).items()},
             "metrics": {"test": test_metrics, "open_set": calib, "heads": metrics["heads"]}}
    meta = ModelBundle.write(output_uri, specs, heads_state, centroids, extra)
    metrics["model_version"] = meta["model_version"]
    fs, out_path = storage.resolve(output_uri)
    with fs.open_output_stream(f"{out_path}/metrics.json") as f:
        f.write(json.dumps({**metrics, "history": history}, indent=2, default=_json_default).encode())
    outcome = TrainOutcome(output_uri, meta, metrics, ls.table.num_rows, faces, no_face, errors, ls.skipped,
                           embed_info, fit_seconds,
                           tables={"test": detail, "unknown": unknown_detail, "history": history,
                                   "specs": specs, "train_counts": {s.name: tr.y[s.name] for s in specs}})
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


def _bundle_in_memory(specs: list[TaskSpec], heads_state: dict, centroids: dict) -> ModelBundle:
    import torch

    state = {f"heads.{k}": v for k, v in heads_state.items()}
    state.update({f"centroids.{k}": torch.from_numpy(v) for k, v in centroids.items()})
    return ModelBundle({"tasks": [s.to_json() for s in specs], "model_version": "in-memory"}, state)


def _unknown_metrics(bundle: ModelBundle, uri: str, settings: Settings, cache_uri: str | None,
                     cfg: TrainConfig, log) -> tuple[dict, dict]:
    """Share of faces of people outside the training set that come out ``unknown``."""
    manifest = storage.list_images(uri)
    emb, _ = embed_labelled(manifest, uri, settings, cache_uri, cfg.flip_tta, log)
    ok = emb.filter(pc.is_valid(emb.column("main_face")))
    x = embedding_matrix(ok.column("embedding"))
    preds = bundle.predict(x, np.arange(len(x)))
    out, detail = {}, {}
    for s in bundle.specs:
        if s.kind == CLASSIFICATION and s.open_set:
            labels, scores = preds[s.name]
            out[s.name] = {"faces": len(x), "rejected": float((labels == "unknown").mean()) if len(x) else 0.0}
            detail[s.name] = {"label": labels, "score": scores, "uris": ok.column("image_uri").to_pylist()}
    return out, detail


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
