"""The people job's reads of photos and objects: a store that cannot be reached or does
not answer costs bounded seconds and placeholders, never a hang, and a stop during those
reads exits at once (issue 23, "found while measuring")."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.table import BBOX, EMBEDDING_DIM

ROOT = Path(__file__).resolve().parent.parent
EXIT_WITHIN_S = 15.0


def synthetic_table(path: Path, people: int = 12, per: int = 6, bucket: str = "faceray-gone") -> Path:
    """A prediction table of ``people`` × ``per`` faces (one per photo) whose photos are
    ``s3://bucket/…``: tight clusters around random centres (cos to the centre ≈ 0.97)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(people, EMBEDDING_DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per, 0) + rng.normal(scale=0.015, size=(people * per, EMBEDDING_DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    n = len(x)
    bbox = pa.StructArray.from_arrays([pa.array(np.full(n, v, np.float32)) for v in (10, 10, 100, 100)],
                                      fields=list(BBOX))
    t = pa.table({"image_uri": [f"s3://{bucket}/photo-{i:04d}.jpg" for i in range(n)],
                  "status": ["ok"] * n, "face_index": pa.array(np.zeros(n, np.int32)), "bbox": bbox,
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), EMBEDDING_DIM)})
    path.mkdir(parents=True)
    pq.write_table(t, path / "part-00000.parquet")
    return path


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SilentServer:
    """A 127.0.0.1 TCP server that accepts connections and never answers: every read
    through it blocks until the client's own timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


def test_unreachable_store_gives_people_and_a_sheet_of_placeholders(tmp_path, monkeypatch):
    from pipeline.people import cluster_table

    table = synthetic_table(tmp_path / "table")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    out = tmp_path / "people"
    t0 = time.monotonic()
    summary = cluster_table(str(table), str(out), log=lambda _: None)
    seconds = time.monotonic() - t0
    print(f"METRIC people on an unreachable photo store: {seconds:.1f} s, {summary.unreadable} placeholders")
    assert summary.people == 12 and summary.faces == 72
    assert summary.sheet_faces == summary.unreadable == 12 * 6  # every photo unreadable: each a placeholder
    assert any(line.startswith("thumbnails:") and "72 unreadable" in line for line in summary.lines())
    page = (out / "_people.html").read_text()
    assert page.count('class="miss"') == 72 and "could not be read" in page
    assert json.loads((out / "_people.json").read_text())["sheet_unreadable"] == 72
    assert len(pd.read_parquet(out)) == 72


def test_sheet_reads_end_at_the_deadline_on_a_store_that_never_answers(tmp_path, monkeypatch):
    from pipeline.people.sheet import read_thumbnails

    server = SilentServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    try:
        faces = [(f"s3://faceray-gone/photo-{i}.jpg", 0) for i in range(40)]
        t0 = time.monotonic()
        got = read_thumbnails(faces, {}, 96, deadline_s=1.0)
        waited = time.monotonic() - t0
        print(f"METRIC thumbnails on a silent store: returned after {waited:.1f} s (deadline 1 s)")
        assert not any(got.values())
        assert waited < 5.0  # the deadline, not the reads (each would wait PREVIEW_LIMITS' seconds)
        assert server.accepted  # the reads did reach the store and were left blocked
    finally:
        server.close()


@pytest.mark.slow
def test_sigterm_during_the_sheets_reads_exits_within_15_s(tmp_path):
    table = synthetic_table(tmp_path / "table")
    server = SilentServer()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the job starts its own Ray
    env.update({"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}", "AWS_ACCESS_KEY_ID": "nobody",
                "AWS_SECRET_ACCESS_KEY": "nothing"})
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "cluster_faces.py"), "--table", str(table),
                                 "--output", str(tmp_path / "people"), "--num-cpus", "1"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while len(server.accepted) < 4:  # the sheet's reads are under way, blocked on the store
                assert proc.poll() is None, f"job exited {proc.returncode} first:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no read of the store in 180 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.1)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)  # a supervisor: the driver alone
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 60 s after SIGTERM:\n{log.read_text()[-3000:]}")
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            server.close()
    text = log.read_text(errors="replace")
    print(f"METRIC cluster_faces SIGTERM during the contact sheet's reads: exit {rc} in {seconds:.1f} s")
    assert "[sheet]" in text and "stopped by SIGTERM" in text, text[-3000:]
    assert rc == 143, text[-3000:]
    assert seconds < EXIT_WITHIN_S
