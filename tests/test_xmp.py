"""Exchange with photo tools (DESIGN.md): export_xmp.py writes MWG face regions that
ExifTool reads back as the table's faces; import_xmp.py reads regions written by ExifTool
(MWG and Microsoft Photo, sidecars and embedded) into the labels log; the round trip gives
every name back on the same faces.  Real photos, one small scored table, real ExifTool."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from pipeline import labels
from pipeline.xmp.regions import Box, iou_matrix, mwg_area, orient_box

GROUPS = ["20--Family_Group/20_Family_Group_Family_Group_20_1003.jpg",
          "20--Family_Group/20_Family_Group_Family_Group_20_1015.jpg",
          "19--Couple/"]                      # first photo of the folder
NAMES = ["Tom & <Jerry>", "Пётр Иванов", "王小明", "Ada"]
ROTATED = "rotated/obama-480p-rot6.jpg"       # stored turned, EXIF Orientation 6 turns it back


def exiftool(*args: str) -> str:
    out = subprocess.run(["exiftool", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def read_back(path: Path) -> dict:
    return json.loads(exiftool("-j", "-struct", "-XMP:all", str(path)))[0]


def _rotated_copy(src: Path, dst: Path) -> None:
    """The photo's pixels stored turned 90° counter-clockwise with EXIF Orientation 6: a
    viewer (and faceray) turns it back upright."""
    im = Image.open(src)
    stored = im.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(dst, quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def scored(ray_cluster, data_dir, tmp_path_factory):
    """(photo folder, table) of group photos, portraits (one PNG), an EXIF-rotated copy."""
    from jobs import score_directory

    root = tmp_path_factory.mktemp("xmp")
    photos = root / "photos"
    (photos / "groups").mkdir(parents=True)
    for g in GROUPS:
        src = data_dir / "groups" / "images" / g
        src = sorted(src.glob("*.jpg"))[0] if src.is_dir() else src
        shutil.copy(src, photos / "groups" / src.name)
    misc = data_dir / "fr_examples" / "misc"
    (photos / "portraits").mkdir()
    for name in ("obama-480p.jpg", "alex-lacamoire.png", "two_people.jpg"):
        shutil.copy(misc / name, photos / "portraits" / name)
    (photos / "rotated").mkdir()
    _rotated_copy(misc / "obama-480p.jpg", photos / ROTATED)
    table = str(root / "table")
    assert score_directory.main(["--input", str(photos), "--output", table, "--no-attributes"]) == 0
    return photos, table


@pytest.fixture()
def photos(scored, data_dir):
    """The scored folder with no sidecar in it (each test writes its own); the PNG a test
    embeds XMP in is put back as it was."""
    folder, _ = scored
    for f in folder.rglob("*.xmp"):
        f.unlink()
    yield folder
    shutil.copy(data_dir / "fr_examples" / "misc" / "alex-lacamoire.png", folder / "portraits" / "alex-lacamoire.png")


def faces_of(table: str) -> pd.DataFrame:
    t = pd.read_parquet(table, columns=["image_uri", "status", "face_index", "bbox", "width", "height"])
    t = t[t.status == "ok"].reset_index(drop=True)
    b = pd.DataFrame(t.bbox.tolist())
    return pd.concat([t.drop(columns="bbox"), b], axis=1).sort_values(["image_uri", "face_index"])


def name_some(table: str, log: str) -> dict[tuple[str, int], str]:
    """Name one face of each of the first photos (a name with & and <, Cyrillic, CJK)."""
    f = faces_of(table)
    firsts = f.groupby("image_uri").head(1).head(len(NAMES))
    named = {(u, int(i)): n for (u, i), n in zip(zip(firsts.image_uri, firsts.face_index), NAMES)}
    for (u, i), n in named.items():
        labels.append(log, labels.decisions("name", n, [(u, i)], author="test", source="test"))
    return named


def run(main, argv: list[str], capsys) -> str:  # noqa: ANN001
    assert main(argv) == 0
    return capsys.readouterr().out


def test_orientation_mapping_matches_pillow():
    """orient_box sends a stored-frame box where Pillow's exif_transpose sends its pixels."""
    w, h = 60, 40
    for o in range(1, 9):
        a = np.zeros((h, w), np.uint8)
        a[5:15, 10:30] = 255
        im = Image.fromarray(a)
        exif = im.getexif()
        exif[0x0112] = o
        buf = io.BytesIO()
        im.save(buf, "PNG", exif=exif.tobytes())
        up = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        ys, xs = np.nonzero(up)
        got = (xs.min() / up.shape[1], ys.min() / up.shape[0], (xs.max() + 1 - xs.min()) / up.shape[1],
               (ys.max() + 1 - ys.min()) / up.shape[0])
        b = orient_box(Box(10 / w, 5 / h, 20 / w, 10 / h), o)
        assert np.allclose(got, (b.x, b.y, b.w, b.h)), o


def test_export_read_back_by_exiftool(scored, photos, tmp_path, capsys):
    from jobs import export_xmp

    _, table = scored
    log = str(tmp_path / "labels")
    named = name_some(table, log)
    out = tmp_path / "sidecars"
    text = run(export_xmp.main, ["--table", table, "--output", str(out), "--labels", log], capsys)
    faces = faces_of(table)
    assert "sidecars written: " in text and f"photos with faces: {faces.image_uri.nunique()}" in text
    for uri, group in faces.groupby("image_uri"):
        rel = Path(uri).relative_to(photos)                  # the listing root is the scored folder
        side = out / f"{rel}.xmp"
        assert side.name == Path(uri).name + ".xmp"
        info = read_back(side)["RegionInfo"]
        width, height = int(group.width.iloc[0]), int(group.height.iloc[0])
        assert info["AppliedToDimensions"] == {"W": width, "H": height, "Unit": "pixel"}
        regions = info["RegionList"]
        assert len(regions) == len(group)
        for r, row in zip(regions, group.itertuples()):
            cx, cy, w, h = mwg_area((row.x, row.y, row.w, row.h), width, height)
            a = r["Area"]
            assert a["Unit"] == "normalized" and r["Type"] == "Face"
            assert np.allclose([a["X"], a["Y"], a["W"], a["H"]], [cx, cy, w, h], atol=0.001)
            # and independently of mwg_area: the box's centre, for a box inside the photo
            if row.x >= 0 and row.y >= 0 and row.x + row.w <= width and row.y + row.h <= height:
                assert abs(a["X"] - (row.x + row.w / 2) / width) < 0.001
                assert abs(a["H"] - row.h / height) < 0.001
            assert r.get("Name") == named.get((uri, row.face_index))
        want = [named[(uri, int(i))] for i in group.face_index if (uri, int(i)) in named]
        assert read_back(side).get("PersonInImage", []) in (want, want[0] if len(want) == 1 else want)


def test_rotated_photo_regions_land_on_the_upright_faces(scored, photos, tmp_path, capsys):
    from jobs import export_xmp

    _, table = scored
    faces = faces_of(table)
    rot = faces[faces.image_uri == str(photos / ROTATED)]
    upright = faces[faces.image_uri == str(photos / "portraits" / "obama-480p.jpg")]
    assert (rot.width.iloc[0], rot.height.iloc[0]) == (upright.width.iloc[0], upright.height.iloc[0]) == (853, 480)
    out = tmp_path / "sidecars"
    run(export_xmp.main, ["--table", table, "--output", str(out)], capsys)
    areas = {}
    for name, rel in (("rot", ROTATED), ("up", "portraits/obama-480p.jpg")):
        info = read_back(out / f"{rel}.xmp")["RegionInfo"]
        assert info["AppliedToDimensions"]["W"] == 853
        areas[name] = np.array([[r["Area"][k] for k in "XYWH"] for r in info["RegionList"]])
    # the rotated photo's regions, drawn on the upright photo, cover its faces
    to_box = lambda a: np.c_[a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 2], a[:, 3]]  # noqa: E731
    iou = iou_matrix(to_box(areas["rot"]), to_box(areas["up"]))
    assert len(areas["rot"]) == len(areas["up"]) >= 1 and (iou.max(axis=1) > 0.8).all()


def test_round_trip_beside_then_import(scored, photos, tmp_path, capsys):
    from jobs import export_xmp, import_xmp

    _, table = scored
    log = str(tmp_path / "labels")
    named = name_some(table, log)
    text = run(export_xmp.main, ["--table", table, "--beside", "--labels", log], capsys)
    assert len(list(photos.rglob("*.jpg.xmp"))) + len(list(photos.rglob("*.png.xmp"))) == \
        faces_of(table).image_uri.nunique()
    fresh = str(tmp_path / "fresh")
    text = run(import_xmp.main, ["--photos", str(photos), "--table", table, "--labels", fresh], capsys)
    s = labels.load(fresh)
    got = {(u, int(i)): n for u, i, n in zip(s.named.image_uri, s.named.face_index, s.named.name)}
    assert got == named
    df = pd.read_parquet(fresh)        # the log alone: the unmatched side file is skipped
    assert set(df.source) == {"xmp"} and len(df) == len(named)
    assert "unmatched 0" in text and "malformed XMP: 0" in text
    # again: nothing new is appended, and without --overwrite no sidecar is touched
    text = run(import_xmp.main, ["--photos", str(photos), "--table", table, "--labels", fresh], capsys)
    assert f"names appended: 0 ({len(named)} faces already had that name)" in text
    before = {p: p.read_bytes() for p in photos.rglob("*.xmp")}
    text = run(export_xmp.main, ["--table", table, "--beside"], capsys)
    assert f"existing sidecars left alone: {len(before)}" in text
    assert before == {p: p.read_bytes() for p in photos.rglob("*.xmp")}


def _area(row, width: int, height: int) -> str:  # noqa: ANN001
    cx, cy, w, h = mwg_area((row.x, row.y, row.w, row.h), width, height)
    return f"Area={{X={cx:.6f},Y={cy:.6f},W={w:.6f},H={h:.6f},Unit=normalized}}"


def test_import_sidecars_and_embedded_xmp_written_by_exiftool(scored, photos, tmp_path, capsys):
    """MWG in IMG.jpg.xmp, Microsoft Photo in IMG.xmp, MWG embedded in a PNG, a stored-frame
    MWG area on the EXIF-rotated photo: names with &, Cyrillic and CJK come through."""
    from jobs import import_xmp

    _, table = scored
    faces = faces_of(table)
    by = {Path(u).relative_to(photos).as_posix(): g for u, g in faces.groupby("image_uri")}
    group = next(k for k, g in by.items() if k.startswith("groups/") and len(g) >= 3)
    g = by[group]
    w, h = int(g.width.iloc[0]), int(g.height.iloc[0])
    r0, r1, r2 = list(g.itertuples())[:3]
    exiftool("-q", "-o", str(photos / f"{group}.xmp"),
             f"-XMP-mwg-rs:RegionInfo={{AppliedToDimensions={{W={w},H={h},Unit=pixel}},RegionList=["
             f"{{{_area(r0, w, h)},Name=Tom & Jerry,Type=Face}},"
             f"{{{_area(r1, w, h)},Name=Пётр Иванов,Type=Face}},"
             f"{{{_area(r2, w, h)},Type=Face}},"                              # no name
             f"{{Area={{X=0.02,Y=0.02,W=0.01,H=0.01,Unit=normalized}},Name=Nobody,Type=Face}},"   # no face there
             f"{{Area={{X=0.5,Y=0.5,W=0.1,H=0.1,Unit=normalized}},Name=Rex,Type=Pet}}]}}")
    two = by["portraits/two_people.jpg"]
    tw, th = int(two.width.iloc[0]), int(two.height.iloc[0])
    t0 = two.iloc[0]
    rect = f"{t0.x / tw:.6f}|, {t0.y / th:.6f}|, {t0.w / tw:.6f}|, {t0.h / th:.6f}"
    exiftool("-q", "-o", str(photos / "portraits" / "two_people.xmp"),          # the X.xmp naming
             f"-XMP-MP:RegionInfoMP={{Regions=[{{Rectangle={rect},PersonDisplayName=王小明}}]}}")
    png = by["portraits/alex-lacamoire.png"]
    pw, ph = int(png.width.iloc[0]), int(png.height.iloc[0])
    exiftool("-q", "-overwrite_original", str(photos / "portraits" / "alex-lacamoire.png"),
             f"-XMP-mwg-rs:RegionInfo={{AppliedToDimensions={{W={pw},H={ph},Unit=pixel}},RegionList=["
             f"{{{_area(png.iloc[0], pw, ph)},Name=Alex <A&B>,Type=Face}}]}}")
    # the rotated photo, its area given in the frame as stored (480 × 853) as some tools do
    rot = by[ROTATED].iloc[0]
    up = Box(rot.x / 853, rot.y / 480, rot.w / 853, rot.h / 480)
    stored = orient_box(up, 8)                      # 8 undoes 6
    assert np.allclose([*orient_box(stored, 6).__dict__.values()], [*up.__dict__.values()])
    exiftool("-q", "-o", str(photos / f"{ROTATED}.xmp"),
             "-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=480,H=853,Unit=pixel},RegionList=["
             f"{{Area={{X={stored.x + stored.w / 2:.6f},Y={stored.y + stored.h / 2:.6f},W={stored.w:.6f},"
             f"H={stored.h:.6f},Unit=normalized}},Name=Barack,Type=Face}}]}}")
    log = str(tmp_path / "labels")
    text = run(import_xmp.main, ["--photos", str(photos), "--table", table, "--labels", log], capsys)
    s = labels.load(log)
    got = {(Path(u).relative_to(photos).as_posix(), int(i)): n
           for u, i, n in zip(s.named.image_uri, s.named.face_index, s.named.name)}
    assert got == {(group, int(r0.face_index)): "Tom & Jerry", (group, int(r1.face_index)): "Пётр Иванов",
                   ("portraits/two_people.jpg", int(t0.face_index)): "王小明",
                   ("portraits/alex-lacamoire.png", int(png.face_index.iloc[0])): "Alex <A&B>",
                   (ROTATED, int(rot.face_index)): "Barack"}
    assert "regions: 7 — matched to a face 6, unmatched 1, without a name 1" in text, text
    assert "other regions skipped (pets, focus, points): 1" in text
    un = pd.read_parquet(Path(log) / "_import_unmatched.parquet")
    assert un.name.tolist() == ["Nobody"] and un.reason.tolist() == ["no face found there"]
    b = un.bbox.iloc[0]
    assert abs(b["x"] - 0.015 * w) < 0.5 and abs(b["w"] - 0.01 * w) < 0.5


def test_existing_sidecar_keeps_its_tags_and_malformed_ones_are_rows(scored, photos, tmp_path, capsys):
    from jobs import export_xmp, import_xmp

    _, table = scored
    faces = faces_of(table)
    uri = faces.image_uri.iloc[0]
    side = Path(uri + ".xmp")
    exiftool("-q", "-o", str(side), "-XMP-dc:Subject=holiday", "-XMP-dc:Subject=beach", "-XMP-xmp:Rating=4",
             "-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=10,H=10,Unit=pixel},RegionList=["
             "{Area={X=0.5,Y=0.5,W=0.1,H=0.1,Unit=normalized},Name=Old,Type=Face}]}",
             "-XMP-iptcExt:PersonInImage=Old")
    bad = Path(faces.image_uri[faces.image_uri != uri].iloc[0] + ".xmp")
    bad.write_bytes(b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF")          # cut short
    log = str(tmp_path / "labels")
    name_some(table, log)
    text = run(export_xmp.main, ["--table", table, "--beside", "--overwrite", "--labels", log], capsys)
    assert "existing sidecars not XMP (left alone): 1" in text and "1 merged into existing ones" in text
    info = read_back(side)
    assert info["Subject"] == ["holiday", "beach"] and info["Rating"] == 4
    n = int((faces.image_uri == uri).sum())
    assert len(info["RegionInfo"]["RegionList"]) == n
    assert "Old" not in json.dumps(info, ensure_ascii=False)
    assert bad.read_bytes().endswith(b"<rdf:RDF")                              # left alone
    # import: the bad sidecar is a summary row; the rest still comes in
    text = run(import_xmp.main, ["--photos", str(photos), "--table", table, "--labels", str(tmp_path / "in")],
               capsys)
    assert "malformed XMP: 1" in text and str(bad) in text
    assert labels.load(str(tmp_path / "in")).named.shape[0] >= 1


def test_misuse_is_one_line(scored, tmp_path, capsys):
    from jobs import export_xmp, import_xmp

    assert export_xmp.main(["--table", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "export_xmp: error:" in capsys.readouterr().err
    assert import_xmp.main(["--photos", str(tmp_path / "none"), "--table", scored[1],
                            "--labels", str(tmp_path / "l")]) == 2
    assert "import_xmp: error:" in capsys.readouterr().err


def test_round_trip_on_s3(scored, photos, local_s3, tmp_path, capsys):
    """Photos, table, sidecars and the log in a bucket: sidecars land in the photos'
    prefix (the listing root of the photos), the import reads them back from there."""
    import pyarrow.parquet as pq

    from jobs import export_xmp, import_xmp
    from pipeline import storage

    folder, table = scored
    local_s3.create_bucket("xmp")
    local_s3.upload_dir(folder, "xmp", "photos")
    fs, _ = storage.resolve("s3://xmp")
    t = pd.read_parquet(table)
    t["image_uri"] = "s3://xmp/photos/" + t.image_uri.str.slice(len(str(folder)) + 1)
    storage.put_parquet(fs, "xmp/table/part-0.parquet", pa_table(t))
    log = "s3://xmp/labels"
    named = name_some("s3://xmp/table", log)
    text = run(export_xmp.main, ["--table", "s3://xmp/table", "--output", "s3://xmp/photos", "--labels", log,
                                 "--min-score", "0"], capsys)
    assert "listing root: xmp/photos" in text
    side = "xmp/photos/portraits/obama-480p.jpg.xmp"
    with fs.open_input_stream(side) as f:
        assert b"mwg-rs:Regions" in f.read()
    text = run(import_xmp.main, ["--photos", "s3://xmp/photos", "--table", "s3://xmp/table",
                                 "--labels", "s3://xmp/fresh"], capsys)
    s = labels.load("s3://xmp/fresh")
    assert {(u, int(i)): n for u, i, n in zip(s.named.image_uri, s.named.face_index, s.named.name)} == named
    assert pq.read_table("xmp/fresh/_import_unmatched.parquet", filesystem=fs).num_rows == 0


def pa_table(df: pd.DataFrame):  # noqa: ANN201
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)


def test_entity_expansion_and_broken_regions_are_malformed_not_crashes():
    from pipeline.xmp.read import packet_regions
    from pipeline.xmp.write import XmpError

    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>')
    with pytest.raises(XmpError):
        packet_regions(bomb)
    broken = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              b'<rdf:Description xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/" '
              b'xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#"><mwg-rs:Regions rdf:parseType="Resource">'
              b'<mwg-rs:RegionList><rdf:Bag><rdf:li rdf:parseType="Resource"><mwg-rs:Area stArea:x="left" '
              b'stArea:y="0.5" stArea:w="0.1" stArea:h="0.1"/></rdf:li></rdf:Bag></mwg-rs:RegionList>'
              b'</mwg-rs:Regions></rdf:Description></rdf:RDF></x:xmpmeta>')
    with pytest.raises(ValueError):
        packet_regions(broken)


def test_a_face_takes_its_persons_name(scored, photos, tmp_path, capsys):
    """With --people, every face of a named person carries the name (pipeline.people.names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import export_xmp

    _, table = scored
    f = faces_of(table)
    two = f[f.image_uri.str.endswith("two_people.jpg")]
    rot = f[f.image_uri.str.endswith(ROTATED)]
    people = tmp_path / "people"
    people.mkdir()
    members = pd.concat([two.head(1), rot.head(1)])             # one person across two photos
    pq.write_table(pa.table({"image_uri": members.image_uri.tolist(),
                             "face_index": pa.array(members.face_index.tolist(), pa.int32()),
                             "person": ["p000001"] * len(members)}), people / "part-0.parquet")
    log = str(tmp_path / "labels")
    labels.append(log, labels.decisions("name", "Анна & Co", [(two.image_uri.iloc[0], int(two.face_index.iloc[0]))],
                                        author="test", source="test"))
    out = tmp_path / "sidecars"
    text = run(export_xmp.main, ["--table", table, "--output", str(out), "--people", str(people), "--labels", log],
               capsys)
    assert "2 named" in text
    info = read_back(out / f"{ROTATED}.xmp")
    assert [r.get("Name") for r in info["RegionInfo"]["RegionList"]][int(rot.face_index.iloc[0])] == "Анна & Co"


def test_regions_of_a_photo_not_in_the_table_are_listed_in_pixels(scored, photos, data_dir, tmp_path, capsys):
    from jobs import import_xmp

    _, table = scored
    extra = photos / "extra"
    extra.mkdir()
    try:
        shutil.copy(data_dir / "fr_examples" / "misc" / "obama-240p.jpg", extra / "new.jpg")
        w, h = Image.open(extra / "new.jpg").size
        exiftool("-q", "-overwrite_original", str(extra / "new.jpg"),       # embedded in the JPEG
                 f"-XMP-mwg-rs:RegionInfo={{AppliedToDimensions={{W={w},H={h},Unit=pixel}},RegionList=["
                 "{Area={X=0.5,Y=0.25,W=0.2,H=0.3,Unit=normalized},Name=Someone,Type=Face}]}")
        log = tmp_path / "labels"
        text = run(import_xmp.main, ["--photos", str(photos), "--table", table, "--labels", str(log)], capsys)
        assert "photos with regions but not in the table: 1" in text and "names appended: 0" in text
        un = pd.read_parquet(log / "_import_unmatched.parquet")
        assert un.reason.tolist() == ["photo not in the table"] and un.form.tolist() == ["mwg"]
        b = un.bbox.iloc[0]
        assert np.allclose([b["x"], b["y"], b["w"], b["h"]], [0.4 * w, 0.1 * h, 0.2 * w, 0.3 * h], atol=0.5)
    finally:
        shutil.rmtree(extra)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "HEIF"])
def test_embedded_packet_in_jpeg_webp_heic(fmt):
    """The XMP packet inside a photo's bytes (Pillow's readers; pillow-heif for HEIC)."""
    from pillow_heif import register_heif_opener

    from pipeline.xmp.read import find_packet, packet_regions
    from pipeline.xmp.write import FaceRegion, new_packet

    register_heif_opener()
    packet = new_packet(100, 80, [FaceRegion((10, 10, 20, 20), "王小明 & <x>")])
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (200, 100, 50)).save(buf, fmt, xmp=packet)
    regions, _ = packet_regions(find_packet(buf.getvalue()))
    assert [r.name for r in regions] == ["王小明 & <x>"]
    assert np.allclose([regions[0].box.x, regions[0].box.w], [0.1, 0.2])
    # a file Pillow cannot open: the packet is found by scanning its bytes
    assert find_packet(b"\x00garbage" + packet + b"tail") is not None


def test_video_rows_and_low_scores_are_counted_not_written(ray_cluster, tmp_path, capsys):
    """A table with a photo (two faces, one under --min-score) and a video's frames."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import export_xmp

    table = tmp_path / "table"
    table.mkdir()
    root = tmp_path / "media"
    uris = [f"{root}/a.jpg", f"{root}/a.jpg", f"{root}/clip.mp4", f"{root}/clip.mp4"]
    pq.write_table(pa.table({
        "image_uri": uris, "status": ["ok"] * 4, "face_index": pa.array([0, 1, 0, 0], pa.int32()),
        "bbox": [{"x": 10.0, "y": 10.0, "w": 50.0, "h": 60.0}] * 4,
        "width": pa.array([640] * 4, pa.int32()), "height": pa.array([480] * 4, pa.int32()),
        "det_score": pa.array([0.95, 0.5, 0.9, 0.9], pa.float32()),
        "frame_index": pa.array([None, None, 0, 30], pa.int32())}), table / "part-0.parquet")
    out = tmp_path / "out"
    text = run(export_xmp.main, ["--table", str(table), "--output", str(out), "--min-score", "0.8"], capsys)
    assert "photos with faces: 1 (1 faces" in text
    assert "faces under --min-score: 1; video rows skipped: 2" in text
    assert [p.name for p in out.rglob("*.xmp")] == ["a.jpg.xmp"]
    assert len(read_back(out / "a.jpg.xmp")["RegionInfo"]["RegionList"]) == 1
