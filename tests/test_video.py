"""Videos (DESIGN.md "Videos"): clips made here from real photos, scored by the real job.

One clip: 3 s of one person cut to 3 s of another, with camera shake (an affine jitter
per frame), H.264 in mp4 (index at the front, so a cut-off copy still opens); a
truncated copy; a text file named .mp4; the same cut with one sample of the first shot
blurred hard.  Sampled at 2 frames/s, 4 s segments (so a clip is two tasks and tracks
restart at 4 s), scored with an identity bundle trained here from other photos of the
clips' people and four more.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from jobs import score_directory
from pipeline import table, video

FPS, SHOT_S, SIZE = 25, 3, 320
ARGS = ["--video-fps", "2", "--video-segment-s", "4", "--no-attributes"]
BLUR_SIGMA = 5.0       # the face is still found, but its embedding moves (cosine ~0.88 to its neighbours)
BLURRED_S = 1.0        # the sample at 1 s of blurred.mp4 (frames 20-30 blurred)
TRAIN = ["Andre_Agassi", "Ariel_Sharon", "Colin_Powell", "Hugo_Chavez", "Jack_Straw", "Laura_Bush"]


def _frames(photo: Path, n: int, rng: np.random.Generator):
    img = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (SIZE, SIZE))
    for _ in range(n):  # small camera shake: rotation ±1.5°, shift ±4 px, zoom ±2%
        m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), rng.uniform(-1.5, 1.5), rng.uniform(0.98, 1.02))
        m[:, 2] += rng.uniform(-4, 4, 2)
        yield cv2.warpAffine(img, m, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)


def make_clip(path: Path, photos: list[Path], seed: int = 0, codec: str = "libx264",
              blur: range = range(0)) -> None:
    """``blur``: frame numbers blurred hard (Gaussian, sigma 5 px on a 320 px frame)."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        s = out.add_stream(codec, rate=FPS)
        s.width = s.height = SIZE
        s.pix_fmt = "yuv420p"
        s.options = {"g": "25"}   # a keyframe a second: seeking has somewhere to land
        n = 0
        for photo in photos:
            for rgb in _frames(photo, FPS * SHOT_S, rng):
                if n in blur:
                    rgb = cv2.GaussianBlur(rgb, (0, 0), BLUR_SIGMA)
                n += 1
                for pkt in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)


@pytest.fixture(scope="module")
def clips(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    a = sorted((data_dir / "identities" / "Andre_Agassi").glob("*.jpg"))[2]   # one face in the picture
    b = sorted((data_dir / "identities" / "Ariel_Sharon").glob("*.jpg"))[0]
    make_clip(root / "cut.mp4", [a, b])
    make_clip(root / "blurred.mp4", [a, b], seed=1, blur=range(20, 31))   # only the 1 s sample is blurred
    data = (root / "cut.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: int(len(data) * 0.4)])
    (root / "notes.mp4").write_text("this is not a video\n")
    for p in (a, b):  # the two people's photos, scored beside the videos
        (root / p.name).write_bytes(p.read_bytes())
    return {"root": root, "a": a.name, "b": b.name}


def test_sampling_seeks_and_keeps_the_requested_times(clips):
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    uri = str(clips["root"] / "cut.mp4")
    assert abs(video.probe(fs, uri).duration - 2 * SHOT_S) < 0.1
    got = video.sample_frames(fs, uri, 2.0)
    assert got.error is None and [f.time for f in got.frames] == pytest.approx([k / 2 for k in range(12)], abs=0.05)
    assert all(abs(f.index - k * FPS / 2) <= 0.5 and f.index == round(f.time * FPS) for k, f in enumerate(got.frames))
    seg = video.sample_frames(fs, uri, 2.0, 4.0, 6.0)
    assert [f.time for f in seg.frames] == pytest.approx([4, 4.5, 5, 5.5], abs=0.05)
    bad = video.sample_frames(fs, str(clips["root"] / "notes.mp4"), 1.0)
    assert not bad.opened and bad.error


def test_age_and_gender_are_the_tracks_emotion_stays_per_face():
    """Two sampled frames of one video, two people in each, and a photo's face: each track
    gets its mean age and its score-weighted gender; emotion and the photo stay as they were."""
    photos = pa.table({"image_uri": ["v.mp4", "v.mp4", "p.jpg"], "face_count": [2, 2, 1]})
    tracks = np.array([0, 1, 0, 1, -1])
    preds = {"age": (np.array([30, 50, 34, 54, 20], np.float32), np.array([.5, .6, .7, .8, .9], np.float32)),
             "gender": (np.array(["male", "female", "female", "female", "male"], object),
                        np.array([.9, .8, .6, .7, .55], np.float32)),
             "emotion": (np.array(["happy", "sad", "neutral", "sad", "happy"], object), np.full(5, .5, np.float32))}
    out = video.decide_tracks(photos, tracks, None, preds, np.zeros((5, 128), np.float32))
    np.testing.assert_allclose(out["age"][0], [32, 52, 32, 52, 20])
    np.testing.assert_allclose(out["age"][1], [.6, .7, .6, .7, .9])
    assert list(out["gender"][0]) == ["male", "female", "male", "female", "male"]   # 0.9 male beats 0.6 female
    np.testing.assert_allclose(out["gender"][1], [.9, .75, .9, .75, .55])
    assert list(out["emotion"][0]) == list(preds["emotion"][0])
    assert list(preds["gender"][0])[2] == "female"   # the caller's arrays are not changed


def test_tracks_bridge_one_degraded_frame_but_not_a_cut():
    """A face at the same place that looks a bit less like itself for one frame (a blur:
    cosine 0.88) stays in the track; someone else there for a frame, or for good, does not."""
    rng = np.random.default_rng(0)
    a, other = rng.normal(size=(2, 128))
    a /= np.linalg.norm(a)
    other -= (other @ a) * a
    other /= np.linalg.norm(other)

    def like(cos: float) -> np.ndarray:   # a unit vector at this cosine to a
        return (cos * a + math.sqrt(1 - cos**2) * other).astype(np.float32)[None]

    box = np.array([[100, 100, 80, 80]], np.float32)
    tracks = lambda embs: [int(i[0]) for i in video.link_frames([(box, e) for e in embs])]  # noqa: E731
    assert tracks([like(1), like(1), like(0.88), like(1), like(1)]) == [0, 0, 0, 0, 0]
    assert tracks([like(1), like(1), like(0.6), like(1), like(1)]) == [0, 0, 1, 0, 0]
    assert tracks([like(1), like(1), like(0.88), like(0.88), like(0.88)]) == [0, 0, 1, 1, 1]
    far = np.array([[220, 220, 80, 80]], np.float32)   # the blurred face elsewhere in the frame
    assert [int(i[0]) for i in video.link_frames([(box, like(1)), (box, like(1)), (far, like(0.88)),
                                                  (box, like(1))])] == [0, 0, 1, 0]


def _read(out: Path) -> pa.Table:
    return pads.dataset(str(out), format="parquet").to_table()


@pytest.fixture(scope="module")
def bundle(data_dir, tmp_path_factory) -> str:
    """An identity bundle trained from the identities' photos (8 a person, not the clips'):
    real embeddings, a linear head fitted here and open-set thresholds from
    ``calibrate_open_set``, like train_classifier.py's but without its Ray Train fit
    (~60 s on 2 cores; this takes ~10 s)."""
    import torch

    from pipeline.embed import Embedder
    from pipeline.faces import FaceDetector
    from pipeline.heads import ModelBundle, TaskSpec, build_heads, calibrate_open_set, class_centroids
    from pipeline.photos import analyse_photo
    from pipeline.settings import Settings

    detector, embed = FaceDetector.from_settings(Settings()), Embedder()
    x, y = [], []
    for k, name in enumerate(TRAIN):
        for f in sorted((data_dir / "identities" / name).glob("*.jpg"))[3:11]:
            faces = analyse_photo(f.read_bytes(), detector, 10**8)
            if faces.faces:
                x.append(embed(faces.chips[faces.main:faces.main + 1])[0])
                y.append(k)
    x, y = np.stack(x).astype(np.float32), np.array(y)
    spec = TaskSpec("identity", "classification", TRAIN, open_set=True, exclusive=True)
    torch.manual_seed(0)
    heads = build_heads([spec])
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(heads["identity"](torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    cents = class_centroids(x, y, len(TRAIN))
    cal = calibrate_open_set(ModelBundle.in_memory([spec], heads.state_dict(), {"identity": cents}).raw(x)["identity"],
                             x, y, cents)
    spec.min_prob, spec.max_dist = cal.min_prob, cal.max_dist
    out = str(tmp_path_factory.mktemp("bundle"))
    ModelBundle.write(out, [spec], heads.state_dict(), {"identity": cents}, {})
    return out


@pytest.fixture(scope="module")
def scored(ray_cluster, clips, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    assert score_directory.main(["--input", str(clips["root"]), "--output", str(out), "--model", bundle, *ARGS]) == 0
    return out


def test_video_rows_tracks_and_statuses(scored, clips, capsys):
    t = _read(scored)
    assert t.schema.equals(table.prediction_schema([("identity", "classification")]), check_metadata=False)
    rows = t.to_pylist()
    by = {}
    for r in rows:
        by.setdefault(r["image_uri"].rsplit("/", 1)[1], []).append(r)
    for name in (clips["a"], clips["b"]):   # photos: the video columns are null
        assert by[name][0]["status"] == "ok" and by[name][0]["frame_index"] is None and by[name][0]["track_id"] is None
    emb_a = np.array(by[clips["a"]][0]["embedding"])
    emb_b = np.array(by[clips["b"]][0]["embedding"])

    cut = sorted(by["cut.mp4"], key=lambda r: r["timestamp_s"])
    assert [r["timestamp_s"] for r in cut] == pytest.approx([k / 2 for k in range(12)], abs=0.05)  # a face a frame
    assert all(r["status"] == "ok" and r["face_count"] == 1 and r["error"] is None for r in cut)
    assert all(abs(r["frame_index"] - k * FPS / 2) <= 0.5 for k, r in enumerate(cut))
    for r in cut:  # the right person in each shot
        e = np.array(r["embedding"])
        closer_a = e @ emb_a > e @ emb_b
        assert closer_a == (r["timestamp_s"] < SHOT_S), r["timestamp_s"]
    assert [r["identity"] for r in cut] == ["Andre_Agassi"] * 6 + ["Ariel_Sharon"] * 6
    # one track per person per shot, one id across the 4 s segment boundary (the job's last
    # step joined B's segment-scoped tracks), numbered in order of first appearance
    assert [r["track_id"] for r in cut] == [0] * 6 + [1] * 6
    # the segment-scoped ids the actors wrote join to the same; so does a pass cut short
    raw = pa.Table.from_pylist([{**r, "track_id": r["track_id"] + (video.TRACK_STRIDE if r["timestamp_s"] >= 4 else 0)}
                                for r in cut])
    assert video.join_segments(raw, segment_s=4).to_pylist() == [0] * 6 + [1] * 6
    assert video.join_segments(pa.Table.from_pylist(cut), segment_s=4).to_pylist() == [0] * 6 + [1] * 6
    # without B's faces before the boundary, A's track (ended 1.5 s before it) is not
    # continued by B's after it
    gap = raw.filter(pc.invert(pc.and_(pc.greater_equal(raw.column("timestamp_s"), 2.9),
                                       pc.less(raw.column("timestamp_s"), 4.0))))
    assert video.join_segments(gap, segment_s=4).to_pylist() == [0] * 6 + [1] * 4
    assert video.join_segments(t, segment_s=4).null_count == t.column("track_id").null_count
    assert pc.max(t.column("track_id")).as_py() < video.TRACK_STRIDE

    trunc = sorted(by["truncated.mp4"], key=lambda r: r["timestamp_s"])
    ok = [r for r in trunc if r["status"] == "ok"]
    assert 1 <= len(ok) < 12 and all("truncated" in (r["error"] or "") or "decod" in (r["error"] or "") for r in ok)
    assert [r["timestamp_s"] for r in ok] == pytest.approx([k / 2 for k in range(len(ok))], abs=0.05)
    assert all(r["status"] == "decode_error" and r["error"] for r in trunc if r["status"] != "ok")
    assert [r["status"] for r in by["notes.mp4"]] == ["decode_error"] and by["notes.mp4"][0]["error"]


def test_a_blurred_frame_keeps_its_track_and_its_name(scored, bundle):
    """One hard-blurred sample inside a shot: alone its face is ``unknown`` (too far from
    Agassi's centroid for the open-set threshold); it stays in the shot's track and takes
    the track's name, decided on the track's mean embedding, with the track's score."""
    from pipeline.heads import ModelBundle

    t = _read(scored)
    rows = sorted((r for r in t.to_pylist() if r["image_uri"].endswith("/blurred.mp4")), key=lambda r: r["timestamp_s"])
    assert [r["timestamp_s"] for r in rows] == pytest.approx([k / 2 for k in range(12)], abs=0.05)
    shot = rows[:2 * SHOT_S]
    blurred = next(r for r in shot if abs(r["timestamp_s"] - BLURRED_S) < 0.05)
    alone = ModelBundle.load(bundle).predict(np.array([blurred["embedding"]], np.float32),
                                             np.zeros(1))["identity"][0][0]
    assert alone != "Andre_Agassi"   # the per-face decision would rename (or lose) him
    assert len({r["track_id"] for r in shot}) == 1
    assert [r["identity"] for r in rows] == ["Andre_Agassi"] * 6 + ["Ariel_Sharon"] * 6
    assert len({r["identity_score"] for r in shot}) == 1 and shot[0]["identity_score"] > 0.5


def test_resume_scores_each_video_segment_exactly_once(scored, clips, bundle, tmp_path, capsys):
    import pyarrow.parquet as pq

    t = _read(scored)
    # a crash after segment 0 of cut.mp4 was committed but before segment 1 was
    part = tmp_path / "part"
    part.mkdir()
    cut = pc.ends_with(t.column("image_uri"), "cut.mp4")
    late = pc.and_(cut, pc.greater_equal(pc.fill_null(t.column("timestamp_s"), 0), 4.0))
    pq.write_table(t.filter(pc.invert(late)), part / "part-earlier-00000.parquet")
    capsys.readouterr()
    resume = ["--input", str(clips["root"]), "--output", str(part), "--resume", "--model", bundle, *ARGS]
    assert score_directory.main(resume) == 0
    assert "videos scored: 1" in capsys.readouterr().out   # only cut.mp4's missing segment
    again = _read(part)
    key = lambda r: (r["image_uri"], r["timestamp_s"], r["face_index"], r["status"], r["track_id"])  # noqa: E731
    assert sorted(map(key, again.to_pylist()), key=str) == sorted(map(key, t.to_pylist()), key=str)
    assert score_directory.main(resume) == 0
    assert _read(part).num_rows == again.num_rows   # nothing left to do: nothing written twice
