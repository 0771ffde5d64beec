"""Face-chip geometry: where the 5 landmarks land in a chip, and the similarity fit.

The backbone declares its geometry (see ``pipeline.backbone``); the crop stage only
reads it, so a second backbone can bring its own template without touching faces.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChipGeometry:
    """A chip of ``size`` px whose landmarks sit on ``template_norm`` (YuNet order).

    ``template_norm`` is in normalised pixel-centre units, ``(T + 0.5) / size``, so one
    template serves every chip size.  ``net_input`` is the side the network is fed at:
    chips are stored at ``size`` and resized to ``net_input`` on the device.
    """

    size: int
    net_input: int
    template_norm: tuple[tuple[float, float], ...]

    def template(self, size: int | None = None) -> np.ndarray:
        """Landmark template (5, 2) float64 in pixel coordinates of a ``size`` chip."""
        s = self.size if size is None else size
        return np.asarray(self.template_norm, dtype=np.float64) * s - 0.5


# Fitted in ../shared/notes/dlib-resnet.md §3.1: the mean position of YuNet's landmarks
# inside dlib's own 150 px chips (get_face_chip_details(shape, 150, 0.25)) over 153 faces.
# Order: eye image-left, eye image-right, nose tip, mouth image-left, mouth image-right.
DLIB_CHIP = ChipGeometry(
    size=128,
    net_input=150,
    template_norm=(
        (0.30786, 0.31269),
        (0.68407, 0.30921),
        (0.49703, 0.52238),
        (0.34085, 0.69132),
        (0.66181, 0.69064),
    ),
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src → dst.

    Umeyama (1991).  Returns the 2×3 matrix ``cv2.warpAffine`` takes.  Least squares
    rather than cv2's LMEDS/RANSAC: with 5 noisy points every point should count.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = (s**2).sum() / len(src)
    scale = (sig * sign).sum() / var_s if var_s > 0 else 1.0
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of faceray needs to know about a backbone: its id (stored in model
    bundles), embedding size, and the chip geometry its crops must use."""

    id: str
    embedding_dim: int
    geometry: ChipGeometry


DLIB_RESNET = BackboneSpec(id="dlib_resnet_v1", embedding_dim=128, geometry=DLIB_CHIP)
