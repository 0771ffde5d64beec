"""Built-in attribute networks: torch ports vs independent references on real face chips.

References: ONNX Runtime on the Cydral ONNX files; Keras 3 (torch backend) loading fer's
HDF5 file itself.  Both get the very same input tensors as the ports, so a difference is
the port's.  The resampling from the chip is checked against OpenCV separately.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.attributes import (AGE_BINS, CYDRAL_AGE_INPUT, CYDRAL_GENDER_INPUT,
                                 EMOTION_LABELS, FER_INPUT, GENDER_LABELS, AttributeNets, ModelFileError,
                                 default_model_path, pyr_down, resample)
from pipeline.contract import ATTRIBUTE_TASKS
from pipeline.faces import FaceDetector, main_face_index
from pipeline.photos import analyse_photo
from pipeline.settings import Settings

TOL = 1e-4


@pytest.fixture(scope="module")
def chips(data_dir: Path) -> np.ndarray:
    """Main-face chips of 6 UTKFace and 7 FER2013 photos (one per emotion), made by the pipeline."""
    root = data_dir / "attributes"
    files = sorted((root / "utkface").glob("*.jpg"))[::100][:6]
    files += [sorted((root / "fer2013" / e).glob("*.jpg"))[0] for e in EMOTION_LABELS]
    settings = Settings.from_env()
    detector = FaceDetector.from_settings(settings)
    out = []
    for f in files:
        r = analyse_photo(f.read_bytes(), detector, settings.max_pixels)
        i = main_face_index(r.faces, r.width or 0, r.height or 0)
        if i is not None:
            out.append(r.chips[i])
    assert len(out) >= 10
    return np.stack(out)


@pytest.fixture(scope="module")
def nets() -> AttributeNets:
    return AttributeNets(device="cpu")


def _inputs(chips: np.ndarray, spec) -> torch.Tensor:
    return resample(torch.from_numpy(chips).permute(0, 3, 1, 2).float(), spec)


def test_labels_and_tasks_are_designs() -> None:
    assert EMOTION_LABELS == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    assert GENDER_LABELS == ("female", "male")
    assert ATTRIBUTE_TASKS == (("age", "regression"), ("gender", "classification"), ("emotion", "classification"))


@pytest.mark.parametrize("task, spec", [("age", CYDRAL_AGE_INPUT), ("gender", CYDRAL_GENDER_INPUT)])
def test_cydral_ports_match_onnxruntime(nets: AttributeNets, chips: np.ndarray, task: str, spec) -> None:
    import onnxruntime as ort

    x = _inputs(chips, spec)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # as the package runs it
    session = ort.InferenceSession(nets.model_paths[task], options, providers=["CPUExecutionProvider"])
    ref = session.run(None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        logits, _ = nets.nets[task](x.contiguous(memory_format=torch.channels_last))
    diff = float(np.abs(torch.softmax(logits, 1).numpy() - ref).max())
    print(f"{task}: max |torch − onnxruntime| = {diff:.2e} over {len(x)} real chips")
    assert diff < TOL


def test_emotion_port_matches_keras(nets: AttributeNets, chips: np.ndarray) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    model = keras.models.load_model(nets.model_paths["emotion"], compile=False)
    assert model.input_shape == (None, 64, 64, 1) and FER_INPUT.size == 64 and FER_INPUT.grey
    x = _inputs(chips, FER_INPUT)
    ref = np.asarray(model.predict(x.permute(0, 2, 3, 1).numpy(), verbose=0))      # NHWC, fer's label order
    with torch.inference_mode():
        logits, _ = nets.nets["emotion"](x)
    diff = float(np.abs(torch.softmax(logits, 1).numpy() - ref).max())
    print(f"emotion: max |torch − keras| = {diff:.2e} over {len(x)} real chips")
    assert diff < TOL
    # the full chain, mapped to faceray's labels by name (fer.FER._get_labels order)
    fer_order = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    out = nets.run(chips)
    for j, label in enumerate(EMOTION_LABELS):
        assert np.abs(out.probabilities["emotion"][:, j] - ref[:, fer_order.index(label)]).max() < TOL
    assert list(out.predictions["emotion"][0]) == [fer_order[k] for k in ref.argmax(1)]


def test_resampling_matches_opencv(chips: np.ndarray) -> None:
    """The age crop (no pyramid level) equals cv2.warpAffine of the chip with the same map."""
    spec = CYDRAL_AGE_INPUT
    assert spec.pyramid_levels(128) == 0 and CYDRAL_GENDER_INPUT.pyramid_levels(128) == 1
    k = 128 * spec.side / spec.size
    t = 128 * (spec.centre[0] - spec.side / 2) + k / 2 - 0.5      # output px i ↦ chip px k·i + t
    m = np.array([[k, 0, t], [0, k, t]])
    ref = np.stack([cv2.warpAffine(c.astype(np.float32), m, (spec.size, spec.size), borderMode=cv2.BORDER_REPLICATE,
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) for c in chips])
    ours = (_inputs(chips, spec) / spec.scale + torch.tensor(spec.mean)[None, :, None, None]).permute(0, 2, 3, 1)
    diff = np.abs(ours.numpy() - ref)
    # OpenCV rounds the source position to 1/32 px: that is the whole difference (a
    # half-pixel shift of the crop would give a mean of several grey levels)
    print(f"resampling vs OpenCV: mean {diff.mean():.3f}, max {diff.max():.2f} grey levels")
    assert diff.mean() < 0.2 and diff.max() < 6.0
    grey = chips[0, :, :, 1].astype(np.float32)
    assert np.abs(pyr_down(torch.from_numpy(grey)[None, None])[0, 0].numpy() - cv2.pyrDown(grey)).max() < 1e-3


def test_predictions_shapes_ranges_and_batching(nets: AttributeNets, chips: np.ndarray) -> None:
    out = nets.run(chips)
    n = len(chips)
    age, age_score = out.predictions["age"]
    assert age.dtype == np.float32 and age.shape == (n,) and ((age >= 0.25) & (age <= 80)).all()
    np.testing.assert_allclose(age, out.probabilities["age"] @ AGE_BINS, rtol=1e-5)
    for task, labels in (("gender", GENDER_LABELS), ("emotion", EMOTION_LABELS)):
        values, _ = out.predictions[task]
        assert values.dtype == object and set(values) <= set(labels)
    for task, _ in ATTRIBUTE_TASKS:
        score = out.predictions[task][1]
        assert score.dtype == np.float32 and ((score >= 0) & (score <= 1)).all()
    dims = {"age": 256, "gender": 16, "emotion": 128, "emotion_taps": 9 * 128}
    assert {k: v.shape for k, v in out.features.items()} == {k: (n, d) for k, d in dims.items()}
    assert nets(chips)["gender"][0].tolist() == out.predictions["gender"][0].tolist()
    small = AttributeNets(device="cpu", batch_size=4).run(chips)
    for task, _ in ATTRIBUTE_TASKS:
        assert np.abs(small.probabilities[task] - out.probabilities[task]).max() < 1e-5
    empty = nets(np.zeros((0, 128, 128, 3), np.uint8))
    assert all(len(v[0]) == 0 and len(v[1]) == 0 for v in empty.values())
    with pytest.raises(ValueError, match="uint8"):
        nets(np.zeros((1, 150, 150, 3), np.uint8))


@pytest.mark.parametrize("task", ["age", "gender", "emotion"])
def test_missing_or_corrupt_model_file_is_named(tmp_path: Path, task: str) -> None:
    missing = tmp_path / f"missing-{task}.bin"
    with pytest.raises(ModelFileError, match=str(missing)):
        AttributeNets(device="cpu", model_paths={task: str(missing)})
    corrupt = tmp_path / Path(default_model_path(task)).name
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n not a model" * 10)
    with pytest.raises(ModelFileError, match=str(corrupt)):
        AttributeNets(device="cpu", model_paths={task: str(corrupt)})
    other = default_model_path("gender" if task == "age" else "age")   # a valid file of another network
    with pytest.raises(ValueError, match=os.path.basename(other)):
        AttributeNets(device="cpu", model_paths={task: other})
