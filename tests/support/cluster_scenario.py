"""A real Ray cluster of 1–N nodes on this machine, inside a private network and PID
namespace, with its own S3 server: submit jobs with ``ray job submit``, optionally kill a
worker node mid-job, and report what happened as JSON.

Run through :func:`run_scenario` (tests) or by hand:
    unshare --net --pid --fork --mount-proc python tests/support/cluster_scenario.py SPEC.json
In the namespace loopback is the only interface and only these processes are visible, so
the nodes can talk to each other on 127.0.0.1 and everything dies with the namespace.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ray(*args: str, env: dict, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), *args]
    return subprocess.run(cmd, env=env, check=check, capture_output=True, text=True, timeout=timeout)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from pipeline.s3server import LocalS3

    work = Path(tempfile.mkdtemp(prefix="faceray-cluster-"))
    report: dict = {"jobs": [], "nodes": spec.get("nodes", 2)}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a second node needs the real node IP path
    with LocalS3() as s3:
        env.update(s3.env)
        s3.create_bucket("cluster")
        for prefix, folder in spec.get("uploads", {}).items():
            s3.upload_dir(folder, "cluster", prefix)
        mem = str(1500 * 1024**2)
        _ray("start", "--head", "--port=6379", f"--num-cpus={spec.get('head_cpus', 2)}",
             f"--object-store-memory={300 * 1024**2}", f"--memory={mem}", "--dashboard-host=127.0.0.1",
             "--dashboard-port=8265", "--disable-usage-stats", f"--temp-dir={work / 'ray'}",
             '--resources={"head_node": 1}', env=env)
        worker_pids: set[int] = set()
        for _ in range(spec.get("nodes", 2) - 1):
            before = _pids()
            _ray("start", "--address=127.0.0.1:6379", f"--num-cpus={spec.get('worker_cpus', 1)}",
                 f"--object-store-memory={200 * 1024**2}", f"--memory={mem}", "--disable-usage-stats",
                 '--resources={"worker_node": 1}', env=env)
            worker_pids |= _pids() - before
        nodes = json.loads(_ray("list", "nodes", "--format=json", "--address=127.0.0.1:6379", env=env).stdout)
        report["alive_nodes_at_start"] = sum(1 for n in nodes if n.get("state") == "ALIVE")
        for job in spec["jobs"]:
            report["jobs"].append(_submit(job, env, worker_pids))
        actors = json.loads(_ray("list", "actors", "--detail", "--format=json", "--limit=10000",
                                 "--address=127.0.0.1:6379", env=env, check=False).stdout or "[]")
        report["actor_nodes"] = {}
        for a in actors:
            report["actor_nodes"].setdefault(a.get("class_name", "?"), set()).add(a.get("node_id"))
        report["actor_nodes"] = {k: len(v) for k, v in report["actor_nodes"].items()}
        report["task_nodes"] = _task_nodes(env, spec.get("task_names", []))
        fs = s3.filesystem()
        report["objects"] = {key: fs.get_file_info(f"cluster/{key}").type.name == "File"
                             for key in spec.get("objects", [])}
        for check in spec.get("read_tables", []):
            report.setdefault("tables", {})[check] = _read_table(s3, check)
        _ray("stop", "--force", env=env, check=False)  # inside the namespace: only our processes
    shutil.rmtree(work, ignore_errors=True)
    print("SCENARIO-REPORT " + json.dumps(report))
    return 0


def _task_nodes(env: dict, names: list[str]) -> dict[str, dict | str]:
    """Task name → {node id: finished tasks of that name on it}, from Ray's state API (one
    query per name: the API answers at most 10,000 rows)."""
    out = {}
    for name in names:
        got = _ray("list", "tasks", "--detail", "--format=json", "--limit=10000", f"--filter=name={name}",
                   "--filter=state=FINISHED", "--address=127.0.0.1:6379", env=env, check=False)
        try:
            out[name] = {}
            for t in json.loads(got.stdout):
                if t.get("node_id"):
                    out[name][t["node_id"][:8]] = out[name].get(t["node_id"][:8], 0) + 1
        except json.JSONDecodeError:
            out[name] = f"ray list tasks failed: {got.stderr[-500:]}"
    return out


def _submit(job: dict, env: dict, worker_pids: set[int]) -> dict:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address=http://127.0.0.1:8265",
           f"--working-dir={REPO}", "--", *job["entrypoint"]]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: list[int] = []
    if job.get("kill_worker_after_s") is not None:
        def chaos() -> None:
            time.sleep(job["kill_worker_after_s"])
            for pid in sorted(worker_pids):
                if "raylet" in _cmdline(pid).split(" ")[0]:
                    os.kill(pid, 9)
                    killed.append(pid)
        threading.Thread(target=chaos, daemon=True).start()
    try:
        out, _ = proc.communicate(timeout=job.get("timeout_s", 900))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return {"entrypoint": job["entrypoint"], "returncode": proc.returncode, "killed_raylets": killed,
            "seconds": round(time.monotonic() - started, 1), "output_tail": out[-6000:]}


def _read_table(s3, prefix: str) -> dict:
    """Rows, photos and statuses of a table the jobs wrote (its Parquet parts, as
    ``storage.table_files`` lists them: not the ``_``-named side folders)."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from pipeline import table
    from pipeline.storage import is_hidden

    fs, root = s3.filesystem(), f"cluster/{prefix}"
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.path.endswith(".parquet")
                   and not any(is_hidden(p) for p in i.path[len(root) + 1:].split("/")))
    if not files:  # the job wrote nothing: its output tail in the report says why
        return {"rows": 0, "photos": 0, "photo_rows": 0, "columns": [], "statuses": {}, "missing": True}
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    cols = ds.schema.names
    if "status" not in cols:  # a people table
        return {"rows": ds.count_rows(), "columns": cols}
    t = ds.to_table(columns=["image_uri", "status", "face_index"])
    first = table.first_rows(t)
    uris = first.column("image_uri").to_pylist()
    counts = first.group_by("status").aggregate([("image_uri", "count")])
    return {"rows": t.num_rows, "photos": len(set(uris)), "photo_rows": len(uris), "columns": cols,
            "statuses": dict(zip(counts["status"].to_pylist(), counts["image_uri_count"].to_pylist()))}


def run_scenario(spec: dict, timeout: float = 1500) -> dict:
    """Run a scenario in a fresh network + PID namespace (needs root, as on CI) → report."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, __file__, f.name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith("SCENARIO-REPORT "):
            return json.loads(line[len("SCENARIO-REPORT "):])
    raise RuntimeError(f"cluster scenario failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
