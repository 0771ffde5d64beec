"""Crop stage photos/s per core: faceray (decode → detect → align every face) vs autocrop 2.0.

    .venv/bin/python benchmarks/crop_speed.py [--repeats 3] [--portraits 200] [--det-max-side 640]

Same photos, same run, one thread each (``cv2.setNumThreads(1)``, and faceray's YuNet
session has one ONNX Runtime thread; a Ray crop actor has one core).  faceray: ``read_bytes → decode_image → FaceDetector.detect → crop_chips``
(128 px chips of *all* faces).  autocrop: ``Cropper(width=128, height=128).crop(path)``
in a loop (its Python API: reads + EXIF-transposes with Pillow, YuNet at full
resolution, crops the largest face only).  Sets: the WIDER FACE group photos in
``groups/images`` and LFW-size portraits from ``identities``.  Each figure is the median
over ``--repeats`` timed passes after one warm-up pass; the two tools alternate pass by
pass so background load hits both alike.  Faces are also scored against WIDER's ground
truth (IoU ≥ 0.4, boxes ≥ 24 / 40 px, not marked invalid).  About 1–2 minutes.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, group_photos, header, portraits  # noqa: E402

from pipeline.decoding import decode_image  # noqa: E402
from pipeline.faces import FaceDetector, crop_chips  # noqa: E402


def faceray_pass(detector: FaceDetector, photos: list[Path]) -> list[np.ndarray]:
    """One pass of the crop stage; returns each photo's face boxes (photo px)."""
    boxes = []
    for p in photos:
        img = decode_image(p.read_bytes())
        faces = detector.detect(img)
        chips = crop_chips(img, faces)
        assert len(chips) == len(faces)
        boxes.append(np.array([f.bbox for f in faces], np.float64).reshape(-1, 4))
    return boxes


def autocrop_pass(cropper, photos: list[Path]) -> list[tuple[np.ndarray, bool]]:
    """One pass of autocrop; returns each photo's detected boxes and whether it cropped."""
    out = []
    for p in photos:
        res = cropper.crop(str(p))
        det = np.array([[f.box.x, f.box.y, f.box.width, f.box.height] for f in res.diagnostics.faces],
                       np.float64).reshape(-1, 4)
        out.append((det, res.image is not None))
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a[:, None, :], b[None, :, :]
    iw = np.clip(np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


def wider_truth() -> dict[str, np.ndarray]:
    groups = data_dir() / "groups"
    truth: dict[str, list] = defaultdict(list)
    with open(groups / "boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["invalid"] == "0":
                truth[str(groups / row["file"])].append([float(row[k]) for k in "xywh"])
    return {k: np.array(v) for k, v in truth.items()}


def recall(photos: list[Path], found: list[np.ndarray], truth: dict[str, np.ndarray], size: int) -> str:
    hit = total = 0
    for p, boxes in zip(photos, found):
        gt = truth.get(str(p), np.zeros((0, 4)))
        gt = gt[np.minimum(gt[:, 2], gt[:, 3]) >= size]
        total += len(gt)
        if len(gt) and len(boxes):
            hit += int((_iou(gt, boxes).max(1) >= 0.4).sum())
    return f"{hit}/{total} = {hit / max(total, 1):.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--portraits", type=int, default=200)
    ap.add_argument("--det-max-side", type=int, default=640, help="faceray's detection size (default: the product default)")
    args = ap.parse_args()

    from autocrop import Cropper

    cv2.setNumThreads(1)
    header("crop stage, 1 thread: faceray vs autocrop 2.0")
    print(f"opencv {cv2.__version__}; faceray FaceDetector(det_max_side={args.det_max_side}, score 0.6, min_face 20)")
    detector = FaceDetector(det_max_side=args.det_max_side)
    cropper = Cropper(width=128, height=128)
    truth = wider_truth()
    sets = {"WIDER group photos": group_photos(), "LFW portraits": portraits(args.portraits)}

    print()
    print("| set | photos | tool | photos/s | ms/photo | faces detected | faces cropped | recall ≥40 px | recall ≥24 px |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for name, photos in sets.items():
        faceray_pass(detector, photos)  # warm-up (model load, page cache)
        autocrop_pass(cropper, photos)
        times: dict[str, list[float]] = {"faceray": [], "autocrop": []}
        for _ in range(args.repeats):
            t, fr = timed(lambda: faceray_pass(detector, photos))
            times["faceray"].append(t)
            t, ac = timed(lambda: autocrop_pass(cropper, photos))
            times["autocrop"].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        ac_boxes = [b for b, _ in ac]
        rows = {
            "faceray": (sum(len(b) for b in fr), sum(len(b) for b in fr), fr),
            "autocrop": (sum(len(b) for b in ac_boxes), sum(ok for _, ok in ac), ac_boxes),
        }
        is_wider = name.startswith("WIDER")
        for tool, (detected, cropped, found) in rows.items():
            r40 = recall(photos, found, truth, 40) if is_wider else "–"
            r24 = recall(photos, found, truth, 24) if is_wider else "–"
            print(f"| {name} | {len(photos)} | {tool} | {len(photos) / med[tool]:.1f} | "
                  f"{1000 * med[tool] / len(photos):.1f} | {detected} | {cropped} | {r40} | {r24} |")
        ratios[name] = med["autocrop"] / med["faceray"]
    print()
    for name, r in ratios.items():
        print(f"speed ratio faceray / autocrop, {name}: {r:.2f}×")
    print(f"(medians of {args.repeats} passes; all passes s: "
          f"{ {k: [round(x, 2) for x in v] for k, v in times.items()} } for the last set)")


if __name__ == "__main__":
    main()
