"""A real 2-node Ray cluster on this machine (private network + PID namespace, as on a
real cluster each node has its own raylet and object store), jobs submitted with
``ray job submit --working-dir .`` over a real S3 server, and a worker node killed mid-job.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))
from cluster_scenario import run_scenario  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to make a private network namespace for the cluster")


@pytest.fixture(scope="module")
def cluster_report(data_dir, tmp_path_factory):
    photos = tmp_path_factory.mktemp("cluster-photos")
    groups = sorted((data_dir / "groups/images").rglob("*.jpg"))[:10]
    people = sorted((data_dir / "identities").rglob("*.jpg"))[::25][:50]
    for f in groups + people:
        (photos / f"{f.parent.name}__{f.name}").write_bytes(f.read_bytes())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    n = len(groups) + len(people) + 1
    labelled = tmp_path_factory.mktemp("cluster-labelled")
    for person in sorted(p for p in (data_dir / "identities").iterdir() if p.is_dir())[:5]:
        (labelled / person.name).mkdir()
        for f in sorted(person.glob("*.jpg"))[:12]:
            (labelled / person.name / f.name).write_bytes(f.read_bytes())
    faces = tmp_path_factory.mktemp("cluster-faces")
    _synthetic_table(faces, people=600, per=6, files=4)
    score = ["python", "jobs/score_directory.py", "--input", "s3://cluster/photos"]
    spec = {
        "nodes": 2, "head_cpus": 2, "worker_cpus": 1,
        "uploads": {"photos": str(photos), "labelled": str(labelled), "faces": str(faces)},
        "jobs": [
            {"entrypoint": [*score, "--output", "s3://cluster/scored"], "timeout_s": 600},
            {"entrypoint": ["python", "jobs/train_classifier.py", "--data", "s3://cluster/labelled",
                            "--output", "s3://cluster/model", "--workers", "2", "--epochs", "30"],
             "timeout_s": 900},
            # before the chaos job (it kills the worker node): small batches, so clustering is many tasks
            {"entrypoint": ["python", "jobs/cluster_faces.py", "--table", "s3://cluster/faces",
                            "--output", "s3://cluster/people", "--batch-faces", "300", "--sheet-people", "4"],
             "timeout_s": 600},
            {"entrypoint": [*score, "--output", "s3://cluster/chaos", "--crop-actors", "3",
                            "--model", "s3://cluster/model"],
             # 12 s: after the actors start, before the job ends (bf16 made it finish before 25 s)
             "kill_worker_after_s": 12, "timeout_s": 900},
        ],
        "read_tables": ["scored", "chaos", "people"],
        "objects": ["people/_index/index.json", "people/_people.json"],
        "task_names": ["_read_file", "_cluster_batch"],
    }
    report = run_scenario(spec)
    report["expected_faces"] = 600 * 6
    report["expected_photos"] = n
    return report


def _synthetic_table(folder: Path, people: int, per: int, files: int) -> None:
    """A prediction table of ``people`` × ``per`` faces (tight groups round random centres) in
    ``files`` Parquet files: the people job reads one file per task."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=(people, 128))
    x = np.repeat(c / np.linalg.norm(c, axis=1, keepdims=True), per, axis=0) + 0.02 * rng.normal(size=(people * per, 128))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for i, rows in enumerate(np.array_split(np.arange(len(x)), files)):
        pq.write_table(pa.table({
            "image_uri": [f"s3://cluster/faces-photos/{r:05d}.jpg" for r in rows], "status": ["ok"] * len(rows),
            "face_index": pa.array(np.zeros(len(rows), np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), 128)}),
            folder / f"part-{i}.parquet")


def test_two_nodes_run_the_scoring_job(cluster_report):
    assert cluster_report["alive_nodes_at_start"] == 2
    job = cluster_report["jobs"][0]
    assert job["returncode"] == 0, job["output_tail"]
    assert "faceray score_directory summary" in job["output_tail"]
    # no GPU: the fused crop + embed actors (pipeline/resources.py)
    crop_nodes = [n for name, n in cluster_report["actor_nodes"].items() if "FaceStage" in name]
    assert crop_nodes and crop_nodes[0] >= 2, cluster_report["actor_nodes"]  # both nodes worked
    t = cluster_report["tables"]["scored"]
    assert t["photos"] == t["photo_rows"] == cluster_report["expected_photos"]
    assert t["statuses"].get("decode_error") == 1


def test_training_job_writes_a_bundle_on_the_cluster(cluster_report):
    job = cluster_report["jobs"][1]
    assert job["returncode"] == 0, job["output_tail"]
    assert "s3://cluster/model" in job["output_tail"]


def test_people_job_runs_its_tasks_on_both_nodes(cluster_report):
    job = cluster_report["jobs"][2]
    assert job["returncode"] == 0, job["output_tail"]
    assert "faceray cluster_faces summary" in job["output_tail"]
    tasks = cluster_report["task_nodes"]
    for name in ("_read_file", "_cluster_batch"):   # pipeline/people/spread.py: the heavy per-shard tasks
        assert isinstance(tasks.get(name), dict) and len(tasks[name]) == 2, (name, tasks)
    assert cluster_report["tables"]["people"]["rows"] == cluster_report["expected_faces"]
    assert all(cluster_report["objects"].values()), cluster_report["objects"]   # people.json and the search index


def test_losing_a_worker_node_mid_job_loses_no_photo(cluster_report):
    job = cluster_report["jobs"][3]
    assert job["killed_raylets"], "the chaos step found no worker raylet to kill"
    assert job["returncode"] == 0, job["output_tail"]
    t = cluster_report["tables"]["chaos"]
    assert t["photos"] == t["photo_rows"] == cluster_report["expected_photos"]
    assert "identity" in t["columns"]  # labelled with the bundle trained on the cluster
