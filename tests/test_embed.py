"""The torch backbone and the Embedder: parity with dlib itself on real face chips."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from pipeline.backbone import DLIB_RESNET, default_weights_path, load_backbone, save_backbone
from pipeline.dlib_format import WeightsError
from pipeline.embed import Embedder
from pipeline.geometry import DLIB_CHIP

N_PHOTOS = 12


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        msg = f"dlib (test extra dlib-bin) cannot be imported, so no parity check: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must run the parity tests")
        pytest.skip(msg)
    return dlib


@pytest.fixture(scope="module")
def dlib_chips(data_dir) -> np.ndarray:
    """150 px chips cut by dlib itself (HOG detector, 5-point predictor, get_face_chip)
    from LFW photos of different people."""
    dlib = _import_dlib()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(default_weights_path().parent / "shape_predictor_5_face_landmarks.dat"))
    people = sorted(p for p in (data_dir / "identities").iterdir() if p.is_dir())
    chips = []
    for person in people:
        photo = sorted(person.glob("*.jpg"))[0]
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        boxes = detector(rgb, 0)
        if boxes:
            chips.append(dlib.get_face_chip(rgb, predictor(rgb, boxes[0]), 150, 0.25))
        if len(chips) == N_PHOTOS:
            break
    assert len(chips) == N_PHOTOS, "dlib found too few faces in identities/"
    return np.stack(chips)


@pytest.fixture(scope="module")
def dlib_descriptors(dlib_chips) -> np.ndarray:
    dlib = _import_dlib()
    rec = dlib.face_recognition_model_v1(str(default_weights_path()))
    return np.array([np.array(rec.compute_face_descriptor(c)) for c in dlib_chips])


@pytest.fixture(scope="module")
def chips128(dlib_chips) -> np.ndarray:
    return np.stack([cv2.resize(c, (128, 128), interpolation=cv2.INTER_AREA) for c in dlib_chips])


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_raw_descriptors_match_dlib(dlib_chips, dlib_descriptors):
    model, _ = load_backbone()
    with torch.inference_mode():
        raw = model(torch.from_numpy(dlib_chips).permute(0, 3, 1, 2).float()).numpy()
    assert raw.shape == (N_PHOTOS, 128)
    assert np.abs(raw - dlib_descriptors).max() <= 1e-5
    # raw descriptors are not unit length (dlib's 0.6 threshold is on these)
    assert np.all(np.linalg.norm(raw, axis=1) > 1.1)


def test_channels_last_batch_matches_dlib_too(dlib_chips, dlib_descriptors):
    model, _ = load_backbone()
    model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(dlib_chips).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        raw = model(x).numpy()
    assert np.abs(raw - dlib_descriptors).max() <= 1e-5


def test_embedder_on_128_chips_agrees_with_dlib_150(embedder, chips128, dlib_descriptors):
    emb = embedder(chips128)
    ref = dlib_descriptors / np.linalg.norm(dlib_descriptors, axis=1, keepdims=True)
    cos = (emb * ref).sum(1)
    assert cos.min() >= 0.995, cos
    # and the faces stay apart: different people are far from each other
    other = emb @ ref.T
    assert (other - np.eye(N_PHOTOS) * 2).max() < 0.95


def test_output_shape_dtype_norm(embedder, chips128):
    emb = embedder(chips128)
    assert emb.shape == (N_PHOTOS, 128) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    empty = embedder(np.zeros((0, 128, 128, 3), np.uint8))
    assert empty.shape == (0, 128) and empty.dtype == np.float32


def test_deterministic_and_batch_size_independent(embedder, chips128):
    a, b = embedder(chips128), embedder(chips128)
    assert np.array_equal(a, b)
    small = Embedder(batch_size=5)(chips128)
    assert np.abs(small - a).max() < 1e-5


def test_flip_tta_differs_but_stays_close(embedder, chips128):
    plain = embedder(chips128)
    flip = Embedder(flip_tta=True)
    both = flip(chips128)
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    cos = (plain * both).sum(1)
    assert np.abs(both - plain).max() > 1e-3 and cos.min() > 0.97
    # averaging over a photo and its mirror image makes the result mirror-invariant
    mirrored = flip(np.ascontiguousarray(chips128[:, :, ::-1]))
    assert np.abs(mirrored - both).max() < 1e-4
    assert flip.model_id.endswith("+flip") and flip.model_id != embedder.model_id


def test_spec_and_model_id(embedder):
    assert Embedder.spec is DLIB_RESNET and embedder.spec.geometry is DLIB_CHIP
    assert embedder.spec.embedding_dim == 128 and embedder.spec.geometry.net_input == 150
    assert embedder.model_id.startswith("dlib_resnet_v1@") and len(embedder.weights_sha256) == 64


def test_rejects_wrong_chips(embedder):
    with pytest.raises(ValueError, match="uint8"):
        embedder(np.zeros((1, 128, 128, 3), np.float32))
    with pytest.raises(ValueError, match="128"):
        embedder(np.zeros((1, 150, 150, 3), np.uint8))


def test_bad_weights_raise_naming_the_file(tmp_path):
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(default_weights_path().read_bytes()[:1_000_000])
    with pytest.raises(WeightsError, match=r"truncated\.dat.*truncated"):
        Embedder(weights=str(truncated))
    with pytest.raises(WeightsError, match=r"nowhere\.dat"):
        Embedder(weights=str(tmp_path / "nowhere.dat"))
    fake_pt = tmp_path / "fake.pt"
    fake_pt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WeightsError, match=r"fake\.pt"):
        Embedder(weights=str(fake_pt))


def test_converted_state_dict_gives_same_embeddings(tmp_path, embedder, chips128):
    model, _ = load_backbone()
    save_backbone(model, tmp_path / "w.pt")
    assert np.array_equal(Embedder(weights=str(tmp_path / "w.pt"))(chips128), embedder(chips128))


def test_threads_setting():
    before = torch.get_num_threads()
    try:
        Embedder(threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_weights_found_without_importing_the_package():
    code = ("import sys; from pipeline.backbone import default_weights_path; "
            "p = default_weights_path(); assert p.is_file(); "
            "assert 'face_recognition_models' not in sys.modules; print(p.stat().st_size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 22_466_066
