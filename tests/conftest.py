"""Shared fixtures: the real-photo folder, real Ray and S3, and one scored + clustered
table of the real photos for the people and naming tests."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.settings import Settings

sys.path.insert(0, str(Path(__file__).parent / "support"))  # helpers the tests share (train_chaos, …)


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


PEOPLE = 5


@pytest.fixture(scope="session")
def people(data_dir) -> dict[str, list[Path]]:
    """The 5 identities with most photos (sorted), photos sorted by name."""
    folders = [d for d in sorted((data_dir / "identities").iterdir()) if d.is_dir()]
    folders.sort(key=lambda d: -len(list(d.glob("*.jpg"))))
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(folders[:PEOPLE])}


FINETUNE_PER = 14   # photos per person the fine-tuned bundle trains on (the rest are held out)


def training_folder(people: dict[str, list[Path]], per: int, root: Path) -> Path:
    """``root/<person>/<photo>``: the first ``per`` photos of each person, as symlinks."""
    for name, files in people.items():
        (root / name).mkdir()
        for f in files[:per]:
            (root / name / f.name).symlink_to(f)
    return root


def train_job(argv: list[str]) -> str:
    """``train_classifier.py`` as a user runs it, in this process; its output (it must succeed)."""
    import contextlib
    import io

    from jobs.train_classifier import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0, buf.getvalue()[-3000:]
    return buf.getvalue()


@pytest.fixture(scope="session")
def tuned_bundle(ray_cluster, people, tmp_path_factory):
    """``train_classifier.py --finetune last`` as a user runs it, on 5 people × 14 photos,
    2 workers: (bundle folder, metrics, stdout, training folder, embedding cache).

    With ``TrainConfig.keep_tuned``: the tests that use it check how a tuned network is
    carried, scored and served, so the bundle must hold one; whether tuned beats frozen on
    ~10 validation faces is a coin toss here (bf16 embeddings vary with batch composition:
    CI saw both outcomes), and keeping the better one is test_training's starved set."""
    import dataclasses
    import json
    from unittest import mock

    from pipeline.training import config

    @dataclasses.dataclass
    class KeepTuned(config.TrainConfig):
        keep_tuned: bool = True

    train = training_folder(people, FINETUNE_PER, tmp_path_factory.mktemp("finetune-train"))
    out = tmp_path_factory.mktemp("finetune-bundle")
    cache = str(tmp_path_factory.mktemp("finetune-cache"))
    with mock.patch.object(config, "TrainConfig", KeepTuned):
        stdout = train_job(["--data", str(train), "--output", str(out), "--workers", "2", "--epochs", "15",
                            "--finetune", "last", "--finetune-epochs", "3", "--cache", cache, "--no-report"])
    return out, json.loads((out / "metrics.json").read_text()), stdout, train, cache


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


FIRST_PHOTOS = 700   # identities photos in URI order scored before the first clustering


@pytest.fixture(scope="session")
def people_run(ray_cluster, data_dir, tmp_path_factory):
    """(table, people after the first part, people after --resume with the rest).

    One prediction table of the identities and unknown photos (no attributes: people and
    naming need only embeddings) scored in two steps, clustered after each; shared by
    test_people.py and test_naming.py so the session scores the photos once."""
    from jobs import cluster_faces, score_directory

    root = tmp_path_factory.mktemp("people")
    table, out = str(root / "table"), str(root / "people")
    ids = str(data_dir / "identities")
    assert score_directory.main(["--input", ids, "--output", table, "--limit", str(FIRST_PHOTOS),
                                 "--no-attributes"]) == 0
    assert cluster_faces.main(["--table", table, "--output", out]) == 0
    first = str(root / "people_first")
    shutil.copytree(out, first)
    assert score_directory.main(["--input", ids, "--output", table, "--resume", "--no-attributes"]) == 0
    assert score_directory.main(["--input", str(data_dir / "unknown"), "--output", table, "--no-attributes"]) == 0
    assert cluster_faces.main(["--table", table, "--output", out, "--resume"]) == 0
    return table, first, out


def labelled(table: str, people_dir: str) -> pd.DataFrame:
    """People rows of each photo's main face (the centred one LFW labels) with its folder name."""
    t = pd.read_parquet(table, columns=["image_uri", "status", "face_index", "bbox", "width", "height"])
    t = t[t.status == "ok"].copy()
    b = pd.DataFrame(t.bbox.tolist(), index=t.index)
    t["d"] = np.hypot(b.x + b.w / 2 - t.width / 2, b.y + b.h / 2 - t.height / 2)
    main = t.sort_values("d").groupby("image_uri").head(1)[["image_uri", "face_index"]]
    p = pd.read_parquet(people_dir).merge(main, on=["image_uri", "face_index"])
    p["truth"] = p.image_uri.str.split("/").str[-2]
    return p
