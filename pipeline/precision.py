"""Which floating-point precision the face networks run in, per device.

``auto`` (the default, ``Settings.precision`` / ``FACERAY_PRECISION`` / ``--precision``):

* CUDA: bf16 where the GPU supports it (Ampere and later), fp16 otherwise (autocast);
* CPU: bf16 only where the CPU computes bf16 natively (x86 AMX-BF16 or AVX512-BF16,
  ARM's BF16 extension); fp32 everywhere else.  Without native support oneDNN emulates
  bf16 and the networks run 4-6× *slower* than fp32, so the rule must never guess.

A forced precision is obeyed as given (bf16 on a CPU without it is slow but correct; fp16
on CPU is correct but slower than fp32 on the CPUs measured: benchmarks/README.md,
precision).  On CPU the networks' weights are cast once at load and the inputs per batch
(faster than autocast, which re-casts every weight on every call: at batch 1 autocast was
slower than fp32); on CUDA the forward runs under ``torch.autocast``.  Outputs are always
float32.

torch is imported lazily: the driver's plan line (``resources.Plan.describe``) uses this
module without loading it.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]     # Settings.precision's type
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: /proc/cpuinfo flags that mean native bf16 arithmetic (x86: AMX tiles, AVX512 dot
#: products; aarch64 "Features": the BF16 extension).
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16", "bf16")


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16_features() -> tuple[str, ...]:
    """The CPU's native bf16 features (empty: none, so bf16 would be emulated).

    /proc/cpuinfo where there is one; elsewhere torch's own x86 probes."""
    flags = _cpuinfo_flags()
    if flags:
        return tuple(f for f in BF16_CPU_FLAGS if f in flags)
    if platform.machine().lower() in ("x86_64", "amd64"):
        import torch

        found = []
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            found.append("amx_bf16")     # torch checks AMX tiles; every AMX CPU has AMX-BF16
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            found.append("avx512_bf16")
        return tuple(found)
    return ()


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class PrecisionChoice:
    name: str          # "fp32" | "bf16" | "fp16"
    requested: str     # what the setting asked for
    reason: str        # why, for the plan line and logs

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def reduced(self) -> bool:
        return self.name != "fp32"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def choose(requested: str, device_type: str) -> PrecisionChoice:
    """The precision for networks on ``device_type`` ("cpu" | "cuda") under setting ``requested``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if device_type == "cuda":
        if requested != "auto":
            return PrecisionChoice(requested, requested, "forced")
        if cuda_bf16():
            return PrecisionChoice("bf16", requested, "auto: GPU has bf16")
        return PrecisionChoice("fp16", requested, "auto: GPU without bf16")
    features = cpu_bf16_features()
    if requested != "auto":
        if requested == "bf16" and not features:
            return PrecisionChoice(requested, requested, "forced, emulated on this CPU: slow")
        return PrecisionChoice(requested, requested, "forced" + (", slower than fp32 on CPU" if requested == "fp16" else ""))
    if features:
        return PrecisionChoice("bf16", requested, f"auto: CPU has {'/'.join(features)}")
    return PrecisionChoice("fp32", requested, "auto: CPU without native bf16")


def describe_for_plan(requested: str, gpus: bool) -> str:
    """The plan line's precision clause, decided on the driver without torch: for CPU
    actors from this machine's CPU (the workers' CPUs are taken to be alike), for GPU
    actors the rule (or the forced precision)."""
    if gpus:
        if requested == "auto":  # the driver may have no GPU: the actors decide on theirs
            return "precision auto: bf16 on GPUs with bf16, else fp16"
        return f"precision {choose(requested, 'cuda').describe()}"
    return f"precision {choose(requested, 'cpu').describe()}"
