"""Batched face embeddings on CUDA or CPU: 128 px uint8 chips → unit 128-d vectors.

Why the resize: chips are stored at 128 px (``DLIB_CHIP.size``) but dlib's network was
trained at 150 px; fed 128 px directly it gives a different embedding (cos ≈ 0.62 to the
150 px one), while 128 → 150 bilinear on the device keeps cos ≈ 0.999.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.backbone import DLIB_RESNET, load_backbone
from pipeline.geometry import BackboneSpec
from pipeline.precision import PrecisionChoice, choose


def _ray_cpus() -> int | None:
    """CPUs Ray assigned to the current actor/task, or None outside a Ray worker."""
    if "ray" not in sys.modules:        # never import ray just to ask
        return None
    try:
        import ray

        if not ray.is_initialized():
            return None
        # empty on the driver; an actor's num_cpus (0.5 → 1) inside one
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        return None
    return max(1, round(cpus)) if cpus else None


def net_input(chips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N×S×S×3 chips (on their device) → float N×3×size×size channels_last, the
    network's input; shared by inference and fine-tuning so both see the same pixels."""
    # N×H×W×C uint8 viewed as NCHW is already channels_last in memory: no copy.
    x = chips.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


class Embedder:
    """``Embedder()(chips)``: uint8 N×128×128×3 RGB (aligned with ``spec.geometry``) →
    float32 N×128, L2-normalised.  One instance per process; not thread-safe.

    ``precision``: "fp32" (the default here: the exact network), "bf16", "fp16" or "auto"
    (``pipeline.precision.choose``; the pipeline passes ``Settings.precision``, "auto")."""

    spec: BackboneSpec = DLIB_RESNET

    def __init__(self, weights: str | os.PathLike | bytes | None = None, device: str | torch.device | None = None,
                 flip_tta: bool = False, batch_size: int = 32, threads: int | None = None,
                 precision: str = "fp32") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.flip_tta = flip_tta
        self.batch_size = max(1, int(batch_size))
        if self.device.type == "cpu":
            n = threads or _ray_cpus()
            if n:
                torch.set_num_threads(int(n))   # process-wide: one embedder per actor
        model, digest = load_backbone(weights)
        self.weights_sha256 = digest
        self.model_id = f"{self.spec.id}@{digest[:12]}" + ("+flip" if flip_tta else "")
        self.precision: PrecisionChoice = choose(precision, self.device.type)
        # channels_last is 1.3-1.5x faster for this net on CPU (notes §5.1), and good on GPU;
        # bf16 gains 2.8x over fp32 channels_last at batch 32, NCHW only 1.9x (benchmarks/README, precision).
        model = model.to(self.device, memory_format=torch.channels_last).eval()
        self._cast = self.device.type == "cpu" and self.precision.reduced
        self.model = model.to(self.precision.dtype) if self._cast else model
        self.net_input = self.spec.geometry.net_input

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        size = self.spec.geometry.size
        chips = np.asarray(chips)
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (size, size, 3):
            raise ValueError(f"chips must be uint8 N×{size}×{size}×3 RGB, got {chips.dtype} {chips.shape}")
        out = np.empty((len(chips), self.spec.embedding_dim), np.float32)
        for i in range(0, len(chips), self.batch_size):
            out[i:i + self.batch_size] = self._batch(chips[i:i + self.batch_size])
        return out

    @torch.inference_mode()
    def _batch(self, chips: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(chips))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = net_input(x, self.net_input)
        emb = self._forward(x)
        if self.flip_tta:
            emb = F.normalize(emb + self._forward(x.flip(3)), dim=1)
        return emb.cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cast:          # CPU bf16/fp16: weights cast at load, the input here
            y = self.model(x.to(self.precision.dtype))
        elif self.device.type == "cuda" and self.precision.reduced:
            with torch.autocast("cuda", dtype=self.precision.dtype):
                y = self.model(x)
        else:
            y = self.model(x)   # fp32; "auto" picks bf16 on CPU only where it is native
        return F.normalize(y.float(), dim=1)
