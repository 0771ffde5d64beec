"""Face-region geometry between faceray's table and photo tools' XMP.

faceray's boxes are top-left ``x, y, w, h`` in pixels of the decoded, EXIF-oriented photo
(DESIGN.md).  MWG regions are a normalised *centre* ``x, y`` and ``w, h`` relative to
``AppliedToDimensions``; Microsoft Photo's ``MPReg:Rectangle`` is a normalised *top-left*
``x, y, w, h``.  Photo tools disagree on which frame an area of an EXIF-rotated photo is
in: digiKam, Lightroom and faceray write it in the frame the user sees (oriented), some
tools in the frame as stored.  ``to_oriented`` decides from ``AppliedToDimensions``: when
the orientation swaps the sides (5–8) and the dimensions have the stored frame's shape,
the area is mapped through the orientation; otherwise it is taken as oriented (the only
reading possible when nothing tells the two frames apart).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_IOU = 0.5
SWAPS = {5, 6, 7, 8}   # EXIF orientations that exchange width and height


@dataclass(frozen=True)
class Box:
    """A normalised top-left box (0..1 of the frame's width and height)."""
    x: float
    y: float
    w: float
    h: float

    def pixels(self, width: float, height: float) -> tuple[float, float, float, float]:
        return self.x * width, self.y * height, self.w * width, self.h * height


def mwg_area(bbox: tuple[float, float, float, float], width: float, height: float) -> tuple[float, float, float, float]:
    """A pixel box (x, y, w, h) as an MWG ``Area``: normalised centre x, y and w, h,
    clipped to the photo (a detector box may stick out of it; MWG areas are within 0..1)."""
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    return (x0 + w / 2) / width, (y0 + h / 2) / height, w / width, h / height


def from_centre(cx: float, cy: float, w: float, h: float) -> Box:
    return Box(cx - w / 2, cy - h / 2, w, h)


def orient_box(box: Box, orientation: int | None) -> Box:
    """A normalised box in the stored frame, mapped into the frame after EXIF
    ``orientation`` is applied (what Pillow's ``exif_transpose`` does to the pixels)."""
    o = orientation or 1
    x0, y0, x1, y1 = box.x, box.y, box.x + box.w, box.y + box.h
    if o == 2:
        x0, x1 = 1 - x1, 1 - x0
    elif o == 3:
        x0, x1, y0, y1 = 1 - x1, 1 - x0, 1 - y1, 1 - y0
    elif o == 4:
        y0, y1 = 1 - y1, 1 - y0
    elif o == 5:          # transpose
        x0, y0, x1, y1 = y0, x0, y1, x1
    elif o == 6:          # rotate 90° clockwise to display: (x, y) → (1 - y, x)
        x0, y0, x1, y1 = 1 - y1, x0, 1 - y0, x1
    elif o == 7:          # transverse: (x, y) → (1 - y, 1 - x)
        x0, y0, x1, y1 = 1 - y1, 1 - x1, 1 - y0, 1 - x0
    elif o == 8:          # rotate 90° counter-clockwise to display: (x, y) → (y, 1 - x)
        x0, y0, x1, y1 = y0, 1 - x1, y1, 1 - x0
    return Box(x0, y0, x1 - x0, y1 - y0)


def is_stored_frame(applied: tuple[float, float] | None, width: int, height: int, orientation: int | None) -> bool:
    """Whether an area given against ``applied`` (w, h) is in the stored frame of a photo
    whose oriented size is ``width`` × ``height``: only decidable when the orientation
    swaps the sides of a non-square photo and the dimensions have the stored shape."""
    if not applied or (orientation or 1) not in SWAPS or width == height:
        return False
    aw, ah = applied
    if aw <= 0 or ah <= 0:
        return False
    # compare shapes, not sizes: the dimensions may be of a resized copy of the photo
    return abs(np.log(aw / ah) - np.log(height / width)) < abs(np.log(aw / ah) - np.log(width / height))


def to_oriented(box: Box, applied: tuple[float, float] | None, width: int, height: int,
                orientation: int | None) -> Box:
    """A region's normalised box in the oriented frame the table's boxes are in."""
    if is_stored_frame(applied, width, height, orientation):
        return orient_box(box, orientation)
    return box


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N×4 x, y, w, h) with every box of ``b`` (M×4)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(regions: np.ndarray, faces: np.ndarray, min_iou: float = MIN_IOU) -> list[tuple[int, int, float]]:
    """One-to-one pairs (region, face, IoU) with IoU ≥ ``min_iou``, best pairs first (a
    greedy assignment: two tags on one face, or one tag over two faces, give one pair)."""
    if len(regions) == 0 or len(faces) == 0:
        return []
    iou = iou_matrix(regions, faces)
    pairs = []
    order = np.argsort(-iou, axis=None, kind="stable")
    used_r, used_f = set(), set()
    for flat in order:
        r, f = divmod(int(flat), iou.shape[1])
        if iou[r, f] < min_iou:
            break
        if r in used_r or f in used_f:
            continue
        used_r.add(r)
        used_f.add(f)
        pairs.append((r, f, float(iou[r, f])))
    return pairs
