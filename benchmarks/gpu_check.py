"""GPU check: the pipeline on one CUDA machine, every check PASS/FAIL, in one run of < 5 min.

    .venv/bin/python benchmarks/gpu_check.py [--quick] [--skip-jobs]

1. machine: GPU, CUDA/cuDNN/torch versions, TF32 flags, CPUs (no CUDA: says so, exit 0);
2. parity on real chips (main faces of ``<data_dir>/identities``, cut by ``photos.analyse_photo``):
   ``Embedder`` CUDA fp32 / bf16 vs CPU fp32 (min cosine), ``AttributeNets`` likewise
   (labels that agree, age difference, probabilities);
3. ``Embedder`` faces/s on CUDA at batch 32 / 128 / 512, fp32 and bf16;
4. ``jobs/score_directory.py`` on a local 1-GPU Ray: the plan line must put embed actors on
   the GPU, exit 0, rows in the Parquet table;
5. ``jobs/train_classifier.py --finetune last --epochs 1 --use-gpu --workers 1``: Ray Train
   DDP (NCCL on GPU), exit 0 and a model bundle.

A step that raises is printed with its traceback and counts as FAIL; exit 1 if any FAIL.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16")
COS_MIN = {"fp32": 0.9999, "bf16": 0.99}           # embedding cosine to CPU fp32, every face
ATTR_MIN = {"fp32": (1.0, 0.1), "bf16": (0.9, 2.0)}  # (label agreement ≥, age Δ max ≤ years)
BATCHES = (32, 128, 512)
JOB_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "FACERAY_PROGRESS": "log", "NCCL_DEBUG": "INFO"}
RESULTS: list[tuple[str, bool]] = []


def report(name: str, figure: str, ok: bool | None) -> None:
    """One line per check; ``ok`` None is a figure without a threshold (INFO)."""
    tag = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    print(f"{tag}  {name:<34} {figure}", flush=True)
    if ok is not None:
        RESULTS.append((name, bool(ok)))


def step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; an exception is printed with its traceback and counted as FAIL."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a check must never stop the others
        traceback.print_exc()
        report(name, f"raised {type(exc).__name__}: {exc} ({time.perf_counter() - t0:.1f} s)", False)
        return None


def real_chips(n: int) -> np.ndarray:
    """Main-face chips of up to ``n`` photos of ``identities/``, round robin over people."""
    from pipeline.faces import FaceDetector
    from pipeline.photos import analyse_photo
    from pipeline.settings import Settings

    settings = Settings()
    detector = FaceDetector.from_settings(settings)
    people = [sorted(p.glob("*.jpg")) for p in sorted((data_dir() / "identities").iterdir()) if p.is_dir()]
    chips: list[np.ndarray] = []
    for k in range(max(map(len, people), default=0)):
        for photos in people:
            if k < len(photos) and len(chips) < n:
                faces = analyse_photo(photos[k].read_bytes(), detector, settings.max_pixels)
                if faces.main is not None:
                    chips.append(faces.chips[faces.main])
    if not chips:
        raise RuntimeError(f"no face found in {data_dir() / 'identities'}")
    return np.stack(chips)


def embed_parity(chips: np.ndarray, device: str = "cuda", ref_device: str = "cpu") -> None:
    """``Embedder`` on ``device`` (fp32, bf16) vs ``ref_device`` fp32: min cosine per precision."""
    from pipeline.embed import Embedder

    ref = Embedder(device=ref_device, precision="fp32")(chips)
    for p in PRECISIONS:
        emb = Embedder(device=device, precision=p)
        cos = (emb(chips) * ref).sum(1)
        report(f"embed parity {device} {p}", f"min cos {cos.min():.6f} (median {np.median(cos):.6f}, "
               f"{len(chips)} faces; ≥ {COS_MIN[p]}) vs {ref_device} fp32 [{emb.precision.describe()}]",
               bool(cos.min() >= COS_MIN[p]))


def attribute_parity(chips: np.ndarray, device: str = "cuda", ref_device: str = "cpu") -> None:
    """``AttributeNets`` on ``device`` vs ``ref_device`` fp32: gender/emotion labels, age, probabilities."""
    from pipeline.attributes import AttributeNets

    ref = AttributeNets(device=ref_device, precision="fp32").run(chips)
    for p in PRECISIONS:
        out = AttributeNets(device=device, precision=p).run(chips)
        agree = min(float(np.mean(out.predictions[t][0] == ref.predictions[t][0])) for t in ("gender", "emotion"))
        age = float(np.abs(out.predictions["age"][0] - ref.predictions["age"][0]).max())
        prob = max(float(np.abs(out.probabilities[t] - ref.probabilities[t]).max()) for t in ref.probabilities)
        need_agree, max_age = ATTR_MIN[p]
        report(f"attribute parity {device} {p}", f"labels agree {agree:.1%} (≥ {need_agree:.0%}), age Δ max "
               f"{age:.3f} y (≤ {max_age}), prob Δ max {prob:.4f}, {len(chips)} faces vs {ref_device} fp32",
               agree >= need_agree and age <= max_age)


def embed_speed(chips: np.ndarray, device: str = "cuda", batches: tuple[int, ...] = BATCHES,
                seconds: float = 2.0) -> None:
    """``Embedder`` faces/s at each batch size (chips repeated to fill it), warm, synchronised."""
    import torch

    from pipeline.embed import Embedder

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for p in PRECISIONS:
        emb, rates, finite = Embedder(device=device, precision=p), [], True
        for b in batches:
            emb.batch_size = b
            x = np.resize(chips, (b, *chips.shape[1:]))
            finite &= bool(np.isfinite(emb(x)).all())   # warm-up: cuDNN algorithm choice, autocast
            sync()
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < seconds:
                emb(x)
                n += 1
            sync()
            rates.append(b * n / (time.perf_counter() - t0))
        report(f"embed speed {device} {p}", ", ".join(f"batch {b}: {r:,.0f}" for b, r in zip(batches, rates))
               + " faces/s", finite)


def run_cmd(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """(exit code, stdout+stderr, seconds); on timeout its process group is killed, code 124."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **JOB_ENV, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        out = ""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                out, _ = proc.communicate(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        rc, out = 124, (out or "") + f"\n[gpu_check: killed after {timeout:.0f} s]"
    return rc, out, time.perf_counter() - t0


def tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def score_job(limit: int | None, timeout: float) -> None:
    """The scoring job over ``identities/`` on a local Ray with this machine's GPU."""
    import pyarrow.parquet as pq

    from pipeline import storage

    with tempfile.TemporaryDirectory(prefix="gpu-check-score-") as tmp:
        out = str(Path(tmp) / "scores")
        cmd = [sys.executable, "jobs/score_directory.py", "--input", str(data_dir() / "identities"),
               "--output", out, *(["--limit", str(limit)] if limit else [])]
        rc, text, secs = run_cmd(cmd, timeout)
        plan = next((ln.strip() for ln in text.splitlines() if "faces per forward" in ln), "")
        report("score job plan", plan or "no plan line printed", "×GPU actors" in plan and " 0 GPU" not in plan)
        _, files = storage.table_files(out)
        tables = [pq.read_table(f, columns=["status", "embedding"]) for f in files]
        rows = sum(t.num_rows for t in tables)
        embedded = sum(t.num_rows - t.column("embedding").null_count for t in tables)
        if rc != 0 or rows == 0:
            print(tail(text))
        report("score job", f"exit {rc}, {rows} rows ({embedded} with an embedding) from {len(files)} files "
               f"in {secs:.1f} s" + (f" (--limit {limit})" if limit else ""),
               rc == 0 and rows > 0 and embedded > 0)


def train_job(timeout: float) -> None:
    """One fine-tuning epoch (``--finetune last``) with Ray Train DDP on the GPU (NCCL)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        out = Path(tmp) / "bundle"
        cmd = [sys.executable, "jobs/train_classifier.py", "--data", str(data_dir() / "identities"),
               "--output", str(out), "--finetune", "last", "--epochs", "1", "--finetune-epochs", "1", "--use-gpu",
               "--workers", "1",
               "--cache", str(Path(tmp) / "cache"), "--no-report", "--verbose"]
        rc, text, secs = run_cmd(cmd, timeout)
        nccl = sum("NCCL INFO" in ln for ln in text.splitlines())
        bundle = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        ok = rc == 0 and "model.json" in bundle
        if not ok:
            print(tail(text))
        report("finetune last, 1 epoch, DDP", f"exit {rc} in {secs:.1f} s, bundle {bundle or 'missing'}, "
               f"{nccl} NCCL INFO lines (NCCL_DEBUG=INFO)", ok)


def describe_gpu() -> bool:
    """Print torch/CUDA versions and the GPU; False without CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    print(f"torch:   {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if cuda else '-'}, {os.cpu_count()} CPUs")
    if not cuda:
        return False
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        print(f"gpu {i}:   {prop.name}, {prop.total_memory / 2**30:.0f} GiB, sm {prop.major}.{prop.minor}")
    print(f"tf32:    matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN conv {torch.backends.cudnn.allow_tf32}; "
          f"bf16 supported {torch.cuda.is_bf16_supported()}")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer chips, shorter timings, --limit 200 scoring")
    ap.add_argument("--skip-jobs", action="store_true", help="no scoring job, no training job")
    args = ap.parse_args()
    started = time.perf_counter()
    header("gpu_check: CUDA parity, speed, scoring and fine-tuning jobs")
    if not describe_gpu():
        print("no CUDA: torch.cuda.is_available() is False on this machine; nothing to check (exit 0)")
        return 0
    chips = step("real chips", real_chips, 32 if args.quick else 128)
    if chips is not None:
        report("real chips", f"{len(chips)} main faces of {data_dir() / 'identities'}", None)
        step("embed parity", embed_parity, chips)
        step("attribute parity", attribute_parity, chips)
        step("embed speed", embed_speed, chips, "cuda", BATCHES, 1.0 if args.quick else 3.0)
    import torch

    torch.cuda.empty_cache()
    if not args.skip_jobs:
        step("score job", score_job, 200 if args.quick else None, 150.0)
        step("finetune last, 1 epoch, DDP", train_job, 180.0)
    failed = [name for name, ok in RESULTS if not ok]
    print(f"\ngpu_check: {len(RESULTS)} checks, {len(failed)} FAIL{': ' + ', '.join(failed) if failed else ''} "
          f"({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
