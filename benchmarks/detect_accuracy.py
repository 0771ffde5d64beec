"""Detection accuracy: the size-aware score threshold vs a flat one.

    .venv/bin/python benchmarks/detect_accuracy.py

On ../shared/data: share of non-face photos (cats, dogs, objects) where a "face" is found,
share of LFW portraits where none is, and WIDER group faces found (IoU ≥ 0.4 with a
ground-truth box) against detections that match none.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, header, portraits  # noqa: E402

from pipeline.decoding import decode_image  # noqa: E402
from pipeline.faces import FaceDetector  # noqa: E402


def iou(box: np.ndarray, gt: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(gt[:, 0], box[0]), np.maximum(gt[:, 1], box[1])
    x1 = np.minimum(gt[:, 0] + gt[:, 2], box[0] + box[2])
    y1 = np.minimum(gt[:, 1] + gt[:, 3], box[1] + box[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (gt[:, 2] * gt[:, 3] + box[2] * box[3] - inter)


def main() -> None:
    header("face detection: size-aware vs flat score threshold")
    cv2.setNumThreads(1)
    root = data_dir()
    nonfaces = sorted(p for p in (root / "nonfaces").rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    gt: dict[str, list] = defaultdict(list)
    for r in csv.DictReader(open(root / "groups" / "boxes.csv")):
        gt[r["file"]].append([float(r[k]) for k in "xywh"])
    print("\n| threshold | non-face photos with a face | LFW portraits without a face | WIDER faces found | unmatched detections |")
    print("|---|---|---|---|---|")
    for name, det in (("flat 0.6", FaceDetector(large_face_score=0.6)),
                      ("0.6 → 0.9 with size (default)", FaceDetector())):
        fp = np.mean([bool(det.detect(decode_image(p.read_bytes()))) for p in nonfaces])
        miss = np.mean([not det.detect(decode_image(p.read_bytes())) for p in portraits(300)])
        found = unmatched = 0
        for f, boxes in gt.items():
            g = np.array(boxes)
            for face in det.detect(decode_image((root / "groups" / f).read_bytes())):
                hit = iou(face.bbox, g).max() >= 0.4
                found, unmatched = found + hit, unmatched + (not hit)
        print(f"| {name} | {fp:.1%} of {len(nonfaces)} | {miss:.1%} of 300 | {found} | {unmatched} |")


if __name__ == "__main__":
    main()
