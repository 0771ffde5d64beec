"""The scoring job end to end: real photos on a real S3 server, a real local Ray."""
from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
from PIL import Image

import pipeline.decoding  # noqa: F401 - registers the HEIF writer the fixture saves with
from jobs import score_directory
from pipeline import table
from pipeline.attributes import EMOTION_LABELS
from pipeline.predict import table_tasks

BUCKET = "scoring"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF))


def _bad_and_odd_files(face_jpeg: Path, group_jpeg: Path, dest: Path) -> dict[str, str]:
    """Generated inputs with the status each must get (phone formats made from real photos)."""
    dest.mkdir(parents=True)
    data = face_jpeg.read_bytes()
    img = Image.open(face_jpeg).convert("RGB")
    (dest / "empty.jpg").write_bytes(b"")
    (dest / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (dest / "text.jpg").write_text("this is not a photo\n")
    img.convert("CMYK").save(dest / "cmyk.jpg", quality=92)
    rgb16 = (np.asarray(img).astype(np.uint16) * 257)[:, :, ::-1]
    cv2.imwrite(str(dest / "sixteen.png"), rgb16)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    img.transpose(Image.Transpose.ROTATE_90).save(dest / "rotated.jpg", exif=exif.tobytes(), quality=92)
    (dest / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    img.save(dest / "phone.heic", format="HEIF", quality=90)   # iPhones
    img.save(dest / "phone.avif", format="AVIF", quality=90)   # browsers, Android
    group = Image.open(group_jpeg).convert("RGB")
    group.transpose(Image.Transpose.ROTATE_90).save(dest / "rotated.heic", format="HEIF", quality=90,
                                                    exif=exif.tobytes())
    return {"empty.jpg": "decode_error", "truncated.jpg": "decode_error", "text.jpg": "decode_error",
            "cmyk.jpg": "ok", "sixteen.png": "ok", "rotated.jpg": "ok", "bomb.png": "too_large",
            "phone.heic": "ok", "phone.avif": "ok", "rotated.heic": "ok"}


@pytest.fixture(scope="module")
def photo_set(data_dir, tmp_path_factory, local_s3):
    """A mixed folder on S3: group photos, portraits, non-faces, examples, bad files."""
    root = tmp_path_factory.mktemp("photos")
    rng = random.Random(7)
    picks = {
        "groups": sorted((data_dir / "groups/images").rglob("*.jpg"))[:6],
        "identities": rng.sample(sorted((data_dir / "identities").rglob("*.jpg")), 8),
        "nonfaces": rng.sample(sorted((data_dir / "nonfaces").rglob("*.jpg")), 12),
        "examples": sorted((data_dir / "fr_examples/misc").glob("*"))[:6],
    }
    for group, files in picks.items():
        (root / group).mkdir()
        for f in files:
            (root / group / f.name).write_bytes(f.read_bytes())
    expected = _bad_and_odd_files(picks["identities"][0], picks["groups"][0], root / "odd")
    local_s3.create_bucket(BUCKET)
    n = local_s3.upload_dir(root, BUCKET, "photos")
    return {"root": root, "count": n, "expected": expected, "picks": picks}


def _read(local_s3, prefix: str):
    return pads.dataset(f"{BUCKET}/{prefix}", filesystem=local_s3.filesystem(), format="parquet").to_table()


def test_every_photo_gets_a_row_with_the_right_status(ray_cluster, local_s3, photo_set, capsys):
    rc = score_directory.main(["--input", f"s3://{BUCKET}/photos", "--output", f"s3://{BUCKET}/out"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "faceray score_directory summary" in out and f"photos scored: {photo_set['count']}" in out

    t = _read(local_s3, "out")
    assert t.schema.equals(table.prediction_schema(table_tasks(True)), check_metadata=False)
    uris = set(t.column("image_uri").to_pylist())
    assert len(uris) == photo_set["count"]
    rows = t.to_pylist()
    by_name = {}
    for r in rows:
        by_name.setdefault(r["image_uri"].rsplit("/", 1)[1], []).append(r)

    for name, status in photo_set["expected"].items():
        assert by_name[name][0]["status"] == status, (name, by_name[name][0])
        if status not in ("ok", "no_face"):
            assert by_name[name][0]["error"], name
    rot, upright = by_name["rotated.jpg"][0], by_name[photo_set["picks"]["identities"][0].name][0]
    assert (rot["width"], rot["height"]) == (upright["width"], upright["height"])
    for name in ("phone.heic", "phone.avif"):  # the same portrait, same face, in phone formats
        assert by_name[name][0]["face_count"] == upright["face_count"] >= 1, name
        assert np.dot(by_name[name][0]["embedding"], upright["embedding"]) > 0.95, name
    group = photo_set["picks"]["groups"][0].name
    rot_heic, group_rows = by_name["rotated.heic"], by_name[group]
    assert (rot_heic[0]["width"], rot_heic[0]["height"]) == (group_rows[0]["width"], group_rows[0]["height"])
    assert rot_heic[0]["face_count"] >= 0.8 * group_rows[0]["face_count"] >= 2   # upright again: faces found

    for f in photo_set["picks"]["groups"]:
        assert by_name[f.name][0]["face_count"] >= 3, f.name
    nonface = [by_name[f.name][0]["status"] for f in photo_set["picks"]["nonfaces"]]
    assert nonface.count("no_face") >= 0.8 * len(nonface)

    for r in rows:  # one row per face, indexes 0..n-1, unit embeddings
        if r["status"] == "ok":
            assert 0 <= r["face_index"] < r["face_count"]
            assert abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4
            b = r["bbox"]
            assert b["w"] >= 20 and b["h"] > 0 and -b["w"] < b["x"] < r["width"]
        else:
            assert r["face_index"] is None and r["embedding"] is None
    faces_rows = [r for r in rows if r["face_index"] is not None]
    assert {r["gender"] for r in faces_rows} == {"female", "male"}   # DESIGN.md's labels exactly
    assert {r["emotion"] for r in faces_rows} <= set(EMOTION_LABELS) and len({r["emotion"] for r in faces_rows}) >= 2
    assert all(0 <= r["age"] <= 100 for r in faces_rows)
    assert all(0 <= r[f"{k}_score"] <= 1 for r in faces_rows for k in ("age", "gender", "emotion"))
    assert all(r["age"] is None and r["gender"] is None for r in rows if r["face_index"] is None)
    assert all(r["model_version"] is None for r in rows)   # built-ins need no model
    faces = pc.sum(pc.is_valid(t.column("face_index"))).as_py()
    assert len(rows) == faces + sum(1 for r in rows if r["face_index"] is None)

    df = t.to_pandas()  # pandas reads the contract's types
    assert str(df["width"].dtype) in ("float64", "Int32", "int32")
    assert len(df.loc[df.status == "ok"].iloc[0]["landmarks"]) == 10


def test_resume_adds_only_the_missing_photos(ray_cluster, local_s3, photo_set, capsys):
    out = f"s3://{BUCKET}/resumed"
    assert score_directory.main(["--input", f"s3://{BUCKET}/photos", "--output", out, "--limit", "10"]) == 0
    assert len(set(_read(local_s3, "resumed").column("image_uri").to_pylist())) == 10
    capsys.readouterr()
    assert score_directory.main(["--input", f"s3://{BUCKET}/photos", "--output", out, "--resume"]) == 0
    assert f"photos scored: {photo_set['count'] - 10} (skipped 10" in capsys.readouterr().out
    t = _read(local_s3, "resumed")
    first = table.first_rows(t)
    uris = first.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == photo_set["count"]


def test_no_attributes_leaves_their_columns_out(ray_cluster, local_s3, photo_set):
    out = f"s3://{BUCKET}/plain"
    assert score_directory.main(["--input", f"s3://{BUCKET}/photos", "--output", out, "--limit", "4",
                                 "--no-attributes"]) == 0
    t = _read(local_s3, "plain")
    assert t.schema.equals(table.prediction_schema(), check_metadata=False)
    assert not {"age", "gender", "emotion"} & set(t.schema.names)


def test_misuse_exits_2_with_a_reason(ray_cluster, local_s3, capsys, tmp_path):
    assert score_directory.main(["--input", "s3://no-such-bucket-zz/x", "--output", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        score_directory.main(["--input", "x", "--output", "y", "--limit", "zero"])
    assert exc.value.code == 2
