"""One photo in, its faces and chips out: decode → detect → align, with a status.

This is the CPU stage every path shares (scoring actors, training's embedding pass,
the HTTP endpoint).  A bad photo never raises: it comes back with its status.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.contract import NO_FACE, OK, TOO_LARGE
from pipeline.decoding import ImageError, decode_image
from pipeline.faces import Face, FaceDetector, crop_chips, main_face_index
from pipeline.geometry import DLIB_CHIP, ChipGeometry


@dataclass
class PhotoFaces:
    status: str                      # ok | no_face | decode_error | read_error | too_large
    error: str | None = None
    width: int | None = None
    height: int | None = None
    faces: list[Face] = field(default_factory=list)
    chips: np.ndarray = field(default_factory=lambda: np.zeros((0, 128, 128, 3), np.uint8))
    main: int | None = None          # the face the photo is "of" (training labels, thumbnails)


def analyse_photo(data: bytes, detector: FaceDetector, max_pixels: int,
                  max_bytes: int | None = None, geometry: ChipGeometry = DLIB_CHIP) -> PhotoFaces:
    if max_bytes is not None and len(data) > max_bytes:
        return PhotoFaces(TOO_LARGE, f"file is {len(data)} bytes, limit {max_bytes}")
    try:
        img = decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        return PhotoFaces(exc.status, exc.message)
    return analyse_image(img, detector, geometry)


def analyse_image(img, detector: FaceDetector, geometry: ChipGeometry = DLIB_CHIP) -> PhotoFaces:
    """Decoded pixels (a ``DecodedImage``: a photo, or a video frame) → faces and chips."""
    faces = detector.detect(img)
    chips = crop_chips(img, faces, geometry)
    return PhotoFaces(OK if faces else NO_FACE, None, img.width, img.height, faces, chips,
                      main_face_index(faces, img.width, img.height))
