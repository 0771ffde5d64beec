"""Misuse exits 2 with one line; a bug exits non-zero with its traceback (never disguised
as misuse).  Real processes, the job's own entry point; Ray is stubbed out only so the
process does not spend seconds starting a cluster the error never reaches."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import sys
sys.path.insert(0, {root!r})
import ray, pipeline.runtime
pipeline.runtime.init_ray = lambda *a, **k: None        # no cluster needed to reach the error
ray.cluster_resources = lambda: {{"CPU": 2.0}}
"""


def _run(body: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = PRELUDE.format(root=str(ROOT)) + textwrap.dedent(body) + f"\nsys.argv = {argv!r}\n" + \
        "from jobs.score_directory import main\nsys.exit(main())\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_misuse_exits_2_with_one_line(tmp_path):
    r = _run("", ["score_directory.py", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert lines == [f"score_directory: error: input not found: {tmp_path / 'nowhere'}"], r.stderr
    assert "Traceback" not in r.stderr


def test_a_bug_inside_the_job_keeps_its_traceback(tmp_path):
    """A ValueError raised deep inside (the old code called every ValueError misuse)."""
    bug = """
    import pipeline.storage
    def list_images(*a, **k):
        raise ValueError("bug: manifest arithmetic went wrong")
    pipeline.storage.list_images = list_images
    """
    (tmp_path / "in").mkdir()
    r = _run(bug, ["score_directory.py", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert r.returncode not in (0, 2), (r.returncode, r.stderr)
    assert "Traceback (most recent call last)" in r.stderr
    assert "ValueError: bug: manifest arithmetic went wrong" in r.stderr
    assert "score_directory: error:" not in r.stderr
