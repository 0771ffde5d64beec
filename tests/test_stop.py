"""Stop means stop (issue 18), with real processes: each job starts its own local Ray in its
own process group, gets SIGINT (to the group, as a terminal's Ctrl-C) or SIGTERM (to the
driver alone, as a supervisor), and must exit 130 / 143 within seconds, leave no process
behind, leave a readable output, and continue where it stopped.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXIT_WITHIN_S = 15.0

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the job starts its own Ray, not the test session's
    env.update({"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"})
    return env


class Job:
    """A job in its own session and process group (pgid == pid), output to a log file."""

    def __init__(self, script: str, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT,
                                     env=_env(), stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"job exited ({self.proc.returncode}) before {what}:\n{self.text[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout:.0f} s:\n{self.text[-3000:]}")
            time.sleep(0.2)

    def stop(self, sig: int, group: bool) -> tuple[int, float, set[int]]:
        """Send ``sig``; (exit code, seconds to exit, processes of the job alive before)."""
        before = _group(self.proc.pid) | _descendants(self.proc.pid)
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running 60 s after {signal.Signals(sig).name}:\n{self.text[-3000:]}")
        self._out.close()
        return rc, time.monotonic() - t0, before

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"not done after {timeout:.0f} s:\n{self.text[-3000:]}")
        self._out.close()
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read().decode(errors="replace")
    except OSError:
        return None
    return s[s.rfind(")") + 2:].split()  # state ppid pgrp ...


def _live() -> dict[int, list[str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) and st[0] != "Z":  # a zombie has exited
            out[int(name)] = st
    return out


def _group(pgid: int) -> set[int]:
    return {p for p, st in _live().items() if int(st[2]) == pgid}


def _descendants(pid: int) -> set[int]:
    live = _live()
    out, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for p, st in live.items():
            if int(st[1]) == parent and p not in out:
                out.add(p)
                todo.append(p)
    return out


def _assert_gone(job: Job, before: set[int]) -> None:
    """Nothing of the job's group, nor any process it had, is left (zombies aside)."""
    deadline = time.monotonic() + 3  # exited processes can take a moment to leave /proc
    while True:
        left = (_group(job.proc.pid) | {p for p in before if _stat(p) and _stat(p)[0] != "Z"})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    cmds = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if Path(f"/proc/{p}").exists()}
    assert not left, f"processes left after the stop: {cmds}"


def _check_stopped(job: Job, sig: int, group: bool) -> None:
    rc, seconds, before = job.stop(sig, group)
    name = signal.Signals(sig).name
    print(f"METRIC stop {job.log.stem} {name} {'group' if group else 'driver'}: exit {rc} in {seconds:.1f} s, "
          f"{len(before)} processes before")
    assert rc == 128 + sig, f"exit {rc} after {name}:\n{job.text[-3000:]}"
    assert seconds < EXIT_WITHIN_S, f"{seconds:.1f} s to exit after {name}"
    assert f"stopped by {name}" in job.text
    _assert_gone(job, before)


# ---------------------------------------------------------------- scoring


def _parts(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.parquet") if not p.name.startswith(("_", ".")))


def _assert_readable(out: Path) -> int:
    """Every file pyarrow can see reads whole; nothing half-written is left."""
    assert not [p for p in out.iterdir() if p.name.endswith(".inprogress")]
    rows = sum(pq.read_table(p).num_rows for p in _parts(out))
    assert pads.dataset(str(out), format="parquet").to_table(columns=["image_uri"]).num_rows == rows
    return rows


def test_scoring_stops_on_sigint_and_sigterm_and_resume_completes(data_dir, tmp_path):
    photos = tmp_path / "photos"  # ~5,600 real photos (identities linked twice): 35-50 s on 2 idle cores
    photos.mkdir()
    for name, src in [("identities", "identities"), ("identities-2", "identities"),
                      ("attributes", "attributes"), ("pairs", "pairs"), ("groups", "groups")]:
        if (data_dir / src).is_dir():
            (photos / name).symlink_to(data_dir / src)
    from pipeline.storage import list_images

    manifest = set(list_images(str(photos)).column("image_uri").to_pylist())
    out = tmp_path / "out"
    base = ["--input", str(photos), "--output", str(out), "--num-cpus", "2", "--file-seconds", "3"]

    # 1. Ctrl-C in a terminal: SIGINT to the whole process group, a few batches in
    job = Job("score_directory.py", base, tmp_path / "score-1.log")
    job.wait_for(lambda: len(_parts(out)) >= 1, 180, "first committed part file")
    _check_stopped(job, signal.SIGINT, group=True)
    first = _assert_readable(out)
    assert "to resume:" in job.text and "--resume" in job.text
    assert 0 < first

    # 2. a supervisor: SIGTERM to the driver alone, during the resumed run
    job = Job("score_directory.py", [*base, "--resume"], tmp_path / "score-2.log")
    n = len(_parts(out))
    job.wait_for(lambda: len(_parts(out)) > n, 180, "a part file of the resumed run")
    _check_stopped(job, signal.SIGTERM, group=False)
    second = _assert_readable(out)
    assert second > first

    # 3. --resume completes it: every photo exactly once
    job = Job("score_directory.py", [*base, "--resume"], tmp_path / "score-3.log")
    assert job.finish(300) == 0, job.text[-3000:]
    _assert_readable(out)
    t = pads.dataset(str(out), format="parquet").to_table(columns=["image_uri", "face_index"])
    keys = pc.binary_join_element_wise(t.column("image_uri"), pc.cast(pc.fill_null(t.column("face_index"), -1),
                                                                     "string"), "#")
    assert pc.count_distinct(keys).as_py() == t.num_rows, "a row written twice"
    assert set(t.column("image_uri").to_pylist()) == manifest
    print(f"METRIC stop scoring: {len(manifest)} photos, {t.num_rows} rows, {first} rows after the first stop, "
          f"{second} after the second")


# ---------------------------------------------------------------- endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_stops_on_sigint_to_its_group(tmp_path):
    import requests

    port = _free_port()
    job = Job("serve_api.py", ["--port", str(port), "--num-cpus", "2"], tmp_path / "serve.log")
    job.wait_for(lambda: "faceray serving" in job.text, 180, "endpoint")
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    _check_stopped(job, signal.SIGINT, group=True)
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- training


def test_training_stopped_and_restarted_continues_from_its_checkpoint(data_dir, tmp_path):
    people = tmp_path / "people"
    for person in sorted(p for p in (data_dir / "identities").iterdir() if p.is_dir())[:4]:
        (people / person.name).mkdir(parents=True)
        for f in sorted(person.glob("*.jpg"))[:15]:
            (people / person.name / f.name).symlink_to(f)
    out = tmp_path / "model"
    args = ["--data", str(people), "--output", str(out), "--workers", "1", "--num-cpus", "2",
            "--epochs", "30", "--patience", "30", "--cache", str(tmp_path / "cache"), "--no-report"]

    def checkpoints() -> int:
        return len(list(out.glob("checkpoints/fit-*/checkpoint_2*")))

    job = Job("train_classifier.py", args, tmp_path / "train-1.log")
    job.wait_for(lambda: checkpoints() >= 2, 240, "two epoch checkpoints")
    _check_stopped(job, signal.SIGINT, group=True)
    assert not (out / "model.json").exists()

    job = Job("train_classifier.py", args, tmp_path / "train-2.log")
    assert job.finish(300) == 0, job.text[-3000:]
    assert "continuing the interrupted fit" in job.text
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = [h["epoch"] for h in metrics["history"]]
    print(f"METRIC stop training: resumed from epoch {metrics['resumed_from']}, {len(epochs)} epochs in all")
    assert metrics["resumed_from"] >= 1
    assert epochs == list(range(30)), "every epoch exactly once across the two runs"
