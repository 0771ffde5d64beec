"""URIs → pyarrow filesystems, listing photos into an Arrow manifest, reading bytes.

S3 settings come from the usual AWS variables so any S3-compatible store works.
pyarrow's own S3 client is used (not s3fs): Ray reads through it 3× faster here, and it
retries throttling (503 SlowDown) with exponential backoff.

Every wait on a store is bounded (``S3Limits``): an unreachable endpoint fails a read in
seconds, never minutes.  Measured here (pyarrow 8 attempts, 10 s connect, 60 s request,
the old settings): 51 s per read on a closed port, 8 min on a port that accepts and never
answers; with ``STORE_LIMITS`` about 5 s / 80 s, with ``PREVIEW_LIMITS`` 0.2 s / 10 s.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.contract import PHOTO_EXTENSIONS, VIDEO_EXTENSIONS, UsageError, extension

MANIFEST_SCHEMA = pa.schema([("image_uri", pa.string()), ("size", pa.int64())])


class StorageError(UsageError):
    """Misuse or an unreachable store: the job stops with this one-line reason."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@dataclass(frozen=True)
class S3Limits:
    """How long one S3 call may wait: TCP connect, a request with no bytes moving (not a
    whole transfer), and attempts in all (retries back off exponentially with jitter)."""
    connect_timeout_s: float
    request_timeout_s: float
    max_attempts: int


#: Tables, photos for scoring, models: enough attempts to ride out throttling.
STORE_LIMITS = S3Limits(connect_timeout_s=5, request_timeout_s=20, max_attempts=4)
#: Best-effort previews (contact-sheet thumbnails): a photo that does not come quickly
#: is a placeholder, not a wait.
PREVIEW_LIMITS = S3Limits(connect_timeout_s=2, request_timeout_s=5, max_attempts=2)


def s3_filesystem(environ: dict[str, str] | None = None, limits: S3Limits = STORE_LIMITS) -> pafs.S3FileSystem:
    """An S3 client from AWS_* variables (a bare S3FileSystem ignores AWS_ENDPOINT_URL)."""
    env = os.environ if environ is None else environ
    kwargs: dict = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=limits.max_attempts),
        "connect_timeout": limits.connect_timeout_s,
        "request_timeout": limits.request_timeout_s,
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme or "https"
    if env.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env.get("AWS_SECRET_ACCESS_KEY", "")
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, limits: S3Limits = STORE_LIMITS) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or ``s3://bucket/prefix``."""
    if is_s3(uri):
        return s3_filesystem(limits=limits), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _to_uri(uri_root: str, fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _is_image(path: str) -> bool:
    return extension(path) in PHOTO_EXTENSIONS


def _is_listed(path: str, videos: bool) -> bool:
    return extension(path) in PHOTO_EXTENSIONS or (videos and extension(path) in VIDEO_EXTENSIONS)


def list_images(uri: str, limit: int | None = None, threads: int = 16, videos: bool = False) -> pa.Table:
    """Every image (and with ``videos``, every video) under ``uri`` (recursively, sorted)
    as a manifest of (image_uri, size).

    The top level is listed first and its sub-prefixes are listed in parallel, each with the
    store's paginated listing, so a bucket of 10^6+ keys is not one long serial scan.
    """
    fs, root = resolve(uri)
    try:
        top = fs.get_file_info(root)
        if top.type == pafs.FileType.File:
            infos = [top]
        elif top.type == pafs.FileType.NotFound:
            raise StorageError(f"input not found: {uri}")
        else:
            level = fs.get_file_info(pafs.FileSelector(root, recursive=False))
            dirs = [i.path for i in level if i.type == pafs.FileType.Directory]
            infos = [i for i in level if i.type == pafs.FileType.File]
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for sub in pool.map(lambda d: fs.get_file_info(pafs.FileSelector(d, recursive=True)), dirs):
                    infos.extend(i for i in sub if i.type == pafs.FileType.File)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from exc
    files = sorted((i.path, i.size) for i in infos if _is_listed(i.path, videos))
    if limit is not None:
        files = files[:limit]
    return pa.table(
        {"image_uri": [_to_uri(uri, fs, p) for p, _ in files], "size": [s for _, s in files]},
        schema=MANIFEST_SCHEMA,
    )


def path_of(image_uri: str) -> str:
    """The filesystem path of an ``image_uri`` written by :func:`list_images`."""
    return image_uri[len("s3://"):] if is_s3(image_uri) else image_uri


def read_bytes(fs: pafs.FileSystem, image_uri: str) -> bytes:
    with fs.open_input_stream(path_of(image_uri)) as f:
        return f.read()


def check_writable(uri: str) -> None:
    """Fail before any work when the output location cannot be written."""
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise StorageError(f"cannot write output {uri}: {exc}") from exc


def is_hidden(path: str) -> bool:
    """Side and in-progress files (``_*``, ``.*``) are no part of a table."""
    return os.path.basename(path.rstrip("/")).startswith(("_", "."))


def table_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a table (a folder/prefix, or one file), sorted; side and
    in-progress files are skipped (and everything under a ``_``/``.`` folder such as a people
    output's ``_index/``, as pyarrow's own discovery does), a missing table has none.  What every reader of a
    prediction or people table lists, so they all agree on what the table is."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    root = path.rstrip("/") + "/"
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not any(is_hidden(part) for part in i.path[len(root):].split("/")))


def put_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that a reader sees all of it or nothing: locally under a
    hidden ``.<name>.inprogress`` name renamed into place; on S3 in one upload (an object
    exists only once its upload completes).  A first SIGINT/SIGTERM waits until it is done."""
    from pipeline import stopping

    with stopping.deferred():
        if isinstance(fs, pafs.S3FileSystem):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        head, name = os.path.split(path)
        tmp = os.path.join(head, f".{name}.inprogress")
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise


def put_parquet(fs: pafs.FileSystem, path: str, table: pa.Table, compression: str = "zstd") -> None:
    """A table as one whole Parquet file (``put_atomic``): every part file faceray writes."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    put_atomic(fs, path, buf.getvalue())
