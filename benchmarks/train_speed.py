"""Training throughput of the Ray Train DDP loop: embeddings/s per worker, 1 vs 2 workers.

The heads train on embeddings, so photos do not matter here: the benchmark fits the same
heads on N unit vectors around 42 "people" (the identities set's size of problem, scaled
up so an epoch is long enough to time) and reads the loop's own per-epoch measurement
(rows through forward+backward+optimiser per second, median over epochs, first epoch
excluded).  The fixed cost of a ``fit()`` (worker start-up) is reported separately.

    python benchmarks/train_speed.py [--rows 20000] [--epochs 6] [--workers 1,2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header, machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--classes", type=int, default=42)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--head", default="auto", choices=("auto", "linear", "mlp"))
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
        os.environ.setdefault(k, v)
    import numpy as np
    import ray

    from pipeline.heads import TaskSpec
    from pipeline.training.config import TrainConfig
    from pipeline.training.ddp import fit
    from pipeline.training.split import Encoded

    header("train_speed: Ray Train DDP heads, embeddings/s per worker")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.classes, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def make(n: int) -> Encoded:
        y = rng.integers(0, args.classes, n)
        x = centres[y] + 0.6 * rng.normal(size=(n, 128)) / np.sqrt(128)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return Encoded(x.astype(np.float32), {"identity": y}, np.array(["train"] * n), [""] * n)

    train, val = make(args.rows), make(2000)
    spec = TaskSpec("identity", "classification", [str(i) for i in range(args.classes)])
    tmp = tempfile.mkdtemp(prefix="train-speed-")
    ray.init(num_cpus=os.cpu_count(), object_store_memory=512 * 1024**2, include_dashboard=False,
             _temp_dir=os.path.join(tmp, "ray"), log_to_driver=False)
    rows = []
    try:
        for w in [int(v) for v in args.workers.split(",")]:
            cfg = TrainConfig(workers=w, epochs=args.epochs, patience=args.epochs, head=args.head,
                              batch_size=args.batch_size)
            t0 = time.monotonic()
            _, history, _ = fit(train, val, [spec], cfg, os.path.join(tmp, f"ckpt{w}"), log=lambda *_: None)
            wall = time.monotonic() - t0
            per = float(np.median([h["rows_per_s_per_worker"] for h in history[1:]] or [0]))
            epoch_s = args.rows / max(per * w, 1e-9)
            rows.append((w, per, per * w, epoch_s, wall, len(history)))
            print(f"workers {w}: {per:,.0f} embeddings/s per worker, {per * w:,.0f} total, "
                  f"{epoch_s:.2f} s per epoch of {args.rows} rows; fit() wall {wall:.1f} s for {len(history)} epochs")
    finally:
        ray.shutdown()
    print()
    print("| date | machine | rows | head | workers | emb/s per worker | emb/s total | fit() wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for w, per, tot, _, wall, _ in rows:
        print(f"| {time.strftime('%Y-%m-%d')} | {machine()} | {args.rows} | {args.head} | {w} | "
              f"{per:,.0f} | {tot:,.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
