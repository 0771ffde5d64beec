"""Shared bits of the benchmarks: the machine line, medians, the photo sets."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.settings import Settings  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    print(f"date:    {time.strftime('%Y-%m-%d %H:%M')}")


def data_dir() -> Path:
    path = Path(Settings().data_dir)
    if not path.is_dir():
        sys.exit(f"real photos not found at {path}: set FACERAY_DATA_DIR")
    return path


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def portraits(n: int = 200) -> list[Path]:
    files = sorted((data_dir() / "identities").rglob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def group_photos() -> list[Path]:
    return sorted((data_dir() / "groups" / "images").rglob("*.jpg"))
