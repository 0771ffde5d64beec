"""Whole scoring job vs the face_recognition CLI, and pipeline cost vs its bare kernels.

    .venv/bin/python benchmarks/score_speed.py [--portraits 1400] [--group-repeats 4] [--split]
                                               [--no-overhead] [--no-face-recognition]
    .venv/bin/python benchmarks/score_speed.py --new-user 3 [--before DIR] [--portraits 1400]

On the same folders in one run: LFW-size portraits (``identities``; cycled when
``--portraits`` asks for more than the 1,449 there) and the WIDER group photos (``groups``;
``--group-repeats`` copies of the 97), so the job is long enough to be a job.
- faceray: the user's command, ``python jobs/score_directory.py --input DIR --output DIR``,
  as a fresh process submitted to a running local Ray cluster (2 CPUs), wall clock from
  process start to exit: Python and import start-up, Ray Data planning, actor start-up
  (torch import, weights), every photo, the Parquet write and the summary.  This is what
  ``ray job submit`` runs; starting the cluster itself is timed apart (once per cluster).
  Each set is also run on its first half, so the fixed start-up and the marginal cost per
  photo are reported apart.
- ``--split``: the same jobs with split crop and embedding pools (``--embed-actors 1``),
  the plan CPU clusters had before the fused actor.
- face_recognition CLI (dlib HOG + dlib ResNet, ``--cpus 2``) on the same folders.
- ``--new-user N [--before DIR]``: only the portraits, as a new user runs the job — its own
  local Ray (``--num-cpus 2``), started and stopped by the command — N times as it is, with
  the dashboard back on (``FACERAY_LOCAL_DASHBOARD=true``), and as the checkout ``DIR`` of
  an earlier commit has it, alternating, then face_recognition once.
- the pipeline on one core (a job on its own 1-CPU local Ray: one single-threaded actor)
  per photo, marginal, next to the sum of its kernels (read, decode, detect, warp, embed)
  timed alone on 1 thread: the pipeline's overhead.  (One core, because the machine's two
  logical CPUs do not make two cores' worth of work: see the scaling benchmark.)
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
ROOT = Path(__file__).resolve().parent.parent


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
    emb(np.zeros((8, 128, 128, 3), np.uint8))  # warm-up
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


def faceray_job(folder: Path, out: Path, *extra: str, env: dict | None = None,
                root: Path = ROOT) -> tuple[float, int, int]:
    """Wall seconds of the job command (``root``: the checkout whose job runs), photos and
    faces (from its summary)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", **(env or {}))
    env.pop("RAY_ADDRESS", None)  # only the flags say which cluster
    if root != ROOT:  # its own pipeline package, not the one installed (editable) from here
        env["PYTHONPATH"] = str(root)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(root / "jobs" / "score_directory.py"), "--input", str(folder),
                          "--output", str(out), *extra],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"score_directory failed ({res.returncode}):\n{res.stderr[-3000:]}")
    summary = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in res.stdout.splitlines() if ":" in line}
    return wall, int(summary["photos scored"].split()[0]), int(summary["faces found"].split()[0])


def face_recognition_cli(folder: Path, known: Path) -> float:
    exe = Path(sys.executable).parent / "face_recognition"
    if not exe.exists():
        raise FileNotFoundError("face_recognition CLI missing: `make bench` installs it (pip install --no-deps face_recognition==1.3.0)")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "--cpus", str(CPUS), str(known), str(folder)], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--portraits", type=int, default=1400)
    p.add_argument("--group-repeats", type=int, default=4)
    p.add_argument("--split", action="store_true", help="also time split crop/embed pools (--embed-actors 1)")
    p.add_argument("--no-overhead", action="store_true", help="skip the one-core pipeline vs kernels table")
    p.add_argument("--no-face-recognition", action="store_true")
    p.add_argument("--new-user", type=int, metavar="N", help="only: N runs of the job with its own local Ray")
    p.add_argument("--before", metavar="DIR", help="with --new-user: also run the job of this checkout "
                                                   "(e.g. `git worktree add /tmp/before <commit>`)")
    args = p.parse_args()
    if args.new_user:
        return new_user(args)
    header("faceray scoring job vs face_recognition CLI; pipeline vs kernels")
    import ray

    from pipeline.runtime import init_ray

    lfw = portraits(args.portraits)
    sets = {"portraits": (lfw * -(-args.portraits // len(lfw)))[:args.portraits],
            "groups": group_photos() * args.group_repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        known = stage(sets["portraits"][:1], tmp / "known")  # the CLI needs one known person
        t0 = time.perf_counter()
        init_ray(num_cpus=CPUS)
        address = ray.get_runtime_context().gcs_address
        print(f"local Ray cluster ({CPUS} CPUs) started in {time.perf_counter() - t0:.1f} s (once per cluster, not in the job times)")
        print("\n| set | photos | faces | faceray job s | photos/s | fixed s | marginal ms/photo | face_recognition s | photos/s | ratio | marginal ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        results = {}
        folders = {}
        for name, files in sets.items():
            folder = stage(files, tmp / name)
            half = stage(files[: len(files) // 2], tmp / f"{name}-half")
            folders[name] = (folder, half)
            t_half, n_half, _ = faceray_job(half, tmp / "o-half", "--ray-address", address)
            t_full, n_full, faces = faceray_job(folder, tmp / "o-full", "--ray-address", address)
            marginal = (t_full - t_half) / max(1, n_full - n_half)
            fixed = t_full - marginal * n_full
            fr = ["-"] * 4
            if not args.no_face_recognition:
                t_fr = face_recognition_cli(folder, known)
                fr = [f"{t_fr:.1f}", f"{len(files) / t_fr:.2f}", f"**{t_fr / t_full:.1f}×**",
                      f"{t_fr / len(files) / marginal:.1f}×"]
            print(f"| {name} | {n_full} | {faces} | {t_full:.1f} | {n_full / t_full:.2f} | {fixed:.1f} | "
                  f"{marginal * 1e3:.1f} | " + " | ".join(fr) + " |", flush=True)
            if args.split:
                ts_half, _, _ = faceray_job(half, tmp / "os-half", "--ray-address", address, "--embed-actors", "1")
                ts_full, _, _ = faceray_job(folder, tmp / "os-full", "--ray-address", address, "--embed-actors", "1")
                m = (ts_full - ts_half) / max(1, n_full - n_half)
                print(f"| {name}, split pools | {n_full} | {faces} | {ts_full:.1f} | {n_full / ts_full:.2f} | "
                      f"{ts_full - m * n_full:.1f} | {m * 1e3:.1f} | | | | |", flush=True)
        ray.shutdown()
        if args.no_overhead:
            return
        for name, (folder, half) in folders.items():  # one core: each job starts a 1-CPU Ray
            t1_half, n_half, _ = faceray_job(half, tmp / "o1-half", "--num-cpus", "1")
            t1_full, n_full, _ = faceray_job(folder, tmp / "o1-full", "--num-cpus", "1")
            results[name] = (sets[name], (t1_full - t1_half) / max(1, n_full - n_half))
        print("\nper-photo cost on one core: the pipeline (one actor, marginal ms/photo) vs the sum of its kernels alone (1 thread)")
        print("| set | read | decode | detect | warp | embed | kernel sum ms | pipeline ms | overhead |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (files, one_core) in results.items():
            k = kernels(files[:400])
            total = sum(k[s] for s in ("read", "decode", "detect", "warp", "embed"))
            print(f"| {name} | " + " | ".join(f"{k[s] * 1e3:.1f}" for s in ("read", "decode", "detect", "warp", "embed"))
                  + f" | {total * 1e3:.1f} | {one_core * 1e3:.1f} | {100 * (one_core / total - 1):+.0f} % |")


def new_user(args: argparse.Namespace) -> None:
    """The job as a new user runs it (own local Ray): this checkout, with Ray's dashboard
    switched back on, and ``--before``'s checkout (an earlier commit), alternating."""
    import statistics

    header("a new user's command (own local Ray, 2 CPUs) vs face_recognition CLI, end to end")
    lfw = portraits(args.portraits)
    files = (lfw * -(-args.portraits // len(lfw)))[:args.portraits]
    variants: dict[str, tuple[dict, Path]] = {"this checkout": ({}, ROOT),
                                              "this checkout, dashboard on": ({"FACERAY_LOCAL_DASHBOARD": "true"}, ROOT)}
    if args.before:
        variants[f"before ({args.before})"] = ({}, Path(args.before).resolve())
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(files, Path(tmp) / "portraits")
        faceray_job(folder, Path(tmp) / "warm", "--num-cpus", str(CPUS), "--limit", "20")  # fills the weights cache
        for _ in range(args.new_user):
            for name, (env, root) in variants.items():
                wall, n, _ = faceray_job(folder, Path(tmp) / "out", "--num-cpus", str(CPUS), env=env, root=root)
                times[name].append(wall)
                print(f"  {name}: {wall:.1f} s ({n} photos), load {os.getloadavg()[0]:.1f}", flush=True)
        t_fr = None if args.no_face_recognition else face_recognition_cli(folder, stage(files[:1], Path(tmp) / "known"))
    print(f"\n| variant | {len(files)} portraits, s (median, min–max of {args.new_user}) | photos/s | vs face_recognition |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = f"**{t_fr / med:.1f}×**" if t_fr else "-"
        print(f"| faceray, {name} | {med:.1f} ({min(ts):.1f}–{max(ts):.1f}) | {len(files) / med:.1f} | {ratio} |")
    if t_fr:
        print(f"| face_recognition --cpus {CPUS} | {t_fr:.1f} | {len(files) / t_fr:.1f} | 1.0× |")


if __name__ == "__main__":
    main()
