"""Video frame sampling: pipeline.video (PyAV, seek + convert only kept frames) against
decoding every frame with OpenCV and keeping every Nth (face_recognition's video example),
on a 1080p H.264 clip made from a real photo; and an actor's RSS over a long clip.

    .venv/bin/python benchmarks/video_speed.py [--seconds 20] [--gop 60] [--repeat 9]

Per-core figures: both readers are held to one thread (PyAV thread_count=1, OpenCV
``OPENCV_FFMPEG_CAPTURE_OPTIONS=threads;1``) and timed in process CPU seconds.
"""
from __future__ import annotations

import argparse
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
    print(f"{'sample fps':>10} | {'reader':<34} | {'frames':>6} | {'CPU s':>6} | {'sampled frames/s/core':>21}")
    for fps in (1.0, 5.0):
        for name, fn in (("pipeline.video (PyAV, seek)", ours), ("OpenCV, decode every frame", opencv_every_frame)):
            fn(clip, fps)  # warm the page cache
            n, cpu = fn(clip, fps)
            print(f"{fps:>10g} | {name:<34} | {n:>6} | {cpu:>6.2f} | {n / cpu:>21.1f}")
    long = work / f"long-x{args.repeat}.mp4"
    dur = repeat_clip(clip, long, args.repeat)
    print(f"\nlong clip: {dur:.0f} s of 1080p; crop actor (detect + chips at 1 frame/s), RSS after each 30 s segment:")
    trace = memory_over_long_clip(long, 30.0)
    print("  " + ", ".join(f"{t:.0f}s {m:.0f} MB" for t, m in trace))
    print(f"  growth first → last segment: {trace[-1][1] - trace[0][1]:+.0f} MB; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
