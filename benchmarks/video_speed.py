"""Video frame sampling: pipeline.video (PyAV, seek + convert only kept frames) against
decoding every frame with OpenCV and keeping every Nth (face_recognition's video example)
and against Ray Data's ``ray.data.read_videos(path, fps=N)``, on a 1080p H.264 clip made
from a real photo; and memory over a long clip (an actor's RSS, read_videos' read task).

    .venv/bin/python benchmarks/video_speed.py [--seconds 20] [--gop 60] [--repeat 9] [--no-ray]

Per-core figures: the readers are held to one thread (PyAV thread_count=1, OpenCV
``OPENCV_FFMPEG_CAPTURE_OPTIONS=threads;1``, decord ``num_threads=1``) and timed in process
CPU seconds.

``read_videos`` (Ray 2.60, ``VideoDatasource``) needs ``decord``: its read task reads the
whole file into memory (decord's ``VideoReader`` on a file object copies it into a
bytearray), then decodes *every* frame and converts it to RGB (iterating the reader), and
its ``fps=`` (an int) only drops all but every ``round(source_fps / fps)``-th frame after
that; one row per frame.  It is measured twice: its read body (``_read_stream`` with decord
held to one thread) run in this process and timed like the others; and end to end as a
user calls it (decord's default threads) on a local Ray with ``num_cpus=1`` (one file = one
read task), where the CPU seconds are those Ray Data itself records for the read task
(``time.process_time`` in the worker, all threads), the wall clock includes Ray Data's
per-dataset start, and the memory is the read task's peak USS as Ray Data reports it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "threads;1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_1080p(path: Path, photo: Path, seconds: float, gop: int, fps: int = 30) -> None:
    """A real photo upscaled into a 1920×1080 frame, with per-frame shake, H.264."""
    import av

    img = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (1080, 1080), interpolation=cv2.INTER_CUBIC)
    canvas = np.zeros((1080, 1920, 3), np.uint8)
    canvas[:, 420:1500] = img
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        s.options = {"g": str(gop), "preset": "veryfast"}
        for _ in range(int(seconds * fps)):
            m = np.float32([[1, 0, rng.uniform(-6, 6)], [0, 1, rng.uniform(-6, 6)]])
            frame = cv2.warpAffine(canvas, m, (1920, 1080))
            for pkt in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)


def repeat_clip(src: Path, dst: Path, times: int) -> float:
    """``src`` played ``times`` over, by remuxing packets (no re-encoding); its duration."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        ins = inp.streams.video[0]
        outs = out.add_stream_from_template(ins)
        span = None
        for k in range(times):
            inp.seek(0)
            last = 0
            for pkt in inp.demux(ins):
                if pkt.dts is None:
                    continue
                if span is None:
                    span = ins.duration or (ins.frames * int(1 / (ins.time_base * ins.average_rate)))
                pkt.pts += k * span
                pkt.dts += k * span
                last = pkt.pts
                pkt.stream = outs
                out.mux(pkt)
        return float((last + 1) * ins.time_base)


def ours(path: Path, fps: float) -> tuple[int, float]:
    import pyarrow.fs as pafs

    from pipeline.video import sample_frames

    t = time.process_time()
    got = sample_frames(pafs.LocalFileSystem(), str(path), fps, threads=1)
    return len(got.frames), time.process_time() - t


def opencv_every_frame(path: Path, fps: float) -> tuple[int, float]:
    cv2.setNumThreads(1)
    t = time.process_time()
    cap = cv2.VideoCapture(str(path))
    rate = cap.get(cv2.CAP_PROP_FPS) or 30
    every = max(1, round(rate / fps))
    n = kept = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if n % every == 0:
            kept += 1
            _ = frame[:, :, ::-1]   # the example's BGR → RGB
        n += 1
    cap.release()
    return kept, time.process_time() - t


def peak_rss_growth_mb(fn) -> tuple[object, float]:
    """``fn()`` and how far this process's peak RSS rose above its RSS before it (the peak
    is reset first through /proc/self/clear_refs; nan where that is not allowed)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return fn(), float("nan")
    before = rss_mb()
    out = fn()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return out, int(line.split()[1]) / 1024 - before
    return out, float("nan")


def ours_streamed(path: Path, fps: float) -> tuple[int, float]:
    """As the crop actor samples: each frame handed to a callback and dropped."""
    import pyarrow.fs as pafs

    from pipeline.video import sample_frames

    n = 0

    def count(_frame) -> None:
        nonlocal n
        n += 1

    t = time.process_time()
    sample_frames(pafs.LocalFileSystem(), str(path), fps, on_frame=count, threads=1)
    return n, time.process_time() - t


def read_videos_body(path: Path, fps: float) -> tuple[int, float]:
    """Ray Data's read_videos read body (``VideoDatasource._read_stream``, what the read task
    runs per file), in this process with decord held to one thread; blocks dropped as made."""
    import pyarrow.fs as pafs
    from ray.data._internal.datasource.video_datasource import VideoDatasource

    src = VideoDatasource(str(path), fps=int(fps), decord_load_args={"num_threads": 1})
    t = time.process_time()
    n = 0
    with pafs.LocalFileSystem().open_input_stream(str(path)) as f:
        for block in src._read_stream(f, str(path)):
            n += block.num_rows
    return n, time.process_time() - t


def read_videos_on_ray(path: Path, fps: float) -> dict:
    """``ray.data.read_videos(path, fps=N)`` as a user calls it, consumed block by block by
    the driver; the read task's CPU seconds, peak USS and blocks from Ray Data's stats."""
    import ray

    t = time.monotonic()
    ds = ray.data.read_videos(str(path), fps=int(fps))
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(batch["frame_index"])
    wall = time.monotonic() - t
    summary = ds.get_stats_summary()
    op = next(o for o in summary.operators_stats if "ReadVideo" in o.operator_name)
    uss = (summary.extra_metrics.get("max_uss_bytes") or {}).get("max")
    return {"frames": n, "cpu": op.cpu_time.sum, "wall": wall,
            "uss_mb": uss / 2**20 if uss else float("nan"),
            "blocks": op.output_size_bytes.count, "block_mb": op.output_size_bytes.max / 2**20}


def start_local_ray():
    """A local-only Ray as the jobs start one (``runtime.init_ray``: every process on
    127.0.0.1), one CPU: one read task."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from pipeline.runtime import init_ray

    init_ray(num_cpus=1, torch_first=False)
    ray.data.range(1).take_all()   # Ray Data's first-dataset start, outside the timings
    return ray


def memory_over_long_clip(path: Path, segment_s: float) -> list[tuple[float, float]]:
    """(segment end, RSS MB) after each segment of a crop actor's work (detect + chips)."""
    import pyarrow.fs as pafs

    from pipeline.faces import FaceDetector
    from pipeline.settings import Settings
    from pipeline.video import probe, segment_rows

    cv2.setNumThreads(1)
    fs = pafs.LocalFileSystem()
    settings = Settings(video_fps=1.0)
    det = FaceDetector.from_settings(settings)
    dur = probe(fs, str(path)).duration
    out = []
    k = 0
    while k * segment_s < dur:
        rows = segment_rows(fs, str(path), k, k * segment_s, (k + 1) * segment_s, det, settings)
        assert rows and rows[0]["status"] == "ok", rows[0]["status"]
        del rows
        out.append(((k + 1) * segment_s, rss_mb()))
        k += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--gop", type=int, default=60, help="keyframe interval in frames (phones: 30-60)")
    ap.add_argument("--repeat", type=int, default=9, help="the long clip is the clip this many times")
    ap.add_argument("--work", default="/tmp/faceray-video-bench")
    ap.add_argument("--no-ray", action="store_true", help="skip ray.data.read_videos (needs decord)")
    args = ap.parse_args()
    from pipeline.settings import Settings

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clip = work / f"clip-{args.seconds:g}s-g{args.gop}.mp4"
    photo = sorted((Path(Settings().data_dir) / "identities" / "Andre_Agassi").glob("*.jpg"))[2]
    if not clip.exists():
        t = time.time()
        make_1080p(clip, photo, args.seconds, args.gop)
        print(f"made {clip} ({clip.stat().st_size / 1e6:.1f} MB) in {time.time() - t:.0f} s")
    print(f"1080p H.264, {args.seconds:g} s at 30 fps, keyframe every {args.gop} frames; one core each")
    print(f"{'sample fps':>10} | {'reader':<40} | {'frames':>6} | {'CPU s':>6} | {'sampled frames/s/core':>21}")
    for fps in (1.0, 5.0):
        for name, fn in (("pipeline.video (PyAV, seek)", ours), ("OpenCV, decode every frame", opencv_every_frame)):
            fn(clip, fps)  # warm the page cache
            n, cpu = fn(clip, fps)
            print(f"{fps:>10g} | {name:<40} | {n:>6} | {cpu:>6.2f} | {n / cpu:>21.1f}")
    long = work / f"long-x{args.repeat}.mp4"
    dur = repeat_clip(clip, long, args.repeat)
    print(f"\nlong clip: {dur:.0f} s of 1080p ({long.stat().st_size / 1e6:.1f} MB); "
          "crop actor (detect + chips at 1 frame/s), RSS after each 30 s segment:")
    trace = memory_over_long_clip(long, 30.0)
    print("  " + ", ".join(f"{t:.0f}s {m:.0f} MB" for t, m in trace))
    print(f"  growth first → last segment: {trace[-1][1] - trace[0][1]:+.0f} MB; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    (n, cpu), grow = peak_rss_growth_mb(lambda: ours_streamed(long, 1.0))
    print(f"  pipeline.video alone on it at 1 fps (frames to a callback): {n} frames, {cpu:.2f} CPU s, "
          f"{n / cpu:.1f} frames/s/core, peak RSS +{grow:.0f} MB")
    if args.no_ray:
        return
    if importlib.util.find_spec("decord") is None:
        print("\nray.data.read_videos not measured: it needs decord (pip install decord)")
        return
    ray = start_local_ray()
    try:
        print(f"\nray.data.read_videos (Ray {ray.__version__}, decord), same clip "
              f"({args.seconds:g} s); one core each:")
        for fps in (1.0, 5.0):
            n, cpu = read_videos_body(clip, fps)
            print(f"{fps:>10g} | {'read_videos read body, decord 1 thread':<40} | {n:>6} | {cpu:>6.2f} | "
                  f"{n / cpu:>21.1f}")
            r = read_videos_on_ray(clip, fps)
            print(f"{fps:>10g} | {'ray.data.read_videos on Ray, num_cpus=1':<40} | {r['frames']:>6} | "
                  f"{r['cpu']:>6.2f} | {r['frames'] / r['cpu']:>21.1f}   (wall {r['wall']:.1f} s, "
                  f"read task peak USS {r['uss_mb']:.0f} MB, {r['blocks']} blocks ≤ {r['block_mb']:.0f} MB)")
        r = read_videos_on_ray(long, 1.0)
        print(f"  long clip ({dur:.0f} s) at 1 fps: {r['frames']} frames, {r['cpu']:.2f} CPU s "
              f"({r['frames'] / r['cpu']:.1f} frames/s/core), wall {r['wall']:.1f} s, read task peak USS "
              f"{r['uss_mb']:.0f} MB, {r['blocks']} blocks ≤ {r['block_mb']:.0f} MB")
        (n, cpu), grow = peak_rss_growth_mb(lambda: read_videos_body(long, 1.0))
        print(f"  its read body in this process, decord 1 thread: {n} frames, {cpu:.2f} CPU s "
              f"({n / cpu:.1f} frames/s/core), peak RSS +{grow:.0f} MB")
    finally:
        from pipeline.runtime import shutdown

        shutdown()

if __name__ == "__main__":
    main()
