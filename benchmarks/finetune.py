"""Frozen features vs ``--finetune last`` vs ``--finetune all``, same split, same seed.

    python benchmarks/finetune.py [--sets fer2013,utkface] [--epochs 10] [--num-cpus N]

FER2013 (emotion) and UTKFace (age, gender) of ../shared/data/attributes, each trained
through the training library (``pipeline.training.run.train``, 2 Ray Train workers) with
heads on the identity embedding: frozen (``none``), then the backbone's last stage, then
all of it, tuned with those heads.  Printed per task: test accuracy (Wilson 95 %) or MAE
(bootstrap 95 %), and the paired bootstrap 95 % interval of tuned − frozen on the same test
faces (a gain counts when that interval excludes 0); also the frozen figure with
``--features auto`` (heads that may read the attribute networks) for context, and the
fine-tuning chips/s per worker with 1 and 2 workers.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, header  # noqa: E402

SETS = {"fer2013": ("folders", "emotion"), "utkface": ("utk", "age,gender")}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def per_face(outcome, task: str) -> np.ndarray:
    """1/0 correct per test face (classification) or the absolute error (regression)."""
    from pipeline.training.outcome import RegressionResult

    r = outcome.evaluation.test[task]
    if isinstance(r, RegressionResult):
        return np.abs(np.asarray(r.pred, float) - np.asarray(r.true, float))
    return (np.asarray(r.true) == np.asarray(r.pred)).astype(float)


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b − a) and its bootstrap 95 % interval over the same faces."""
    rng = np.random.default_rng(seed)
    d = b - a
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    boots = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def boot_ci(v: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="fer2013,utkface")
    ap.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (max)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()
    header("fine-tuning: frozen identity features vs --finetune last vs all")
    from pipeline.runtime import init_ray
    from pipeline.training.config import TrainConfig
    from pipeline.training.run import train

    init_ray(None, args.num_cpus)
    root = data_dir() / "attributes"
    work = Path(tempfile.mkdtemp(prefix="faceray-finetune-"))
    cache = str(work / "cache")
    quiet = lambda *_: None  # noqa: E731
    for name in args.sets.split(","):
        layout, tasks = SETS[name]
        runs = {}
        for mode, features in (("auto", "auto"), ("none", "identity"), ("last", "identity"), ("all", "identity")):
            cfg = TrainConfig(workers=args.workers, seed=args.seed, features=features,
                              finetune="none" if mode == "auto" else mode, finetune_epochs=args.epochs)
            out = train(str(root / name), str(work / f"{name}-{mode}"), layout, tasks, cfg, cache_uri=cache,
                        report=False, log=quiet)
            runs[mode] = out
            ft = out.metrics.get("finetune")
            print(f"{name} {mode:>4}: trained in {out.fit_seconds:.0f} s"
                  + (f", fine-tuning {ft['seconds']:.0f} s, {ft['epochs_run']} epochs (best {ft['best_epoch'] + 1}),"
                     f" {ft['chips_per_s_per_worker']:.1f} chips/s/worker ({args.workers} workers)" if ft else ""),
                  flush=True)
        for task in runs["none"].metrics["test"]:
            base = per_face(runs["none"], task)
            regression = "mae" in runs["none"].metrics["test"][task]
            unit = "MAE" if regression else "accuracy"
            print(f"\n{name} / {task} ({len(base)} test faces, {unit}; lower is better)" if regression
                  else f"\n{name} / {task} ({len(base)} test faces, {unit})")
            for mode in ("auto", "none", "last", "all"):
                v = per_face(runs[mode], task)
                lo, hi = boot_ci(v) if regression else wilson(int(v.sum()), len(v))
                line = f"  {mode:>4}{' (frozen, auto features)' if mode == 'auto' else ' (frozen)' if mode == 'none' else ''}: " \
                       f"{v.mean():.3f} [{lo:.3f}, {hi:.3f}]"
                if mode in ("last", "all"):
                    d, dlo, dhi = paired_ci(base, v)
                    better = (dhi < 0) if regression else (dlo > 0)
                    line += f"   tuned − frozen {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]{'  GAIN' if better else ''}"
                print(line, flush=True)
    # throughput: one short fine-tuning with 1 worker on the first set (2 workers is above)
    name = args.sets.split(",")[0]
    layout, tasks = SETS[name]
    for workers in (1,):
        cfg = TrainConfig(workers=workers, seed=args.seed, features="identity", finetune="all", finetune_epochs=2,
                          patience=2)
        out = train(str(root / name), str(work / f"{name}-speed-{workers}"), layout, tasks, cfg, cache_uri=cache,
                    report=False, log=quiet)
        print(f"\nfine-tuning all, {workers} worker: {out.metrics['finetune']['chips_per_s_per_worker']:.1f} "
              f"chips/s/worker ({name})")


if __name__ == "__main__":
    main()
