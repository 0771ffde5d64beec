"""A long job you can watch (issue 16): a real scoring job over real photos prints one
progress line that names the total from the start and rises to it, counted by the actors;
its end summary lands beside the table as _summary.json, which readers of the table skip;
the counts are Ray metrics."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from jobs import score_directory
from pipeline import progress, table

LINE = re.compile(r"^scoring: ([\d,]+)/([\d,]+) photos \((\d+)%\) \[[\d:d ]+\] \| (.*)$")


def _num(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def photos(data_dir, tmp_path_factory) -> Path:
    """56 real photos (faces and non-faces) and 4 bad files: 60 in all."""
    root = tmp_path_factory.mktemp("watch_photos")
    real = sorted((data_dir / "identities").rglob("*.jpg"))[:40] + sorted((data_dir / "nonfaces").rglob("*.jpg"))[:16]
    for i, f in enumerate(real):
        (root / f"{i:03d}-{f.name}").write_bytes(f.read_bytes())
    (root / "bad-empty.jpg").write_bytes(b"")
    (root / "bad-text.jpg").write_text("not a photo\n")
    (root / "bad-truncated.jpg").write_bytes(real[0].read_bytes()[:500])
    (root / "bad-empty2.png").write_bytes(b"")
    return root


def _progress(out: str) -> list[tuple[int, int, str]]:
    return [(_num(m[1]), _num(m[2]), m[4]) for m in (LINE.match(ln) for ln in out.splitlines()) if m]


def _printed_summary(out: str) -> dict:
    text = out.split("== faceray score_directory summary", 1)[1]
    photos = _num(re.search(r"photos scored: (\d+)", text)[1])
    faces = _num(re.search(r"faces found:\s+(\d+)", text)[1])
    status = re.search(r"rows by status \(photos\): (.*)", text)[1]
    by_status = {k: int(v) for k, v in (p.rsplit(" ", 1) for p in status.split(", "))}
    rate, seconds = re.search(r"throughput:\s+([\d.]+) photos/s over ([\d.]+) s", text).groups()
    return {"photos": photos, "faces": faces, "by_status": by_status, "rate": float(rate), "seconds": float(seconds)}


def test_progress_line_rises_to_the_total_and_the_summary_lands_beside_the_table(
        ray_cluster, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACERAY_PROGRESS", "log")
    out_dir = tmp_path / "table"
    argv = ["--input", str(photos), "--output", str(out_dir), "--no-attributes", "--progress-every", "0.5"]
    assert score_directory.main(argv) == 0
    out = capsys.readouterr().out
    lines = _progress(out)
    assert len(lines) >= 3, out
    # the total is the manifest's, from the very first line
    assert all(total == 60 for _, total, _ in lines), out
    assert lines[0][0] == 0 and "starting" in lines[0][2]
    done = [d for d, _, _ in lines]
    assert done == sorted(done) and done[-1] == 60, done
    assert "ETA 0:00:00" in lines[-1][2] and "photos/s" in lines[-1][2]

    # the final counts equal the table's
    t = pads.dataset(str(out_dir), format="parquet").to_table()
    firsts = table.first_rows(t).to_pandas()
    want_status = firsts["status"].value_counts().to_dict()
    want_faces = int(t.column("face_index").drop_null().__len__())
    assert len(firsts) == 60
    final = lines[-1][2]
    assert f"| {want_faces:,} faces |" in final, final
    assert progress.fmt_status(want_status) in final, (final, want_status)
    assert want_status.get("decode_error") == 4

    # _summary.json matches the printed summary, and readers of the table skip it
    printed = _printed_summary(out)
    summary = json.loads((out_dir / "_summary.json").read_text())
    assert {k: summary[k] for k in ("photos", "faces", "by_status")} == \
        {k: printed[k] for k in ("photos", "faces", "by_status")} == \
        {"photos": 60, "faces": want_faces, "by_status": want_status}
    assert summary["seconds"] == pytest.approx(printed["seconds"], abs=0.06)
    assert summary["photos_per_s"] == pytest.approx(printed["rate"], abs=0.06)
    assert summary["counted_by_actors"]["photos"] == 60 and summary["counted_by_actors"]["faces"] == want_faces
    assert summary["plan"].startswith("cluster ") and summary["faceray_version"]
    assert summary["models"]["backbone"] and summary["models"]["attributes"] is False
    assert summary["command"].startswith("score_directory.py --input")
    assert "_summary.json" in out
    assert len(pd.read_parquet(out_dir)) == t.num_rows
    assert pads.dataset(str(out_dir), format="parquet").count_rows() == t.num_rows

    # --resume over a grown folder: its own summary file, the first one untouched
    first = (out_dir / "_summary.json").read_text()
    new = photos / "zz-new.jpg"
    new.write_bytes(next(photos.glob("000-*")).read_bytes())
    try:
        assert score_directory.main([*argv, "--resume"]) == 0
        out2 = capsys.readouterr().out
    finally:
        new.unlink()
    assert (out_dir / "_summary.json").read_text() == first
    again = sorted(out_dir.glob("_summary-*.json"))
    assert len(again) == 1, again
    second = json.loads(again[0].read_text())
    assert second["photos"] == 1 and second["skipped"] == 60 and second["run_id"] in again[0].name
    assert all(total == 1 for _, total, _ in _progress(out2))
    assert len(pd.read_parquet(out_dir)) == t.num_rows + second["rows"]


def test_counts_are_ray_metrics(ray_cluster):
    import ray

    board = progress.create_board("test", "metrics", 10)
    try:
        board.add.remote(1, 3, 5, {"ok": 2, "decode_error": 1})
        board.add.remote(1, 3, 5, {"ok": 2, "decode_error": 1})  # a retried batch counts once
        snap = ray.get(board.snapshot.remote())
        assert (snap["photos"], snap["faces"], snap["by_status"], snap["duplicates"]) == \
            (3, 5, {"ok": 2, "decode_error": 1}, 1)
        assert set(ray.get(board.metric_names.remote())) >= {"faceray_photos", "faceray_faces",
                                                             "faceray_photo_errors", "faceray_photos_planned"}
        # the node's metrics agent exports them for Prometheus / Grafana
        port = ray._private.worker.global_worker.node.metrics_export_port
        text, deadline = "", time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                text = ""
            if 'faceray_photos_total' in text and 'run="metrics"' in text:
                break
            time.sleep(1)
        assert re.search(r'faceray_photos_total\{[^}]*run="metrics"[^}]*status="ok"[^}]*\} 2\.0', text), \
            [ln for ln in text.splitlines() if "faceray" in ln][:20]
        assert re.search(r'faceray_photo_errors_total\{[^}]*status="decode_error"[^}]*\} 1\.0', text)
        assert re.search(r'faceray_faces_total\{[^}]*run="metrics"[^}]*\} 5\.0', text)
    finally:
        ray.kill(board)


def test_progress_line_format():
    r = progress.Rates(started=0.0)
    for t, d in [(0, 0), (30, 300), (70, 700), (100, 1000)]:
        r.add(float(t), d)
    assert r.recent() == pytest.approx((1000 - 300) / 70)  # the last minute's window
    line = progress.progress_line("scoring", {"photos": 1000, "total": 10_000_000, "faces": 2345,
                                              "by_status": {"ok": 990, "no_face": 8, "decode_error": 2}},
                                  100.0, r)
    assert line.startswith("scoring: 1,000/10,000,000 photos (0%) [0:01:40] | 10.0 photos/s last min, 10.0 overall")
    assert "ETA 11d 13:45:00" in line and "2,345 faces | ok 990, no_face 8, decode_error 2" in line


def test_epoch_line_and_heartbeat():
    line = progress.epoch_line({"epoch": 2, "epochs": 60, "train_loss": 0.41234, "val_identity@linear_acc": 0.93,
                                "val_age@mlp_mae": 6.25, "val_identity@linear_loss": 0.2,
                                "rows_per_s_per_worker": 12345.0, "epoch_seconds": 1.234, "stopped": False})
    assert line == ("epoch 3/60 (max): train loss 0.4123 | val identity@linear acc 0.930, age@mlp mae 6.250 "
                    "| 12,345 rows/s/worker | 1.23 s")
    said: list[str] = []
    with progress.Heartbeat("cluster_faces", 0.3, said.append) as beat:
        beat.log("[reading] 10 faces from x: 0.0 s")
        time.sleep(1.0)
    assert said[0].startswith("[reading]")
    assert any(s.startswith("cluster_faces: working [0:00:0") and "last step [reading]" in s for s in said[1:]), said
