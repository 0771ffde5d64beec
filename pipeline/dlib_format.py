"""Reader of dlib's ``.dat`` serialisation of a DNN (pure Python + numpy, no dlib).

Why: faceray ships dlib's face-recognition ResNet weights but must not need dlib at
run time.  The stream layout is documented in ``../shared/notes/dlib-resnet.md`` §1:
every network wrapper writes its version, then its sub-network, then its own layer,
so the file holds all wrapper versions (outer → inner) first, then the input layer,
then the layer records from the input side to the output side.  The topology (which
tag an ``add_prev`` adds) is not stored; ``pipeline.backbone`` checks the sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import ModelFileError


class WeightsError(ModelFileError):
    """A weights file that is missing, truncated, corrupt or of an unexpected network."""


@dataclass
class Layer:
    """One record, in input → output order.  ``kind`` drops the version suffix
    (``con_4`` → ``con``); tag and skip wrappers appear as kind ``tag`` with no data."""

    kind: str
    header: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DlibNet:
    source: str                       # file name or URI, for error messages
    loss: str
    margin: float
    dist_thresh: float
    input_kind: str
    mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]       # (rows, cols) the net was trained at
    layers: list[Layer]

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer.kind == kind)

    @property
    def n_params(self) -> int:
        """Stored learnable values (the ``params`` tensors), as dlib counts them."""
        return sum(int(layer.arrays["params"].size) for layer in self.layers if "params" in layer.arrays)


class _Stream:
    """Cursor over the file bytes with dlib's primitive decoders."""

    def __init__(self, data: bytes, source: str) -> None:
        self.buf = memoryview(data)
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> WeightsError:
        return WeightsError(f"{self.source}: not a valid dlib network file: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"file ends while reading {what} (truncated?)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, what: str = "an integer") -> int:
        ctrl = self.take(1, what)[0]
        n = ctrl & 0x0F
        if ctrl & 0x70 or not 1 <= n <= 8:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x} in {what}")
        value = int.from_bytes(self.take(n, what), "little")
        return -value if ctrl & 0x80 else value

    def float(self, what: str = "a float") -> float:
        if self.pos < len(self.buf) and self.buf[self.pos] & 0x70:
            raise self.fail(f"old ASCII float format in {what} is not supported")
        mantissa, exponent = self.int(what), self.int(what)
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def string(self, what: str = "a string") -> str:
        n = self.int(what)
        if n > 1 << 16:
            raise self.fail(f"implausible string length {n} in {what}")
        return bytes(self.take(n, what)).decode("latin-1")

    def bool(self, what: str = "a bool") -> bool:
        b = self.take(1, what)[0]
        if b not in (0x30, 0x31):
            raise self.fail(f"bad bool byte 0x{b:02x} in {what}")
        return b == 0x31

    def tensor(self, what: str = "a tensor") -> np.ndarray:
        version = self.int(what)
        if version != 2:
            raise self.fail(f"tensor version {version} (expected 2) in {what}")
        shape = tuple(self.int(what) for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"negative tensor shape {shape} in {what}")
        count = math.prod(shape)
        raw = self.take(4 * count, f"{what} ({count} floats)")
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self, what: str = "an alias tensor") -> tuple[int, int, int, int]:
        version = self.int(what)
        if version != 1:
            raise self.fail(f"alias_tensor version {version} (expected 1) in {what}")
        return tuple(self.int(what) for _ in range(4))  # type: ignore[return-value]

    def peek_string(self) -> str | None:
        """The string starting here, or None; the cursor does not move."""
        start = self.pos
        try:
            return self.string()
        except WeightsError:
            return None
        finally:
            self.pos = start


# --- layer records (the ``serialize(layer_details)`` part) ---------------------------

def _con(s: _Stream, header: str) -> Layer:
    params = s.tensor("con params")
    attrs = dict(num_filters=s.int(), nr=s.int(), nc=s.int(), stride=(s.int(), s.int()),
                 padding=(s.int(), s.int()))
    filt, bias = s.alias("con filters"), s.alias("con biases")
    attrs["multipliers"] = tuple(s.float() for _ in range(4))
    attrs["use_bias"] = s.bool() if header in ("con_5", "con_6") else True
    attrs["use_relu"] = s.bool() if header == "con_6" else False
    f, c, kh, kw = filt
    n_w = f * c * kh * kw
    n_b = f if attrs["use_bias"] else 0
    if (f, kh, kw) != (attrs["num_filters"], attrs["nr"], attrs["nc"]) or params.size != n_w + n_b:
        raise s.fail(f"{header}: params of {params.size} values do not fit filters {filt}")
    flat = params.reshape(-1)
    arrays = {"params": params, "weight": flat[:n_w].reshape(filt)}
    arrays["bias"] = flat[n_w:] if n_b else np.zeros(f, np.float32)
    return Layer("con", header, arrays, attrs)


def _affine(s: _Stream, header: str) -> Layer:
    params = s.tensor("affine params")
    g, b = s.alias("affine gamma"), s.alias("affine beta")
    mode = s.int("affine mode")
    disabled = s.bool() if header == "affine_2" else False
    n = math.prod(g)
    if params.size != 2 * n or math.prod(b) != n:
        raise s.fail(f"{header}: params of {params.size} values do not fit gamma {g}")
    flat = params.reshape(-1)
    return Layer("affine", header, {"params": params, "gamma": flat[:n], "beta": flat[n:]},
                 {"mode": "conv" if mode == 0 else "fc", "disabled": disabled})


def _relu(s: _Stream, header: str) -> Layer:
    return Layer("relu", header, attrs={"disabled": s.bool() if header == "relu_2" else False})


def _pool(s: _Stream, header: str) -> Layer:
    attrs = dict(nr=s.int(), nc=s.int(), stride=(s.int(), s.int()), padding=(s.int(), s.int()))
    return Layer(header.rsplit("_", 1)[0], header, attrs=attrs)


def _add_prev(s: _Stream, header: str) -> Layer:
    return Layer("add_prev", header)


def _fc(s: _Stream, header: str) -> Layer:
    n_out, n_in = s.int("fc num_outputs"), s.int("fc num_inputs")
    params = s.tensor("fc params")
    w, b = s.alias("fc weights"), s.alias("fc biases")
    bias_mode = s.int("fc bias_mode")
    multipliers = tuple(s.float() for _ in range(4))
    use_bias = s.bool() if header == "fc_3" else True
    has_bias = bias_mode == 0 and use_bias
    if w[:2] != (n_in, n_out) or params.size != n_in * n_out + (n_out if bias_mode == 0 else 0):
        raise s.fail(f"{header}: params of {params.size} values do not fit {n_in}→{n_out}")
    flat = params.reshape(-1)
    arrays = {"params": params, "weight": flat[:n_in * n_out].reshape(n_in, n_out)}
    if has_bias:
        arrays["bias"] = flat[n_in * n_out:]
    return Layer("fc", header, arrays, dict(num_outputs=n_out, num_inputs=n_in,
                                            multipliers=multipliers, has_bias=has_bias))


_READERS = {
    "con_4": _con, "con_5": _con, "con_6": _con,
    "affine_": _affine, "affine_2": _affine,
    "relu_": _relu, "relu_2": _relu,
    "max_pool_2": _pool, "avg_pool_2": _pool,
    "add_prev_": _add_prev,
    "fc_2": _fc, "fc_3": _fc,
}


def _layer(s: _Stream) -> Layer:
    header = s.string("a layer header")
    reader = _READERS.get(header)
    if reader is None:
        raise s.fail(f"unsupported layer record {header!r}")
    return reader(s, header)


def _add_layer_tail(s: _Stream) -> None:
    """The training state an ``add_layer`` (version 2/3) writes after its layer: skipped."""
    for _ in range(3):
        s.bool("add_layer flags")
    for _ in range(3):
        s.tensor("add_layer state tensor")


# --- the whole network --------------------------------------------------------------

def parse_dlib_net(data: bytes, source: str = "<bytes>") -> DlibNet:
    """Parse a serialised ``loss_metric`` network (dlib's face ResNet family)."""
    s = _Stream(data, source)
    if s.int("loss wrapper version") != 1:
        raise s.fail("loss wrapper version is not 1")
    loss = s.string("loss header")
    if loss != "loss_metric_2":
        raise s.fail(f"loss layer {loss!r} (expected 'loss_metric_2', a face-embedding net)")
    margin, dist_thresh = s.float("loss margin"), s.float("loss dist_thresh")

    versions: list[int] = []        # outer (output side) → inner (input side)
    while True:
        name = s.peek_string()
        if name is not None and name.startswith("input"):
            break
        v = s.int("a wrapper version")
        if v not in (1, 2, 3) or len(versions) > 100_000:
            raise s.fail(f"unexpected wrapper version {v} after {len(versions)} wrappers")
        versions.append(v)
    if not versions or versions[-1] not in (2, 3):
        raise s.fail("the innermost wrapper is not an add_layer")

    input_kind = s.string("input layer header")
    if input_kind != "input_rgb_image_sized":
        raise s.fail(f"input layer {input_kind!r} (expected 'input_rgb_image_sized')")
    mean_rgb = (s.float("avg_red"), s.float("avg_green"), s.float("avg_blue"))
    input_size = (s.int("input rows"), s.int("input cols"))

    layers = [_layer(s)]            # the innermost add_layer, next to the input
    _add_layer_tail(s)
    if versions[-1] == 3:
        s.int("sample_expansion_factor")
    for v in reversed(versions[:-1]):
        if v == 1:                  # tag or skip wrapper: nothing stored but the version
            layers.append(Layer("tag"))
        else:
            layers.append(_layer(s))
            _add_layer_tail(s)
    if s.pos != len(s.buf):
        raise s.fail(f"{len(s.buf) - s.pos} unexpected bytes after the network")
    return DlibNet(source, loss, margin, dist_thresh, input_kind, mean_rgb, input_size, layers)


def read_dlib_resnet(path: str | Path) -> DlibNet:
    """Read a dlib face-recognition ``.dat`` file; raises ``WeightsError`` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file: {exc.strerror or exc}") from exc
    return parse_dlib_net(data, str(path))


__all__ = ["DlibNet", "Layer", "WeightsError", "parse_dlib_net", "read_dlib_resnet"]
