"""The reader of dlib's .dat format, on the real shipped weights and on broken copies."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from pipeline.backbone import default_weights_path, from_dlib
from pipeline.dlib_format import WeightsError, _Stream, parse_dlib_net, read_dlib_resnet


@pytest.fixture(scope="module")
def dat_bytes() -> bytes:
    return default_weights_path().read_bytes()


@pytest.fixture(scope="module")
def net(dat_bytes):
    return parse_dlib_net(dat_bytes, "dlib.dat")


# --- primitives: byte examples worked out from dlib's serialize.h / float_details.h ---

@pytest.mark.parametrize("raw, value", [
    (b"\x01\x00", 0), (b"\x01\x01", 1), (b"\x01\x96", 150), (b"\x02\x80\x12", 4736),
    (b"\x81\x1c", -28), (b"\x08\xff\xff\xff\xff\xff\xff\xff\x7f", 2**63 - 1),
])
def test_integer_encoding(raw, value):
    s = _Stream(raw, "x")
    assert s.int() == value and s.pos == len(raw)


@pytest.mark.parametrize("raw, value", [
    (b"\x03\x9a\x99\x99\x81\x18", np.float32(0.6)),   # 10066330 * 2^-24
    (b"\x01\x10\x81\x04", 1.0),                       # 16 * 2^-4
    (b"\x01\x00\x01\x0b", 0.0),
    (b"\x01\x00\x02\x00\x7d", math.inf),              # exponent 32000
])
def test_float_encoding(raw, value):
    assert _Stream(raw, "x").float() == value


def test_bad_integer_control_byte_is_an_error():
    with pytest.raises(WeightsError, match="control byte"):
        _Stream(b"\x31\x00", "x").int()


# --- the real file ---------------------------------------------------------------

def test_layer_counts_and_parameter_total(net):
    counts = Counter(layer.kind for layer in net.layers)
    assert counts == {"con": 29, "affine": 29, "relu": 29, "tag": 22, "add_prev": 14,
                      "avg_pool": 5, "max_pool": 1, "fc": 1}
    assert net.n_params == 5_614_592


def test_header_fields(net):
    assert net.loss == "loss_metric_2"
    assert net.dist_thresh == pytest.approx(0.6) and net.margin == pytest.approx(0.04)
    assert net.input_kind == "input_rgb_image_sized" and net.input_size == (150, 150)
    assert np.allclose(net.mean_rgb, (122.782, 117.001, 104.298), atol=1e-4)


def test_layer_shapes(net):
    convs = [layer for layer in net.layers if layer.kind == "con"]
    stem = convs[0]
    assert stem.arrays["weight"].shape == (32, 3, 7, 7)
    assert stem.attrs["stride"] == (2, 2) and stem.attrs["padding"] == (0, 0)
    # stride-2 convs use padding 0, all others padding 1 (dlib's default)
    for c in convs[1:]:
        assert c.arrays["weight"].shape[2:] == (3, 3)
        assert c.attrs["padding"] == ((0, 0) if c.attrs["stride"] == (2, 2) else (1, 1))
    assert sum(c.attrs["stride"] == (2, 2) for c in convs) == 5
    assert [c.arrays["weight"].shape[0] for c in convs][-3:] == [256, 256, 256]
    assert all(np.any(c.arrays["bias"] != 0) for c in convs)          # non-zero conv biases
    affines = [layer for layer in net.layers if layer.kind == "affine"]
    assert all(a.attrs["mode"] == "conv" for a in affines)
    fc = net.layers[-1]
    assert fc.kind == "fc" and fc.arrays["weight"].shape == (256, 128) and not fc.attrs["has_bias"]
    pools = [layer for layer in net.layers if layer.kind == "avg_pool"]
    assert (pools[-1].attrs["nr"], pools[-1].attrs["nc"]) == (0, 0)     # global average pool
    assert all(np.isfinite(layer.arrays["params"]).all() for layer in net.layers if layer.arrays)


def test_read_from_path_equals_parse(net):
    other = read_dlib_resnet(default_weights_path())
    assert [layer.kind for layer in other.layers] == [layer.kind for layer in net.layers]
    assert np.array_equal(other.layers[-1].arrays["weight"], net.layers[-1].arrays["weight"])


# --- broken files: a clear error naming the file --------------------------------------

def test_truncated_file_names_the_file(tmp_path, dat_bytes):
    bad = tmp_path / "half.dat"
    bad.write_bytes(dat_bytes[: len(dat_bytes) // 2])
    with pytest.raises(WeightsError, match=r"half\.dat.*truncated"):
        read_dlib_resnet(bad)


def test_trailing_bytes_are_an_error(tmp_path, dat_bytes):
    bad = tmp_path / "long.dat"
    bad.write_bytes(dat_bytes + b"\x00\x01")
    with pytest.raises(WeightsError, match=r"long\.dat.*unexpected bytes"):
        read_dlib_resnet(bad)


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "noise.dat"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match=r"noise\.dat"):
        read_dlib_resnet(bad)
    with pytest.raises(WeightsError, match=r"absent\.dat.*cannot read"):
        read_dlib_resnet(tmp_path / "absent.dat")


def test_corrupt_layer_header_is_reported(dat_bytes):
    i = dat_bytes.index(b"con_4")
    bad = dat_bytes[:i] + b"cox_4" + dat_bytes[i + 5:]
    with pytest.raises(WeightsError, match=r"w\.dat.*unsupported layer record 'cox_4'"):
        parse_dlib_net(bad, "w.dat")


def test_wrong_topology_is_rejected(dat_bytes):
    # Turn one tag wrapper (version 1) into an add_layer (version 2): still parseable
    # bytes up to that point, but no longer dlib's face ResNet.
    i = dat_bytes.index(b"\x01\x01", len(b"\x01\x01\x01\rloss_metric_2") + 12)
    bad = dat_bytes[:i] + b"\x01\x02" + dat_bytes[i + 2:]
    with pytest.raises(WeightsError, match=r"w\.dat"):
        from_dlib(parse_dlib_net(bad, "w.dat"))
