"""A Ray that faceray starts listens on 127.0.0.1 only, even when ``ray`` was imported
first (Ray reads its loopback switch at import time)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os, sys, time
import ray                                   # imported before faceray touches anything
sys.path.insert(0, sys.argv[1])
from pipeline.runtime import init_ray

init_ray(num_cpus=1)
time.sleep(2)                                # let the agents and the dashboard bind


def children(root):
    kids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        kids.setdefault(ppid, []).append(int(pid))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(kids.get(p, []))
    return out


inodes = set()
for pid in children(os.getpid()):
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:   # state LISTEN, owned by this Ray
            listening.append(f[1].split(":")[0])
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": listening}))
ray.shutdown()
"""


def _is_loopback(hex_addr: str) -> bool:
    """/proc/net/tcp{,6} local address (hex, per-word little-endian): 127.x, ::1, ::ffff:127.x."""
    if len(hex_addr) == 8:
        return hex_addr.endswith("7F")
    return hex_addr == "00000000000000000000000001000000" or (
        hex_addr.startswith("0000000000000000FFFF0000") and hex_addr.endswith("7F"))


def test_local_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["FACERAY_LOCAL_DASHBOARD"] = "true"   # off by default for a local Ray; checked here too
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True,
                         env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["gcs"].startswith("127.0.0.1:")
    assert len(report["listening"]) >= 3, report     # GCS, raylet, workers… were found
    assert all(_is_loopback(a) for a in report["listening"]), report
