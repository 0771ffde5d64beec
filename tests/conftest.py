"""Shared fixtures: the real-photo folder, and (in other files) real Ray and S3."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.settings import Settings


def _data_dir() -> Path:
    return Path(Settings().data_dir)


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


# Loopback only, no token auth, no usage stats: set before any Ray process starts.
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, local_s3):
    """One local Ray (2 CPUs, small object store) for the whole test run.

    Started after the S3 server so that Ray's workers inherit its AWS_* variables.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def local_s3():
    """A real SeaweedFS S3 server on 127.0.0.1 with the AWS_* variables pointing at it."""
    from pipeline.s3server import LocalS3

    with LocalS3() as s3:
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        yield s3
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
