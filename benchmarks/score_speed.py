"""Whole scoring job vs the face_recognition CLI, and pipeline cost vs its bare kernels.

    .venv/bin/python benchmarks/score_speed.py [--portraits 400] [--no-face-recognition]

On the same photos in one run: LFW-size portraits and the WIDER group photos.
- faceray: jobs' `score()` on a local Ray (2 CPUs) from a folder to Parquet; photos/s
  end to end, plus the marginal per-photo cost (two sizes, so Ray's fixed start-up is
  reported apart).
- face_recognition CLI (dlib HOG + dlib ResNet, `--cpus 2`), same folders.
- the per-photo sum of the bare kernels (read, decode, detect, warp, embed), each timed
  alone on 1 thread, next to the pipeline's CPU-seconds per photo: the overhead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import group_photos, header, portraits  # noqa: E402

CPUS = 2


def stage(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        shutil.copyfile(f, dest / f"{i:05d}_{f.name}")
    return dest


def kernels(files: list[Path]) -> dict[str, float]:
    """Seconds per photo of each stage alone, 1 thread, no Ray."""
    import cv2
    import torch

    from pipeline.decoding import decode_image
    from pipeline.embed import Embedder
    from pipeline.faces import FaceDetector, crop_chips

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    det, emb = FaceDetector(), Embedder(threads=1)
    emb(np.zeros((2, 128, 128, 3), np.uint8))  # warm-up
    t = dict(read=0.0, decode=0.0, detect=0.0, warp=0.0, embed=0.0)
    chips = []
    for f in files:
        t0 = time.perf_counter(); data = f.read_bytes()
        t1 = time.perf_counter(); img = decode_image(data)
        t2 = time.perf_counter(); faces = det.detect(img)
        t3 = time.perf_counter(); c = crop_chips(img, faces)
        t4 = time.perf_counter()
        t["read"] += t1 - t0; t["decode"] += t2 - t1; t["detect"] += t3 - t2; t["warp"] += t4 - t3
        chips.append(c)
    allc = np.concatenate(chips)
    t0 = time.perf_counter()
    for i in range(0, len(allc), 32):
        emb(allc[i:i + 32])
    t["embed"] = time.perf_counter() - t0
    out = {k: v / len(files) for k, v in t.items()}
    out["faces"] = len(allc)
    return out


def faceray_job(folder: Path, out: Path) -> tuple[float, int, int]:
    from pipeline.scoring import score

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s = score(str(folder), str(out), log=lambda *_: None)
    return time.perf_counter() - t0, s.photos, s.faces


def face_recognition_cli(folder: Path, known: Path) -> tuple[float, int]:
    exe = Path(sys.executable).parent / "face_recognition"
    if not exe.exists():
        raise FileNotFoundError("face_recognition CLI missing: `make bench` installs it (pip install --no-deps face_recognition==1.3.0)")
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), "--cpus", str(CPUS), str(known), str(folder)],
                         capture_output=True, text=True, check=True)
    faces = sum(1 for line in res.stdout.splitlines() if "," in line and "no_persons_found" not in line)
    return time.perf_counter() - t0, faces


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--portraits", type=int, default=400)
    p.add_argument("--no-face-recognition", action="store_true")
    args = p.parse_args()
    header("faceray scoring job vs face_recognition CLI; pipeline vs kernels")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline.scoring import init_ray

    sets = {"portraits": portraits(args.portraits), "groups": group_photos()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        known = stage(sets["portraits"][:1], tmp / "known")  # the CLI needs one known person
        init_ray(num_cpus=CPUS)
        faceray_job(stage(sets["portraits"][:20], tmp / "warm"), tmp / "warm-out")  # first-dataset start-up
        print("\n| set | photos | faces | faceray job s | photos/s | marginal ms/photo | face_recognition s | photos/s | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        results = {}
        for name, files in sets.items():
            folder = stage(files, tmp / name)
            half = stage(files[: len(files) // 2], tmp / f"{name}-half")
            t_half, n_half, _ = faceray_job(half, tmp / "o-half")
            t_full, n_full, faces = faceray_job(folder, tmp / "o-full")
            marginal = (t_full - t_half) / max(1, n_full - n_half)
            fr = ("-", "-", "-")
            if not args.no_face_recognition:
                t_fr, _ = face_recognition_cli(folder, known)
                fr = (f"{t_fr:.1f}", f"{len(files) / t_fr:.2f}", f"{t_fr / t_full:.1f}×")
            results[name] = (files, marginal)
            print(f"| {name} | {n_full} | {faces} | {t_full:.1f} | {n_full / t_full:.2f} | {marginal * 1e3:.1f} | "
                  f"{fr[0]} | {fr[1]} | {fr[2]} |")
        print("\nper-photo cost: pipeline (marginal wall × CPUs) vs the sum of its kernels alone (1 thread)")
        print("| set | read | decode | detect | warp | embed | kernel sum ms | pipeline CPU-ms | overhead |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (files, marginal) in results.items():
            k = kernels(files)
            total = sum(k[s] for s in ("read", "decode", "detect", "warp", "embed"))
            pipe = marginal * CPUS
            print(f"| {name} | " + " | ".join(f"{k[s] * 1e3:.1f}" for s in ("read", "decode", "detect", "warp", "embed"))
                  + f" | {total * 1e3:.1f} | {pipe * 1e3:.1f} | {100 * (pipe / total - 1):+.0f} % |")


if __name__ == "__main__":
    main()
