"""LFW face verification through faceray's whole chain: decode → YuNet → align → embed.

    .venv/bin/python benchmarks/lfw_pairs.py [--threads 2]

Data: ``<data_dir>/pairs/pairs.csv`` (path_a,path_b,same; 1,200 pairs of LFW View 2
folds 1-2, 600 same / 600 different).  Each photo goes through ``decode_image``,
``FaceDetector.detect`` and ``crop_chips`` with the backbone's geometry.  LFW photos have the labelled person in
the middle, so the face nearest the image centre is used.  Note: the shared copies are
150×150 (LFW's 250×250 photos downscaled by 0.6), so faces are only about 60 px wide
and every chip is an upscale: harder than the LFW originals dlib's 99.38 % was
measured on.  Score = cosine of the unit embeddings.

Protocol: 10-fold cross-validation over the pairs (pair i is in fold i mod 10, so
every fold has 60 same and 60 different pairs); the threshold that maximises accuracy
on 9 folds is applied to the 10th.  A pair with a photo where no face was found counts
as wrong.  Reported: mean ± std over the folds, with and without flip TTA.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, header  # noqa: E402

from pipeline.decoding import decode_image  # noqa: E402
from pipeline.embed import Embedder  # noqa: E402
from pipeline.faces import FaceDetector, crop_chips  # noqa: E402
from pipeline.geometry import DLIB_CHIP  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

FOLDS = 10


def central_chip(path: Path, detector: FaceDetector, geometry) -> np.ndarray | None:
    """The 128 px chip of the face nearest the photo centre, or None when none is found."""
    img = decode_image(path.read_bytes(), max_pixels=Settings().max_pixels)
    faces = detector.detect(img)
    if not faces:
        return None
    centre = np.array([img.width, img.height], np.float32) / 2
    dist = [np.linalg.norm(f.bbox[:2] + f.bbox[2:] / 2 - centre) for f in faces]
    return crop_chips(img, [faces[int(np.argmin(dist))]], geometry)[0]


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold (score ≥ t ⇒ same) with the highest accuracy on these pairs."""
    s = np.sort(scores)
    candidates = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    acc = [((scores >= t) == same).mean() for t in candidates]
    return float(candidates[int(np.argmax(acc))])


def ten_fold(scores: np.ndarray, same: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy and threshold; pairs without both faces count as wrong."""
    fold = np.arange(len(scores)) % FOLDS
    accs, ths = [], []
    for k in range(FOLDS):
        train, test = (fold != k) & found, fold == k
        t = best_threshold(scores[train], same[train])
        correct = ((scores[test] >= t) == same[test]) & found[test]
        accs.append(correct.mean())
        ths.append(t)
    return np.array(accs), np.array(ths)


@dataclass
class LfwPairs:
    """The pairs and the chip of every photo in them (photos without a face have none)."""

    rows: list[dict[str, str]]
    same: np.ndarray          # per pair
    found: np.ndarray         # per pair: both photos have a face
    chips: np.ndarray         # N×128×128×3, one per photo with a face
    index: dict[str, int]     # photo path → row of ``chips``
    missing: list[str]        # photos without a face
    crop_seconds: float

    def accuracy(self, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-fold accuracy and threshold of the unit embeddings ``vecs`` (rows of ``chips``)."""
        scores = np.array([float(vecs[self.index[r["path_a"]]] @ vecs[self.index[r["path_b"]]]) if ok else 0.0
                           for r, ok in zip(self.rows, self.found)])
        return ten_fold(scores, self.same, self.found)


def load_pairs(geometry=DLIB_CHIP) -> LfwPairs:
    """``<data_dir>/pairs``: decode → YuNet (defaults) → the central face's chip, every photo once."""
    root = data_dir() / "pairs"
    with open(root / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    same = np.array([int(r["same"]) for r in rows], bool)
    paths = sorted({r[k] for r in rows for k in ("path_a", "path_b")})
    detector = FaceDetector()
    t0 = time.perf_counter()
    chips = {p: central_chip(root / p, detector, geometry) for p in paths}
    t_crop = time.perf_counter() - t0
    have = [p for p in paths if chips[p] is not None]
    found = np.array([chips[r["path_a"]] is not None and chips[r["path_b"]] is not None for r in rows])
    batch = np.stack([chips[p] for p in have]) if have else np.zeros((0, 128, 128, 3), np.uint8)
    return LfwPairs(rows, same, found, batch, {p: i for i, p in enumerate(have)},
                    sorted(set(paths) - set(have)), t_crop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    header("LFW pairs, 10-fold verification accuracy (decode → YuNet → align → embed)")
    embedders = {"plain": Embedder(threads=args.threads), "flip TTA": Embedder(threads=args.threads, flip_tta=True)}
    lfw = load_pairs(embedders["plain"].spec.geometry)
    n_photos = len(lfw.index) + len(lfw.missing)
    print(f"pairs: {len(lfw.rows)} ({lfw.same.sum()} same), photos: {n_photos}, no face found in "
          f"{len(lfw.missing)} photos → {(~lfw.found).sum()} pairs counted wrong {lfw.missing[:5]}")
    print(f"decode+detect+align: {lfw.crop_seconds:.1f} s ({1000 * lfw.crop_seconds / n_photos:.1f} ms/photo)")
    print(f"embedder: {embedders['plain'].model_id}, torch threads {__import__('torch').get_num_threads()}\n")

    print(f"{'variant':<10}{'accuracy':>18}{'threshold (cos)':>18}{'embed s':>9}")
    for name, emb in embedders.items():
        t0 = time.perf_counter()
        vecs = emb(lfw.chips)
        t_emb = time.perf_counter() - t0
        accs, ths = lfw.accuracy(vecs)
        print(f"{name:<10}{100 * accs.mean():>11.2f} ± {100 * accs.std():.2f}%"
              f"{ths.mean():>12.3f} ± {ths.std():.3f}{t_emb:>9.1f}")


if __name__ == "__main__":
    main()
