"""Listing and reading photos from local folders and a real S3 server (SeaweedFS)."""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from pipeline import storage


def _tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "one.JPG").write_bytes(b"1")
    (root / "a" / "b" / "two.png").write_bytes(b"22")
    (root / "three.tiff").write_bytes(b"333")
    (root / "notes.txt").write_bytes(b"not an image")
    (root / "a" / "b" / "four.webp").write_bytes(b"4444")
    return root


def test_local_listing_is_recursive_sorted_and_filters_by_extension(tmp_path):
    root = _tree(tmp_path)
    m = storage.list_images(str(root))
    uris = m.column("image_uri").to_pylist()
    assert uris == sorted(uris)
    assert {u.rsplit("/", 1)[1] for u in uris} == {"one.JPG", "two.png", "three.tiff", "four.webp"}
    sizes = dict(zip(uris, m.column("size").to_pylist()))
    assert sizes[str(root / "a" / "b" / "four.webp")] == 4
    assert storage.list_images(str(root), limit=2).num_rows == 2


def test_single_file_and_missing_input(tmp_path):
    root = _tree(tmp_path)
    assert storage.list_images(str(root / "three.tiff")).num_rows == 1
    with pytest.raises(storage.StorageError, match="not found"):
        storage.list_images(str(root / "nope"))
    with pytest.raises(storage.StorageError, match="unsupported URI"):
        storage.list_images("gs://bucket/x")


def test_s3_listing_and_reading(local_s3, tmp_path):
    root = _tree(tmp_path)
    local_s3.create_bucket("listing")
    local_s3.upload_dir(root, "listing", "photos")
    m = storage.list_images("s3://listing/photos")
    uris = m.column("image_uri").to_pylist()
    assert uris == sorted(uris) and len(uris) == 4
    assert all(u.startswith("s3://listing/photos/") for u in uris)
    fs, _ = storage.resolve("s3://listing/photos")
    assert isinstance(fs, pafs.S3FileSystem)
    by_name = {u.rsplit("/", 1)[1]: u for u in uris}
    assert storage.read_bytes(fs, by_name["two.png"]) == b"22"
    with pytest.raises(OSError):
        storage.read_bytes(fs, "s3://listing/photos/missing.jpg")


def test_s3_errors_are_one_line_reasons(local_s3):
    with pytest.raises(storage.StorageError, match="not found"):
        storage.list_images("s3://listing/no-such-prefix")
    with pytest.raises(storage.StorageError):
        storage.check_writable("s3://no-such-bucket-xyz/out")
