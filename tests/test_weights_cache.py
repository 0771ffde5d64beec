"""Converted model files kept under Settings.cache_dir (pipeline/weights_cache.py): the
networks and the detector give the same numbers from the cache as from the files."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from pipeline.attributes import AttributeNets
from pipeline.decoding import decode_image
from pipeline.faces import FaceDetector


def test_attribute_nets_same_from_cache(tmp_path):
    chips = np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)
    ref = AttributeNets(batch_size=8).run(chips)
    first = AttributeNets(batch_size=8, cache_dir=tmp_path).run(chips)   # converts and keeps
    assert len(list(tmp_path.glob("attributes-*.pt"))) == 1
    again = AttributeNets(batch_size=8, cache_dir=tmp_path).run(chips)   # reads the cache
    for out in (first, again):
        for task, (labels, scores) in ref.predictions.items():
            assert np.array_equal(labels, out.predictions[task][0]) and np.array_equal(scores, out.predictions[task][1])
        for name, feats in ref.features.items():
            assert np.array_equal(feats, out.features[name])


def test_detector_same_from_cache(tmp_path):
    from pipeline.settings import Settings

    photos = sorted((Settings().data_dir / "identities").glob("*/*.jpg"))[:3]
    ref = FaceDetector()
    FaceDetector(cache_dir=tmp_path)
    assert len(list(tmp_path.glob("yunet-dynamic-*.onnx"))) == 1
    cached = FaceDetector(cache_dir=tmp_path)
    for p in photos:
        img = decode_image(p.read_bytes())
        a, b = ref.detect(img), cached.detect(img)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert np.array_equal(x.bbox, y.bbox) and np.array_equal(x.landmarks, y.landmarks) and x.score == y.score


def test_warm_cache_skips_onnx_and_h5py(tmp_path):
    code = ("import sys; from pipeline.attributes import AttributeNets; from pipeline.faces import FaceDetector; "
            f"AttributeNets(cache_dir={str(tmp_path)!r}); FaceDetector(cache_dir={str(tmp_path)!r}); "
            "print('onnx' in sys.modules, 'h5py' in sys.modules)")
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert cold.stdout.split() == ["True", "True"]
    assert warm.stdout.split() == ["False", "False"]


def test_damaged_cache_file_converts_again(tmp_path):
    AttributeNets(cache_dir=tmp_path)
    (f,) = tmp_path.glob("attributes-*.pt")
    f.write_bytes(b"not a torch file")
    chips = np.zeros((2, 128, 128, 3), np.uint8)
    assert np.array_equal(AttributeNets(cache_dir=tmp_path).run(chips).features["age"],
                          AttributeNets().run(chips).features["age"])
