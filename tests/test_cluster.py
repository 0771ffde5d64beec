"""A real 2-node Ray cluster on this machine (private network + PID namespace, as on a
real cluster each node has its own raylet and object store), jobs submitted with
``ray job submit --working-dir .`` over a real S3 server, and a worker node killed mid-job.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

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
    score = ["python", "jobs/score_directory.py", "--input", "s3://cluster/photos"]
    spec = {
        "nodes": 2, "head_cpus": 2, "worker_cpus": 1,
        "uploads": {"photos": str(photos), "labelled": str(labelled)},
        "jobs": [
            {"entrypoint": [*score, "--output", "s3://cluster/scored"], "timeout_s": 600},
            {"entrypoint": ["python", "jobs/train_classifier.py", "--data", "s3://cluster/labelled",
                            "--output", "s3://cluster/model", "--workers", "2", "--epochs", "30"],
             "timeout_s": 900},
            {"entrypoint": [*score, "--output", "s3://cluster/chaos", "--crop-actors", "3",
                            "--model", "s3://cluster/model"],
             # 12 s: after the actors start, before the job ends (bf16 made it finish before 25 s)
             "kill_worker_after_s": 12, "timeout_s": 900},
        ],
        "read_tables": ["scored", "chaos"],
    }
    report = run_scenario(spec)
    report["expected_photos"] = n
    return report


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


def test_losing_a_worker_node_mid_job_loses_no_photo(cluster_report):
    job = cluster_report["jobs"][2]
    assert job["killed_raylets"], "the chaos step found no worker raylet to kill"
    assert job["returncode"] == 0, job["output_tail"]
    t = cluster_report["tables"]["chaos"]
    assert t["photos"] == t["photo_rows"] == cluster_report["expected_photos"]
    assert "identity" in t["columns"]  # labelled with the bundle trained on the cluster
