"""The Ray Train DDP fit of the heads: one worker per GPU (gloo on CPU), the training
rows sharded by Ray Data, full validation on every worker, a checkpoint per epoch, and
``FailureConfig`` resuming a killed worker from the last one.

With ``head="auto"`` a linear and an MLP head are trained side by side in the same run
(disjoint parameters, so they do not interact), and with ``features="auto"`` each on the
identity embedding and on every attribute network's features (``task@mlp+age`` …);
``calibration`` keeps the best per task.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.contract import CLASSIFICATION, UsageError
from pipeline.heads import IDENTITY, Norms, TaskSpec, build_heads, feature_stats, split_variant
from pipeline.training.config import TrainConfig
from pipeline.training.split import Encoded, task_variants

Variants = list[str] | dict[str, list[str]]   # the same for every task, or per task name


def _of(variants: Variants, task: str) -> list[str]:
    return variants[task] if isinstance(variants, dict) else variants


class MultiHead(torch.nn.Module):
    """Every ``task@variant`` head, each on its input (the embedding or attribute features)."""

    def __init__(self, specs: list[TaskSpec], variants: Variants, norms: Norms | None = None) -> None:
        super().__init__()
        self.heads = build_heads(specs, variants, norms)
        self.inputs = {k: split_variant(k.split("@", 1)[1])[1] for k in self.heads}

    def forward(self, xs: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(xs, torch.Tensor):
            xs = {IDENTITY: xs}
        return {k: h(xs[self.inputs[k]]) for k, h in self.heads.items()}


def task_losses(out: dict, ys: dict, specs: list[TaskSpec], variants: Variants, class_w: dict,
                huber_delta: float, weighted: bool = True) -> dict:
    """Loss per ``task@variant``; a row without a label for a task adds nothing to it.

    Classification: class-weighted cross-entropy (label -1 = missing).  Regression: Huber
    on the standardised target (NaN = missing) plus a Laplace NLL for the scale output,
    computed on the detached residual so it does not pull the value.
    """
    res = {}
    for s in specs:
        y = ys[s.name]
        for v in _of(variants, s.name):
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


def _tensors(batch: dict, specs: list[TaskSpec]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs by feature set (``x``: identity, ``f_<name>``: attribute features) and targets."""
    xs = {IDENTITY if k == "x" else k[2:]: torch.as_tensor(np.asarray(v), dtype=torch.float32)
          for k, v in batch.items() if k == "x" or k.startswith("f_")}
    ys = {s.name: torch.as_tensor(np.asarray(batch[f"y_{s.name}"]),
                                  dtype=torch.int64 if s.kind == CLASSIFICATION else torch.float32)
          for s in specs}
    return xs, ys


def _validation_metrics(out: dict, vloss: dict, val_y: dict, specs: list[TaskSpec],
                        variants: Variants) -> tuple[dict[str, float], dict[str, float]]:
    """Per ``task@variant``: the reported metrics, and the selection criterion (lower is better)."""
    metrics, crit = {}, {}
    for s in specs:
        y = val_y[s.name]
        for v in _of(variants, s.name):
            k, o = f"{s.name}@{v}", out[f"{s.name}@{v}"]
            if s.kind == CLASSIFICATION:
                m = y >= 0
                metrics[f"val_{k}_acc"] = float((o.argmax(1)[m] == y[m]).float().mean()) if m.any() else float("nan")
                crit[k] = float(vloss[k])
            else:
                m = torch.isfinite(y)
                mae = float(((o[:, 0] * s.std + s.mean)[m] - y[m]).abs().mean()) if m.any() else float("nan")
                metrics[f"val_{k}_mae"] = mae
                crit[k] = mae / s.std
            metrics[f"val_{k}_loss"] = float(vloss[k])
    return metrics, crit


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: DDP over the shard, full validation, checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    specs = [TaskSpec.from_json(d) for d in config["specs"]]
    variants: dict[str, list[str]] = config["variants"]
    norms = {k: (np.asarray(m, np.float32), np.asarray(s, np.float32)) for k, (m, s) in config["norms"].items()}
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = MultiHead(specs, variants, norms)
    for k, state in config.get("init", {}).items():   # heads that start from a built-in output layer
        model.heads[k].load_state_dict(state)
    ddp = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    class_w = {k: torch.tensor(v, dtype=torch.float32) for k, v in config["class_weights"].items()}
    task_w = config["task_weights"]
    val_x, val_y = _tensors(config["val"], specs)
    start_epoch, resumed_from = 0, -1
    best: dict[str, dict] = {}
    history: list[dict] = []
    st, finished = resume(rank)
    if finished:
        return
    if st:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        best, history = st["best"], st["history"]
        start_epoch = resumed_from = st["epoch"] + 1
    elif config.get("init"):   # the untouched built-in layers are candidates too (epoch -1)
        model.eval()
        with torch.no_grad():
            out = model(val_x)
            vloss = task_losses(out, val_y, specs, variants, class_w, config["huber_delta"], weighted=False)
        _, crit = _validation_metrics(out, vloss, val_y, specs, variants)
        for k in config["init"]:
            best[k] = {"crit": crit[k], "epoch": -1, "state": copy.deepcopy(
                {n: p.detach().clone() for n, p in model.heads[k].state_dict().items()})}

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        t0, seen, total = time.monotonic(), 0, 0.0
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                                        local_shuffle_buffer_size=config["shuffle_buffer"]):
            xs, ys = _tensors(batch, specs)
            loss = weighted_loss(task_losses(ddp(xs), ys, specs, variants, class_w, config["huber_delta"]), task_w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n = len(xs[IDENTITY])
            seen += n
            total += float(loss.detach()) * n
        train_s = time.monotonic() - t0
        model.eval()
        with torch.no_grad():
            out = model(val_x)
            vloss = task_losses(out, val_y, specs, variants, class_w, config["huber_delta"], weighted=False)
        val_metrics, crit = _validation_metrics(out, vloss, val_y, specs, variants)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(seen, 1),
                                   "rows_per_s_per_worker": seen / max(train_s, 1e-9),
                                   "world_size": world, "resumed_from": resumed_from, **val_metrics}
        for k, c in crit.items():
            if k not in best or c < best[k]["crit"] - 1e-5:
                best[k] = {"crit": c, "epoch": epoch, "state": copy.deepcopy(
                    {n: p.detach().clone() for n, p in model.heads[k].state_dict().items()})}
        history.append(dict(metrics))
        last_best = max(b["epoch"] for b in best.values())
        stop = (epoch - last_best >= config["patience"]) or epoch == config["epochs"] - 1
        if end_epoch(config, rank, world, metrics, {"model": model.state_dict(), "opt": opt.state_dict(),
                                                    "epoch": epoch, "best": best, "history": history}, stop, t0):
            break


STATE_FILE = "train_state.pt"   # one checkpoint's whole state (model, optimiser, best, history)


def load_state(checkpoint: Any) -> dict[str, Any]:
    """The state a ``Checkpoint`` holds (``end_epoch`` wrote it)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


def resume(rank: int) -> tuple[dict[str, Any] | None, bool]:
    """In a Train worker: (the last checkpoint's state or None, finished).  A run that had
    already stopped (the job restarted after its fit ended) reports its state back and is
    finished: the loop returns at once."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return None, False
    st = load_state(ckpt)
    if st.get("stopped"):
        _report(rank, dict(st["history"][-1]), st)
        return st, True
    return st, False


def weighted_loss(parts: dict[str, torch.Tensor], task_weights: dict[str, float]) -> torch.Tensor:
    """The training loss: each ``task@variant`` loss times its task's ``--task-weights`` (1)."""
    return sum(task_weights.get(k.split("@")[0], 1.0) * v for k, v in parts.items())


def end_epoch(config: dict[str, Any], rank: int, world: int, metrics: dict[str, Any], state: dict[str, Any],
              stop: bool, started: float, device: Any = None) -> bool:
    """Every rank takes rank 0's stop decision (report is a barrier), the driver gets its
    epoch line, rank 0 checkpoints ``state``; returns the decision."""
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.broadcast(flag, src=0)
        stop = bool(flag.item())
    metrics["stopped"] = stop
    if rank == 0 and config.get("progress") is not None:  # the driver prints a line per epoch
        config["progress"].event.remote({**metrics, "epochs": config["epochs"],
                                         "epoch_seconds": time.monotonic() - started})
    _report(rank, metrics, {**state, "stopped": stop})
    return stop


def _report(rank: int, metrics: dict, state: dict) -> None:
    """Report an epoch; rank 0 with the checkpoint of ``state``."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def run_name(config: dict, train: Encoded, val: Encoded, stage: str = "fit",
             skip: tuple[str, ...] = ("val", "progress", "norms")) -> str:
    """``<stage>-<hash>`` of what the run learns from (settings, specs, the split's photos and
    labels; not the ``skip`` keys): a restarted job with the same flags and data finds its
    checkpoints; another one starts afresh.  Not the embeddings' bits (nor norms from them): a
    fresh embedding pass and the cache read back differ in the last bits (measured: the hash
    changed between the two)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in skip},
                                  sort_keys=True, default=str).encode())
    for part in (train, val):
        h.update("\n".join(part.uris).encode() + repr(part.x.shape).encode())
        for k in sorted(part.features):
            h.update(k.encode() + repr(np.shape(part.features[k])).encode())
        for k in sorted(part.y):
            h.update(k.encode() + np.ascontiguousarray(part.y[k]).tobytes())
    return f"{stage}-{h.hexdigest()[:16]}"


def check_cluster(cfg: TrainConfig) -> dict[str, float]:
    """The cluster's resources, or a UsageError for flags it cannot honour."""
    import ray

    res = ray.cluster_resources()
    if cfg.use_gpu and res.get("GPU", 0) < cfg.workers:
        raise UsageError(f"--use-gpu needs {cfg.workers} GPU(s) but the cluster has {res.get('GPU', 0):g}; "
                         "drop --use-gpu to train on CPUs")
    if cfg.workers < 1:
        raise UsageError("--workers must be at least 1")
    return res


def _class_weights(train: Encoded, specs: list[TaskSpec]) -> dict[str, list[float]]:
    """Inverse class frequency (0 for classes absent from training)."""
    out = {}
    for s in specs:
        if s.kind == CLASSIFICATION:
            y = train.y[s.name]
            counts = np.bincount(y[y >= 0], minlength=len(s.labels)).astype(np.float64)
            out[s.name] = np.where(counts > 0, counts.sum() / (len(s.labels) * np.maximum(counts, 1)), 0.0).tolist()
    return out


def fit(train: Encoded, val: Encoded, specs: list[TaskSpec], cfg: TrainConfig, storage_uri: str,
        log: Callable[[str], None] = print, init: dict[str, dict] | None = None) -> tuple[dict, list[dict], dict]:
    """One Ray Train run; returns the best state per task@variant, the history, last metrics.
    ``init``: ``task@variant`` → a starting state (heads that start from a built-in network's
    output layer); those variants are trained beside the others, and their untouched state
    is a candidate (epoch -1)."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    extra: dict[str, list[str]] = {}
    for k in init or {}:
        extra.setdefault(k.split("@")[0], []).append(k.split("@")[1])
    variants = task_variants(specs, cfg.head, cfg.features, extra)
    used = {split_variant(v)[1] for vs in variants.values() for v in vs} - {IDENTITY}
    missing = sorted(used - set(train.features))
    if missing:
        raise ValueError(f"heads on {missing} features asked for but the examples carry none")
    feats = {k: v for k, v in train.features.items() if k in used}
    cols = {"x": ArrowTensorArray.from_numpy(train.x.astype(np.float32))}
    cols.update({f"f_{k}": ArrowTensorArray.from_numpy(v.astype(np.float32)) for k, v in feats.items()})
    cols.update({f"y_{k}": pa.array(v) for k, v in train.y.items()})
    ds = ray.data.from_arrow(pa.table(cols))
    norms = {k: [a.tolist() for a in feature_stats(v)] for k, v in feats.items()}
    config = {"specs": [s.to_json() for s in specs], "variants": variants, "norms": norms, "seed": cfg.seed,
              "lr": cfg.lr, "weight_decay": cfg.weight_decay, "class_weights": _class_weights(train, specs),
              "task_weights": cfg.task_weights, "huber_delta": cfg.huber_delta, "epochs": cfg.epochs,
              "patience": cfg.patience, "batch_size": cfg.batch_size, "shuffle_buffer": cfg.shuffle_buffer,
              "val": {"x": val.x, **{f"f_{k}": val.features[k] for k in feats},
                      **{f"y_{k}": v for k, v in val.y.items()}},
              **({"init": init, "init_variants": sorted(init)} if init else {})}
    shown = sorted({v for vs in variants.values() for v in vs}, key=lambda v: (split_variant(v)[1] != IDENTITY, v))
    st, last = run_trainer(train_loop, config, ds, cfg, cfg.epochs, storage_uri,
                           run_name(config, train, val, skip=("val", "progress", "norms", "init")),
                           f"heads {shown}, {len(train.x)} train / {len(val.x)} val faces", "fit", log)
    return st["best"], st["history"], last


def run_trainer(loop: Callable[[dict], None], config: dict[str, Any], ds: Any, cfg: TrainConfig, epochs: int,
                storage_uri: str, run_name: str, what: str, stage: str,
                log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """One Ray Train run of ``loop`` (frozen-feature fit or fine-tuning): workers sized from
    the cluster, checkpoints under ``storage_uri/run_name`` (the same job again continues
    them), a line per epoch; returns the last checkpoint's state and the last metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import progress

    res = check_cluster(cfg)
    cpu_per_worker = 1.0 if cfg.use_gpu else min(1.0, float(res.get("CPU", 1)) / cfg.workers)
    fs, path = storage.resolve(storage_uri)
    if fs.get_file_info(f"{path}/{run_name}").type != pafs.FileType.NotFound:
        log(f"continuing the interrupted {stage} from its last checkpoint in {storage_uri.rstrip('/')}/{run_name}")
    config["progress"] = board = progress.create_board(f"train-{stage}", run_name, epochs)  # epochs → driver
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpu_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds})
    # a stop is the job's (pipeline/stopping.py); Train's own SIGINT handler only asks the run
    # to abort, and fit() then returns as if it had finished
    trainer._register_sigint_handler = lambda controller: None
    log(f"Ray Train ({stage}): {cfg.workers} worker(s){' on GPUs' if cfg.use_gpu else ''}, {what}, "
        f"checkpoints under {storage_uri.rstrip('/')}/{run_name}")
    with progress.watch(f"train-{stage}", run_name, stage, epochs, log=log, on_event=progress.epoch_line,
                        counts=False, board=board):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint: {result.error}")
    return load_state(result.checkpoint), dict(result.metrics or {}) | {"run_name": run_name, "run_path": f"{path}/{run_name}"}
