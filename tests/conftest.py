"""Shared fixtures: the real-photo folder, and (in other files) real Ray and S3."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.settings import get_settings


def _data_dir() -> Path:
    return Path(get_settings().data_dir)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (or FACERAY_DATA_DIR); skips where absent, fails in CI."""
    path = _data_dir()
    if not path.is_dir():
        msg = f"real test photos not found at {path} (set FACERAY_DATA_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must run these tests")
        pytest.skip(msg)
    return path
