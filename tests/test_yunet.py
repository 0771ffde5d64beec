"""pipeline.yunet (YuNet on ONNX Runtime) against OpenCV's own ``cv2.FaceDetectorYN``.

The runtime was swapped for speed; these tests hold it to OpenCV's detections on real
photos: same faces, same boxes, landmarks and scores.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.faces import default_model_path
from pipeline.yunet import YuNet


def _sorted(dets: np.ndarray) -> np.ndarray:
    return dets[np.lexsort((dets[:, 1], dets[:, 0]))]


def _photos(data_dir: Path) -> list[Path]:
    groups = sorted((data_dir / "groups").rglob("*.jpg"))[:40]
    portraits = sorted((data_dir / "identities").rglob("*.jpg"))[::60]
    nonfaces = sorted((data_dir / "nonfaces").rglob("*.jpg"))[::10]
    return groups + portraits + nonfaces


@pytest.mark.parametrize("max_side", [640, 300, 97])
def test_same_detections_as_opencv(data_dir: Path, max_side: int) -> None:
    cv2.setNumThreads(1)
    path = default_model_path()
    ours = YuNet(path, 0.6, 0.3, 5000)
    ref_net = cv2.FaceDetectorYN.create(path, "", (320, 320), 0.6, 0.3, 5000)
    faces = 0
    for photo in _photos(data_dir):
        bgr = cv2.imread(str(photo))
        h, w = bgr.shape[:2]
        s = max_side / max(h, w)
        bgr = cv2.resize(bgr, (max(1, round(w * s)), max(1, round(h * s))))  # odd sizes too
        ref_net.setInputSize((bgr.shape[1], bgr.shape[0]))
        ref = ref_net.detect(bgr)[1]
        ref = np.zeros((0, 15), np.float32) if ref is None else ref
        got = ours(bgr)
        assert got.dtype == np.float32 and got.shape[1] == 15
        assert len(got) == len(ref), photo.name
        if len(ref):
            np.testing.assert_allclose(_sorted(got), _sorted(ref), atol=0.01, err_msg=photo.name)
        faces += len(ref)
    if max_side == 640:
        assert faces > 200  # the comparison covered many faces, not empty outputs


def test_thresholds_apply(data_dir: Path) -> None:
    bgr = cv2.imread(str(sorted((data_dir / "groups").rglob("*.jpg"))[0]))
    loose, strict = YuNet(default_model_path(), 0.5)(bgr), YuNet(default_model_path(), 0.9)(bgr)
    assert len(loose) > len(strict) and (strict[:, 14] >= 0.9).all() and (loose[:, 14] >= 0.5).all()
    ref = cv2.FaceDetectorYN.create(default_model_path(), "", (bgr.shape[1], bgr.shape[0]), 0.5, 0.3, 3)
    top3 = YuNet(default_model_path(), 0.5, top_k=3)(bgr)  # top_k cuts candidates before NMS, as OpenCV
    assert 0 < len(top3) <= 3 and len(top3) == len(ref.detect(bgr)[1])


def test_blank_and_tiny_images_give_no_faces() -> None:
    net = YuNet(default_model_path())
    for shape in [(1, 1, 3), (31, 33, 3), (480, 640, 3)]:
        assert net(np.zeros(shape, np.uint8)).shape == (0, 15)


def test_other_onnx_models_are_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph), str(model))
    with pytest.raises(ValueError, match="not a YuNet"):
        YuNet(model)
