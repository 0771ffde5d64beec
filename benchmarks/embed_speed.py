"""Face embeddings per second: faceray's torch Embedder vs dlib's compute_face_descriptor.

    .venv/bin/python benchmarks/embed_speed.py [--faces 32] [--repeats 5]

Same faces, same run: dlib cuts 150 px chips from LFW photos (its HOG detector and
5-point predictor); dlib embeds those, the Embedder embeds their 128 px versions (its
stored-chip size; the 128 → 150 resize is part of what is timed).  torch at batch 1
and 32, on 1 and 2 threads; dlib (single-threaded build) one chip at a time and as a
list of chips.  Each figure is the median over ``--repeats`` timed passes after a
warm-up pass.  Default run: about 1-2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median_time, portraits  # noqa: E402

from pipeline.backbone import default_weights_path  # noqa: E402
from pipeline.embed import Embedder  # noqa: E402


def dlib_chips(n: int) -> np.ndarray:
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(default_weights_path().parent / "shape_predictor_5_face_landmarks.dat"))
    chips = []
    for photo in portraits(4 * n):
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        boxes = detector(rgb, 0)
        if boxes:
            chips.append(dlib.get_face_chip(rgb, predictor(rgb, boxes[0]), 150, 0.25))
        if len(chips) == n:
            break
    return np.stack(chips)


def torch_rate(chips128: np.ndarray, threads: int, batch: int, repeats: int) -> float:
    emb = Embedder(batch_size=batch, threads=threads)
    if batch == 1:
        run = lambda: [emb(chips128[i:i + 1]) for i in range(len(chips128))]  # noqa: E731
    else:
        run = lambda: emb(chips128)  # noqa: E731
    run()  # warm-up
    return len(chips128) / median_time(run, repeats)


def dlib_rates(chips150: np.ndarray, repeats: int) -> tuple[float, float]:
    import dlib

    rec = dlib.face_recognition_model_v1(str(default_weights_path()))
    few = chips150[:8]
    rec.compute_face_descriptor(few[0])  # warm-up
    one = len(few) / median_time(lambda: [rec.compute_face_descriptor(c) for c in few], repeats)
    many = len(chips150) / median_time(lambda: rec.compute_face_descriptor(list(chips150)), max(1, repeats // 2))
    return one, many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=32, help="faces per timed pass (and dlib's list size)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import dlib

    header("face embedding speed: faceray torch Embedder vs dlib")
    print(f"torch {torch.__version__}, dlib {dlib.__version__}, fp32 CPU, channels_last")
    chips150 = dlib_chips(args.faces)
    chips128 = np.stack([cv2.resize(c, (128, 128), interpolation=cv2.INTER_AREA) for c in chips150])
    print(f"faces: {len(chips150)} dlib chips from LFW portraits; median of {args.repeats} passes\n")

    d1, d32 = dlib_rates(chips150, args.repeats)
    print(f"{'engine':<22}{'threads':>8}{'batch':>7}{'faces/s':>10}{'ms/face':>9}{'× dlib':>8}")
    print(f"{'dlib-bin 20.0.1':<22}{1:>8}{1:>7}{d1:>10.1f}{1000 / d1:>9.1f}{'1.0':>8}")
    print(f"{'dlib-bin 20.0.1':<22}{1:>8}{len(chips150):>7}{d32:>10.1f}{1000 / d32:>9.1f}{'1.0':>8}")
    before = torch.get_num_threads()
    for threads in (1, 2):
        for batch in (1, 32):
            rate = torch_rate(chips128, threads, batch, args.repeats)
            ref = d1 if batch == 1 else d32
            print(f"{'faceray torch':<22}{threads:>8}{batch:>7}{rate:>10.1f}{1000 / rate:>9.1f}{rate / ref:>8.1f}")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
