"""Where a scoring job's fixed start-up goes, piece by piece, before and after issue 17's
start-up changes, side by side in one run.

    .venv/bin/python benchmarks/startup.py [--photos 20] [--repeats 5]

Like ``score_speed.py``: a local Ray (2 CPUs) is started once, then the job runs as a fresh
process joined to it (what ``ray job submit`` runs) on a few portraits, so nearly all of
its wall time is fixed cost.  The process is this file in ``--child`` mode: the scoring
job's own steps (``jobs/score_directory._score``) with timestamps around each piece, and
in each Ray Data actor around its constructor (worker process start, ``import torch``,
detector, networks), on one clock.  The variants alternate run by run (the machine is
shared: the medians are what to read, with the load average printed beside them):

- ``before``: the manifest becomes a dataset with ``ray.data.from_arrow`` (a remote task
  per block asks for its metadata, first waiting for a worker process), and every actor
  converts its model files (``import onnx``/``h5py``, parse; the cache switched off).
- ``after``: ``ray.data.from_blocks`` (the metadata from the tables in the driver), and
  the converted weights read from ``Settings.cache_dir`` (``pipeline/weights_cache.py``;
  one warm-up run fills it), and the process ends with ``jobs.cli.exit_now`` (no
  interpreter teardown) as ``jobs/score_directory.py`` now does; the driver never imports
  torch (the networks run in the actors; ``before`` imports it first, as every driver did).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CPUS = 2
MARK = "STARTUP-TIMES "
PIECES = [  # (label, from mark, to mark): seconds between two marks of one run
    ("python + imports (ray, pipeline; torch before)", "spawn", "imported"),
    ("ray.init (join the cluster)", "imported", "joined"),
    ("driver: check output, list, board", "score", "planning"),
    ("Ray Data plan (manifest → dataset)", "planning", "planned"),
    ("actor worker process up (last actor)", "planned", "actor_init"),
    ("actor: import torch (last actor)", "actor_init", "actor_torch"),
    ("actor: detector + networks (last actor)", "actor_torch", "actor_ready"),
    ("first batch scored (last actor)", "actor_ready", "actor_first"),
    ("rest: photos, write, summary", "actor_first", "scored"),
    ("exit (ray disconnect, interpreter)", "scored", "exit"),
]


def child(args: argparse.Namespace) -> None:
    """The scoring job (jobs/score_directory._score's steps), with marks; prints them."""
    marks = {"spawn": float(os.environ["STARTUP_SPAWN"])}
    if args.child == "before":
        import torch  # noqa: F401  (the driver loaded torch; the job without --model no longer does)
    from pipeline.runtime import init_ray
    import ray  # noqa: I001

    from pipeline import scoring, stages
    from pipeline.resources import plan_resources
    from pipeline.settings import Settings

    marks["imported"] = time.time()
    if args.child == "before":
        ray.data.from_blocks = ray.data.from_arrow  # the manifest as it was handed over before
    settings = Settings.from_env(cache_dir=args.cache)
    init_ray(args.address, torch_first=False)
    marks["joined"] = time.time()
    plan = plan_resources(ray.cluster_resources(), precision=settings.precision)
    report = Path(args.report)
    before = args.child == "before"

    class TimedFaceStage(stages.FaceStage):  # pickled by value: the marks come from the actor
        def __init__(self, *a, **k) -> None:
            import resource

            import psutil

            def cpu() -> float:
                r = resource.getrusage(resource.RUSAGE_SELF)
                return r.ru_utime + r.ru_stime

            t = {"actor_proc": psutil.Process().create_time(), "actor_init": time.time()}
            c0 = cpu()
            import torch  # noqa: F401

            if before:  # every actor converts its model files, as it did before the cache
                from pipeline import weights_cache

                weights_cache.cached_bytes = lambda cache_dir, name, make: make()

            t["actor_torch"] = time.time()
            c1 = cpu()
            super().__init__(*a, **k)
            t["actor_ready"] = time.time()
            t["cpu_torch"], t["cpu_models"] = c1 - c0, cpu() - c1
            self._t = t

        def __call__(self, batch):  # noqa: ANN001
            out = super().__call__(batch)
            if self._t is not None:
                self._t["actor_first"] = time.time()
                (report / f"actor-{os.getpid()}.json").write_text(json.dumps(self._t))
                self._t = None
            return out

    stages.FaceStage = TimedFaceStage
    real_plan = stages.face_dataset

    def face_dataset(*a, **k):  # noqa: ANN002, ANN003
        marks["planning"] = time.time()
        ds = real_plan(*a, **k)
        marks["planned"] = time.time()
        return ds

    stages.face_dataset = face_dataset
    marks["score"] = time.time()
    summary = scoring.score(args.input, args.output, None, None, False, settings, plan, log=lambda m: None)
    marks["scored"] = time.time()
    print(MARK + json.dumps({"marks": marks, "photos": summary.photos}), flush=True)
    if not before:  # the job's own exit (jobs/score_directory.py's __main__)
        from jobs.cli import exit_now

        exit_now(0)


def run_child(variant: str, address: str, folder: Path, out: Path, cache: Path, report: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", STARTUP_SPAWN=repr(time.time()))
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, __file__, "--child", variant, "--address", address, "--input", str(folder),
                          "--output", str(out), "--cache", str(cache), "--report", str(report)],
                         capture_output=True, text=True, env=env)
    end = time.time()
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith(MARK))
    data = json.loads(line[len(MARK):])
    marks = data["marks"]
    marks["exit"] = end
    actors = [json.loads(f.read_text()) for f in report.glob("actor-*.json")]
    for k in ("actor_init", "actor_torch", "actor_ready", "actor_first"):
        marks[k] = max(a[k] for a in actors)  # the pool is ready when its last actor is
    out = {label: marks[b] - marks[a] for label, a, b in PIECES}
    out["total (process start → exit)"] = marks["exit"] - marks["spawn"]
    out["job start-up on a running cluster (process start → first batch scored)"] = marks["actor_first"] - marks["spawn"]
    out["actor CPU s: import torch (mean)"] = statistics.mean(a["cpu_torch"] for a in actors)
    out["actor CPU s: detector + networks (mean)"] = statistics.mean(a["cpu_models"] for a in actors)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    for name in ("address", "input", "output", "cache", "report"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import header, portraits

    header("scoring job start-up, piece by piece: before vs after (issue 17)")
    import ray

    from pipeline.runtime import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        for i, f in enumerate(portraits(args.photos)[:args.photos]):
            (folder / f"{i:05d}_{f.name}").symlink_to(f)
        t0 = time.perf_counter()
        init_ray(num_cpus=CPUS)
        address = ray.get_runtime_context().gcs_address
        print(f"local Ray cluster ({CPUS} CPUs) started in {time.perf_counter() - t0:.1f} s (once per cluster)")
        warm = tmp / "cache"
        run_child("after", address, folder, tmp / "out", warm, tmp / "report")  # fills the cache; not counted
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        loads = [os.getloadavg()[0]]
        for i in range(args.repeats):
            for variant in ("before", "after") if i % 2 == 0 else ("after", "before"):
                runs[variant].append(run_child(variant, address, folder, tmp / "out", warm, tmp / "report"))
                loads.append(os.getloadavg()[0])
        ray.shutdown()
    print(f"\n{args.photos} portraits, {args.repeats} runs each, alternating; medians (min–max) in seconds; "
          f"1-min load average {min(loads):.1f}–{max(loads):.1f} during the runs")
    print("\n| piece | before | after |")
    print("|---|---|---|")
    for key in runs["before"][0]:
        cells = []
        for variant in ("before", "after"):
            v = [r[key] for r in runs[variant]]
            cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
