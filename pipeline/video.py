"""Videos (DESIGN.md "Videos"): probe → time segments → sampled frames → the photo stages
→ tracks.

* **Listing**: ``storage.list_images(videos=True)`` lists videos beside photos; the scoring
  job turns each video into one manifest row per time segment (``segment_manifest``), from
  the duration a PyAV header probe reads (threads on the driver: a probe reads the
  container header, a few KB, plus an mp4's index).  A two-hour file is 24 segments of
  ``SEGMENT_S`` seconds, scored by whichever actors are free, never one task.
* **Sampling**: frames at ``fps`` per second (``sample_frames``) by seeking where the gap
  to the next sample is long, decoding forward otherwise, and converting to RGB only the
  frames kept.  Each frame is a ``DecodedImage`` and goes through ``photos.analyse_image``:
  the photo path's detector and chip warp, unchanged.
* **Rows**: one per face per sampled frame, with ``frame_index`` (the frame's number in the
  source video), ``timestamp_s`` and ``track_id``; a segment without any face is one
  ``no_face`` row and one that does not decode one ``decode_error`` row (``timestamp_s``
  = the segment's start, ``frame_index`` null); a truncated video gives the frames before
  the damage and names the damage in ``error`` on every row of that segment.
* **Tracks** (``assign_tracks``): after embeddings exist, a face joins the track of a face
  of the last few sampled frames when their embeddings agree (cosine) and, unless the
  embeddings agree strongly, their boxes overlap (IoU).  Greedy, best pairs first.  A short
  track inside another's gap, at its place and close to it (a blurred frame), joins it
  (``_bridge_gaps``).  Segments are scored by different actors and committed as separate
  parts, so no actor sees both sides of a boundary: tracks get segment-scoped ids
  (``segment * TRACK_STRIDE + k``) and the job's last step (``finish_tracks``, once every
  segment is written) joins a track ending one segment to the one starting the next by the
  same test (``join_segments``) and numbers each video's tracks 0, 1, … — one id per person
  across the whole video, as DESIGN.md says.
* **Per track** (``decide_tracks``): age and gender (``PER_TRACK``) are the track's —
  mean age, score-weighted gender vote — on every face of it; with a bundle, open-set
  classification tasks (identities) are decided once per track on its mean embedding and
  written to all its faces, score included; emotion and other tasks stay per face.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.contract import VIDEO_EXTENSIONS, extension

DEFAULT_FPS = 1.0
SEGMENT_S = 300.0        # seconds of video per manifest row (one task)
TRACK_STRIDE = 100_000   # track ids of segment s are s*TRACK_STRIDE + 0, 1, …
SEEK_GAP_S = 2.0         # seek when the next sample is further than this ahead
# A face a second later is much closer to itself (cosine ~0.97-0.99 in the tests' shaky
# clips) than two photos of one person are (dlib's 0.6 distance = cosine 0.82; two
# different LFW people measured 0.84 here), so a track asks for more than "same person".
SAME_FACE_COS = 0.9      # embeddings at least this close may join one track …
SURE_FACE_COS = 0.95     # … this close join whatever their boxes
MIN_IOU = 0.1            # … otherwise boxes must overlap at least this much
TRACK_GAP = 3            # a track waits this many sampled frames for its face to come back
# A degraded frame inside a shot (heavy blur: cosine 0.88-0.90 to the frames around it)
# misses SAME_FACE_COS; it still joins the track around it when it sits where that
# track's faces are (IoU) and looks like them at least this much (``_bridge_gaps``).
GAP_FACE_COS = 0.85     # (two different LFW people reached 0.84)
GAP_IOU = 0.5
PER_TRACK = ("age", "gender")   # one value per track (``decide_tracks``); emotion stays per face


def is_video(uri: str) -> bool:
    return extension(uri) in VIDEO_EXTENSIONS


def _open(fs: pafs.FileSystem, uri: str):
    """A PyAV container over a local path or a random-access S3 file (ranged reads)."""
    import av

    from pipeline.storage import path_of

    if isinstance(fs, pafs.LocalFileSystem):
        return av.open(path_of(uri), "r"), None
    f = fs.open_input_file(path_of(uri))
    try:
        return av.open(f, "r"), f
    except BaseException:
        f.close()
        raise


@dataclass
class Probe:
    duration: float | None   # seconds; None: unknown (or not a video: the segment says why)
    error: str | None = None


def probe(fs: pafs.FileSystem, uri: str) -> Probe:
    """The duration from the container header (nothing decoded)."""
    try:
        c, f = _open(fs, uri)
    except Exception as exc:  # noqa: BLE001 - the crop stage reports it as a row
        return Probe(None, f"{type(exc).__name__}: {exc}")
    try:
        stream = c.streams.video[0] if c.streams.video else None
        if stream is None:
            return Probe(None, "no video stream")
        if stream.duration is not None and stream.time_base is not None:
            return Probe(float(stream.duration * stream.time_base))
        if c.duration is not None:
            return Probe(c.duration / 1e6)
        return Probe(None)
    finally:
        c.close()
        if f is not None:
            f.close()


SEGMENT_FIELDS = [pa.field("segment", pa.int32()), pa.field("segment_start", pa.float64()),
                  pa.field("segment_end", pa.float64())]


def segment_manifest(manifest: pa.Table, fs: pafs.FileSystem, segment_s: float = SEGMENT_S,
                     threads: int = 16) -> pa.Table:
    """The listing with each video replaced by one row per ``segment_s`` seconds
    (``segment``, ``segment_start``, ``segment_end``; null for photos).  A video whose
    duration the header does not give is one open-ended segment."""
    uris = manifest.column("image_uri").to_pylist()
    sizes = manifest.column("size").to_pylist()
    vids = [u for u in uris if is_video(u)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probes = dict(zip(vids, pool.map(lambda u: probe(fs, u), vids)))
    rows = []
    for u, s in zip(uris, sizes):
        if u not in probes:
            rows.append((u, s, None, None, None))
            continue
        d = probes[u].duration
        n = max(1, math.ceil(d / segment_s)) if d else 1
        for k in range(n):
            end = (k + 1) * segment_s if k < n - 1 else math.inf
            rows.append((u, s, k, k * segment_s, end))
    cols = list(zip(*rows)) if rows else [[]] * 5
    schema = pa.schema([*manifest.schema, *SEGMENT_FIELDS])
    return pa.table([pa.array(c, f.type) for c, f in zip(cols, schema)], schema=schema)


@dataclass
class Frame:
    rgb: np.ndarray
    index: int          # frame number in the source video
    time: float         # seconds


@dataclass
class Sampling:
    frames: list[Frame]
    error: str | None   # None, or what stopped decoding early (damage, truncation)
    opened: bool        # False: not a video we can open at all


def sample_frames(fs: pafs.FileSystem, uri: str, fps: float, start: float = 0.0, end: float = math.inf,
                  on_frame=None, threads: int = 1) -> Sampling:
    """The frames at ``start, start + 1/fps, …`` (< ``end``): for each sample time the
    first frame at or after it.  Seeks (to the keyframe before the target) when the next
    sample is over ``SEEK_GAP_S`` ahead of what was decoded, else decodes forward; only
    kept frames are converted to RGB.  ``on_frame(frame)``: called per kept frame instead
    of collecting them (so a segment need not hold all its pixels)."""
    import av

    frames: list[Frame] = []
    keep = frames.append if on_frame is None else on_frame
    try:
        c, f = _open(fs, uri)
    except Exception as exc:  # noqa: BLE001
        return Sampling([], f"{type(exc).__name__}: {exc}", False)
    try:
        if not c.streams.video:
            return Sampling([], "no video stream", False)
        stream = c.streams.video[0]
        stream.thread_type = "SLICE" if threads <= 1 else "AUTO"
        stream.codec_context.thread_count = threads
        tb = float(stream.time_base)
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        declared = float(stream.duration * stream.time_base) if stream.duration is not None else None
        step = 1.0 / fps
        k = math.ceil(start / step - 1e-9)
        target = k * step
        last = -math.inf   # time of the last decoded frame
        error = None
        kept = 0
        while target < end:
            if target - last > SEEK_GAP_S:
                c.seek(int((target + t0) / tb), stream=stream, backward=True, any_frame=False)
            got = None
            try:
                for frame in c.decode(stream):
                    if frame.pts is None:
                        continue
                    t = frame.pts * tb - t0
                    last = t
                    if t + 0.5 / rate >= target:   # the frame shown at the target time
                        got = (frame, t)
                        break
            except av.error.FFmpegError as exc:
                error = f"decoding stopped at {max(last, 0):.2f} s: {type(exc).__name__}: {exc}"
            if got is None:
                break
            frame, t = got
            if t >= end:
                break
            keep(Frame(frame.to_ndarray(format="rgb24"), int(round(t * rate)), float(t)))
            kept += 1
            k = max(k + 1, math.floor(t / step + 1e-9) + 1)   # next target after this frame
            target = k * step
            if error:
                break
        if error is None and declared is not None and kept and min(end, declared) - last > max(step, 2.0 / rate) + 0.5:
            error = f"video truncated: decoded up to {last:.2f} s of {declared:.2f} s"
        if error is None and declared is not None and not kept and start < declared - 0.5:
            error = f"video truncated: no frames from {start:.2f} s on (the header says {declared:.2f} s)"
        return Sampling(frames, error, True)
    except Exception as exc:  # noqa: BLE001
        return Sampling(frames, f"{type(exc).__name__}: {exc}", True)
    finally:
        c.close()
        if f is not None:
            f.close()


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (x, y, w, h): a N×4, b M×4 → N×M."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-6)


def _link_score(cos: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """How well faces continue tracks (higher is better), -inf where they may not: the
    embeddings agree (``SAME_FACE_COS``) and the boxes overlap, unless the embeddings
    agree strongly (``SURE_FACE_COS``)."""
    ok = (cos >= SAME_FACE_COS) & ((iou >= MIN_IOU) | (cos >= SURE_FACE_COS))
    return np.where(ok, cos + 0.5 * iou, -np.inf)


def link_frames(frames: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per frame (boxes N×4, unit embeddings N×D, in time order) the local track of each
    face (0, 1, … in order of first appearance)."""
    out: list[np.ndarray] = []
    tracks: list[dict] = []   # {"box", "emb", "seen": frame number}
    for n, (boxes, embs) in enumerate(frames):
        ids = np.full(len(boxes), -1, np.int64)
        live = [i for i, t in enumerate(tracks) if n - t["seen"] <= TRACK_GAP]
        if live and len(boxes):
            cos = embs @ np.stack([tracks[i]["emb"] for i in live]).T
            iou = _iou(boxes, np.stack([tracks[i]["box"] for i in live]))
            score = _link_score(cos, iou)
            while np.isfinite(score).any():
                f, t = np.unravel_index(np.argmax(score), score.shape)
                ids[f] = live[t]
                score[f, :] = -np.inf
                score[:, t] = -np.inf
        for f in range(len(boxes)):
            if ids[f] < 0:
                ids[f] = len(tracks)
                tracks.append({})
            tracks[ids[f]] = {"box": boxes[f], "emb": embs[f], "seen": n}
        out.append(ids)
    return _bridge_gaps(frames, out)


def _bridge_gaps(frames: list[tuple[np.ndarray, np.ndarray]], ids: list[np.ndarray]) -> list[np.ndarray]:
    """A short track lying inside another's gap joins it: its faces sit where the other
    track's faces are just before and just after (IoU ≥ ``GAP_IOU``) and look like both
    (cosine ≥ ``GAP_FACE_COS``).  A blurred or noisy frame inside a shot (cosine ~0.88 to
    its neighbours, under ``SAME_FACE_COS``) then stays in the person's track, while a cut
    to someone else, which lasts, does not.  Ids are renumbered by first appearance."""
    where: dict[int, list[tuple[int, int]]] = {}   # track → [(frame, face)] in time order
    for n, frame_ids in enumerate(ids):
        for f, t in enumerate(frame_ids):
            where.setdefault(int(t), []).append((n, f))
    if len(where) < 2:
        return ids
    first = np.array([where[t][0][0] for t in range(len(where))])
    last = np.array([where[t][-1][0] for t in range(len(where))])
    merged: dict[int, int] = {}
    for t in np.flatnonzero(last - first < TRACK_GAP):
        t = int(t)
        best = None
        for u in np.flatnonzero((first < first[t]) & (last > last[t])):   # tracks around t
            u = int(u)
            if u in merged:
                continue
            other = where[u]
            k = next(i for i, (n, _) in enumerate(other) if n >= first[t])
            before, after = other[k - 1], other[k]
            if after[0] <= last[t] or after[0] - before[0] > TRACK_GAP + 1:
                continue   # u is seen while t is, or its gap is longer than a track waits
            box_u = np.stack([frames[n][0][f] for n, f in (before, after)])
            emb_u = np.stack([frames[n][1][f] for n, f in (before, after)])
            box_t = np.stack([frames[n][0][f] for n, f in where[t]])
            emb_t = np.stack([frames[n][1][f] for n, f in where[t]])
            cos = emb_t @ emb_u.T
            if (cos >= GAP_FACE_COS).all() and (_iou(box_t, box_u) >= GAP_IOU).all():
                if best is None or cos.mean() > best[0]:
                    best = (float(cos.mean()), u)
        if best is not None:
            merged[t] = best[1]
    if not merged:
        return ids

    def root(t: int) -> int:
        while t in merged:
            t = merged[t]
        return t

    order: dict[int, int] = {}
    out = []
    for frame_ids in ids:
        new = np.array([order.setdefault(root(int(t)), len(order)) for t in frame_ids], np.int64)
        out.append(new)
    return out


def assign_tracks(photos: pa.Table, embeddings: np.ndarray) -> np.ndarray | None:
    """Track ids for every face of a batch of crop-stage rows (``table.PHOTO_SCHEMA``; the
    embeddings in face order), -1 for photo faces; None when the batch holds no video."""
    if "segment" not in photos.schema.names or photos.column("segment").null_count == photos.num_rows:
        return None
    counts = np.asarray(photos.column("face_count").to_numpy(zero_copy_only=False), np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    boxes = np.asarray(photos.column("boxes").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                       np.float32).reshape(-1, 4)
    out = np.full(int(counts.sum()), -1, np.int64)
    uris = photos.column("image_uri").to_pylist()
    segs = photos.column("segment").to_pylist()
    times = photos.column("timestamp_s").to_pylist()
    groups: dict[tuple, list[int]] = {}
    for i, (u, s) in enumerate(zip(uris, segs)):
        if s is not None and counts[i]:
            groups.setdefault((u, s), []).append(i)
    for (_, seg), rows in groups.items():
        rows.sort(key=lambda i: times[i])
        ids = link_frames([(boxes[starts[i]:starts[i + 1]], embeddings[starts[i]:starts[i + 1]]) for i in rows])
        for i, local in zip(rows, ids):
            out[starts[i]:starts[i + 1]] = seg * TRACK_STRIDE + local
    return out


def decide_tracks(photos: pa.Table, track_ids: np.ndarray | None, bundle,
                  predictions: dict[str, tuple[np.ndarray, np.ndarray]], embeddings: np.ndarray,
                  features: dict[str, np.ndarray] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decisions per video track.  Identities: for each open-set classification task of ``bundle`` (identity
    tasks), every face of a video track gets the label the bundle decides on the track's
    mean unit embedding (``ModelBundle.raw`` + ``ModelBundle.decide``: the same open-set
    thresholds as for one face; ``embeddings``: the ones the heads read,
    ``ModelBundle.head_embeddings``), so one blurred frame does not rename a person; its score
    is that decision's probability (the track's, the same on every face of the track).
    Exclusive tasks stay exclusive per frame: tracks are decided longest first, and a track
    sharing a frame with an already named track cannot take its label (it gets its next
    acceptable one, or ``unknown``).  Age and gender are the track's (``_smooth_per_track``),
    with or without a bundle.  Photo faces (track -1), emotion and other tasks keep their
    per-face predictions.  ``features``: the attribute features by
    name (``FaceModels.run``), averaged per track like the embeddings, for bundles whose
    heads read them."""
    from pipeline.contract import CLASSIFICATION, UNKNOWN

    faces = np.flatnonzero(np.asarray(track_ids) >= 0) if track_ids is not None else np.zeros(0, np.int64)
    if not len(faces):
        return predictions
    counts = np.asarray(photos.column("face_count").to_numpy(zero_copy_only=False), np.int64)
    photo_of = np.repeat(np.arange(len(counts)), counts)
    uris = photos.column("image_uri").to_pylist()
    # track ids are unique within a video, not within a batch of several videos
    keys = {}
    track_of = np.array([keys.setdefault((uris[photo_of[i]], int(track_ids[i])), len(keys)) for i in faces], np.int64)
    k = len(keys)
    predictions = _smooth_per_track(predictions, faces, track_of, k)
    specs = [s for s in bundle.specs if s.kind == CLASSIFICATION and s.open_set and s.name in predictions] \
        if bundle is not None else []
    if not specs:
        return predictions
    emb = np.zeros((k, embeddings.shape[1]), np.float32)
    np.add.at(emb, track_of, embeddings[faces])
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    size = np.bincount(track_of, minlength=k)
    feats = None
    if bundle.feature_sets:
        feats = {}
        for name in bundle.feature_sets:
            x = np.asarray(features[name], np.float32)[faces]  # type: ignore[index]
            m = np.zeros((k, x.shape[1]), np.float32)
            np.add.at(m, track_of, x)
            feats[name] = m / size[:, None]
    raw = bundle.raw(emb, feats)
    frames_of: list[set[int]] = [set() for _ in range(k)]
    tracks_in: dict[int, list[int]] = {}
    for i, t in zip(faces, track_of):
        frames_of[t].add(int(photo_of[i]))
        tracks_in.setdefault(int(photo_of[i]), []).append(int(t))
    out = dict(predictions)
    for s in specs:
        probs = raw[s.name]
        idx = np.full(k, -1, np.int64)
        decided = np.zeros(k, bool)
        for t in sorted(range(k), key=lambda t: (-size[t], -probs[t].max())):
            p = probs[t:t + 1].copy()
            taken = set()
            if s.exclusive:
                taken = {int(idx[u]) for f in frames_of[t] for u in tracks_in[f] if decided[u] and idx[u] >= 0}
                p[0, sorted(taken)] = 0.0
            j = int(bundle.decide(s, p, emb[t:t + 1], np.zeros(1, np.int64))[0][0])
            idx[t] = -1 if j in taken else j
            decided[t] = True
        score = np.where(idx >= 0, probs[np.arange(k), np.maximum(idx, 0)], probs.max(1)).astype(np.float32)
        labels, scores = predictions[s.name]
        labels, scores = np.array(labels, dtype=object), np.array(scores, np.float32)
        labels[faces] = np.asarray(s.labels + [UNKNOWN], dtype=object)[idx[track_of]]
        scores[faces] = score[track_of]
        out[s.name] = (labels, scores)
    return out


def _smooth_per_track(predictions: dict[str, tuple[np.ndarray, np.ndarray]], faces: np.ndarray,
                      track_of: np.ndarray, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``PER_TRACK`` tasks (a person's age and gender do not change within a shot; an
    expression does): every face of a track gets the track's value — the mean age and mean
    score; the gender with the most score summed over the track's faces, and the mean score of
    the faces that gave it — so a frame seen from the side does not flip them."""
    out = dict(predictions)
    size = np.bincount(track_of, minlength=k).astype(np.float64)
    for name in PER_TRACK:
        if name not in predictions:
            continue
        values, scores = predictions[name]
        scores = np.array(scores, np.float32)
        values = np.array(values, dtype=values.dtype)
        if values.dtype.kind == "f":  # regression
            values[faces] = (np.bincount(track_of, values[faces].astype(np.float64), minlength=k) / size)[track_of]
            scores[faces] = (np.bincount(track_of, scores[faces], minlength=k) / size)[track_of]
        else:  # classification: a vote weighted by score
            labels = sorted(set(values[faces].tolist()))
            code = np.array([labels.index(v) for v in values[faces]], np.int64)
            votes = np.zeros((k, len(labels)))
            np.add.at(votes, (track_of, code), scores[faces])
            best = votes.argmax(1)
            agree = code == best[track_of]
            values[faces] = np.asarray(labels, dtype=object)[best][track_of]
            scores[faces] = (np.bincount(track_of[agree], scores[faces][agree], minlength=k)
                             / np.maximum(np.bincount(track_of[agree], minlength=k), 1))[track_of]
        out[name] = (values, scores)
    return out


def join_segments(t: pa.Table, segment_s: float = SEGMENT_S) -> pa.Array:
    """Video-wide track ids for the rows of a prediction table (needs ``image_uri``,
    ``timestamp_s``, ``track_id``, ``bbox``, ``embedding``; ``segment_s``: the job's
    ``--video-segment-s``).  A track starting a segment continues the track that ended the
    segment before when they are at most ``TRACK_GAP`` samples apart and pass
    ``link_frames``' test on the last and first faces; then each video's tracks are
    numbered 0, 1, … in order of first appearance.  A local track is (video, the segment of
    its frame's time, id), so ids already joined give the same answer again (a pass cut
    short and run again).  Null where ``track_id`` is null."""
    tid = t.column("track_id").to_pylist()
    uris = t.column("image_uri").to_pylist()
    times = t.column("timestamp_s").to_pylist()
    boxes, embs = t.column("bbox").to_pylist(), t.column("embedding").to_pylist()
    keys = [None if k is None else (u, int(ts // segment_s), k) for u, k, ts in zip(uris, tid, times)]
    ends: dict[tuple, dict] = {}   # local track → its first and last face (rows)
    for i, key in enumerate(keys):
        if key is None:
            continue
        e = ends.setdefault(key, {"first": i, "last": i})
        if times[i] < times[e["first"]]:
            e["first"] = i
        if times[i] > times[e["last"]]:
            e["last"] = i
    video_times: dict[str, list[float]] = {}
    for u, ts in zip(uris, times):
        if ts is not None:
            video_times.setdefault(u, []).append(ts)
    box = lambda i: np.array([[boxes[i][c] for c in ("x", "y", "w", "h")]], np.float32)  # noqa: E731
    parent: dict[tuple, tuple] = {}
    for u in {key[0] for key in ends}:
        steps = np.diff(np.unique(video_times[u]))
        reach = (TRACK_GAP + 1) * (float(np.median(steps)) if len(steps) else 0.0) + 1e-3
        by_seg: dict[int, list[tuple]] = {}
        for key in ends:
            if key[0] == u:
                by_seg.setdefault(key[1], []).append(key)
        for s in sorted(by_seg):
            pairs = []
            for a in by_seg[s]:
                ia = ends[a]["last"]
                for b in by_seg.get(s + 1, []):
                    ib = ends[b]["first"]
                    if 0 < times[ib] - times[ia] <= reach:
                        score = _link_score(np.float32(np.dot(embs[ia], embs[ib])), _iou(box(ia), box(ib))[0, 0])
                        if np.isfinite(score):
                            pairs.append((float(score), a, b))
            used_a, used_b = set(), set()
            for _, a, b in sorted(pairs, reverse=True):
                if a not in used_a and b not in used_b:
                    used_a.add(a), used_b.add(b)
                    parent[b] = a

    def root(key: tuple) -> tuple:
        while key in parent:
            key = parent[key]
        return key

    first: dict[tuple, tuple] = {}   # joined track → (first time, its first local track) to number by
    for key, e in ends.items():
        r = root(key)
        first[r] = min(first.get(r, (math.inf,)), (times[e["first"]], key[1], key[2]))
    number: dict[tuple, int] = {}
    count: dict[str, int] = {}
    for r in sorted(first, key=lambda r: (r[0], first[r])):
        number[r] = count[r[0]] = count.get(r[0], -1) + 1
    return pa.array([None if key is None else number[root(key)] for key in keys], pa.int32())


def finish_tracks(output_uri: str, segment_s: float, log=print) -> int:  # noqa: ANN001
    """The scoring job's last step: rewrite the part files that hold rows of videos scored
    in several segments, so ``track_id`` is one id per person across the whole video
    (``join_segments``).  Segments are scored by different actors and committed as they
    come, so no actor sees both sides of a boundary; this pass does, once every segment is
    written.  Such videos are found by their segment-scoped ids (≥ ``TRACK_STRIDE``); joined
    ids are below it, so a finished table is left alone and a pass cut short is redone.
    Each file is rewritten whole (``storage.put_parquet``).  Returns the videos joined."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, files = storage.table_files(output_uri)
    if not files:
        return 0
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    if "track_id" not in ds.schema.names:
        return 0
    todo = ds.to_table(columns=["image_uri"], filter=pc.field("track_id") >= TRACK_STRIDE).column("image_uri")
    if not len(todo):
        return 0
    vids = pc.unique(todo.combine_chunks())
    cols = ["image_uri", "timestamp_s", "track_id", "bbox", "embedding"]
    wanted = pc.field("image_uri").isin(vids) & pc.field("track_id").is_valid()
    found = {f.path: f.to_table(columns=cols, filter=wanted) for f in ds.get_fragments()}
    found = {p: t for p, t in found.items() if t.num_rows}
    rows = pa.concat_tables(found.values())
    new = join_segments(rows, segment_s).to_pylist()
    ids = {(u, ts, k): n for u, ts, k, n in zip(rows.column("image_uri").to_pylist(),
                                                rows.column("timestamp_s").to_pylist(),
                                                rows.column("track_id").to_pylist(), new)}
    for path in found:
        part = pq.read_table(path, filesystem=fs)
        old = zip(part.column("image_uri").to_pylist(), part.column("timestamp_s").to_pylist(),
                  part.column("track_id").to_pylist())
        tracks = pa.array([ids.get(key, key[2]) for key in old], pa.int32())
        storage.put_parquet(fs, path, part.set_column(part.schema.get_field_index("track_id"),
                                                      part.schema.field("track_id"), tracks))
    log(f"videos: track ids joined across segment boundaries in {len(vids)} videos ({len(found)} files rewritten)")
    return len(vids)


def done_segments(existing: pa.Table, manifest: pa.Table) -> np.ndarray:
    """For --resume: which manifest rows are already written (a photo: any row of it; a
    video segment: any row of that video with ``timestamp_s`` inside the segment; every
    segment yields at least one row, all committed in one part file)."""
    uris = manifest.column("image_uri")
    have = existing.column("image_uri")
    photo_done = pc.is_in(uris, value_set=pa.array(sorted(set(have.to_pylist())), pa.string()))
    done = np.asarray(photo_done.to_numpy(zero_copy_only=False), bool)
    if "segment" not in manifest.schema.names:
        return done
    seg = manifest.column("segment").to_pylist()
    if all(s is None for s in seg):
        return done
    ts_col = existing.column("timestamp_s") if "timestamp_s" in existing.schema.names else None
    times: dict[str, list[float]] = {}
    if ts_col is not None:
        for u, t in zip(have.to_pylist(), ts_col.to_pylist()):
            if t is not None:
                times.setdefault(u, []).append(t)
    lo = manifest.column("segment_start").to_pylist()
    hi = manifest.column("segment_end").to_pylist()
    for i, (u, s) in enumerate(zip(uris.to_pylist(), seg)):
        if s is not None:
            done[i] = any(lo[i] - 1e-3 <= t < hi[i] - 1e-3 for t in times.get(u, ()))
    return done


def segment_rows(fs: pafs.FileSystem, uri: str, segment: int, start: float, end: float | None,
                 detector, settings) -> list[dict]:
    """One manifest segment → crop-stage rows (``table.PHOTO_SCHEMA``): a row per sampled
    frame with faces, or one ``no_face`` / ``decode_error`` row for the segment."""
    from pipeline.contract import DECODE_ERROR, NO_FACE, OK, TOO_LARGE
    from pipeline.decoding import DecodedImage
    from pipeline.photos import analyse_image

    end = math.inf if end is None else end
    rows: list[dict] = []
    size: list[int] = []
    too_large: list[str] = []

    def on_frame(fr: Frame) -> None:
        h, w = fr.rgb.shape[:2]
        size[:] = [w, h]
        if w * h > settings.max_pixels:
            too_large[:] = [f"frames are {w}×{h} pixels, limit {settings.max_pixels}"]
            return
        res = analyse_image(DecodedImage(np.ascontiguousarray(fr.rgb), w, h, 1.0), detector)
        if res.faces:
            rows.append(dict(
                image_uri=uri, status=OK, error=None, width=w, height=h, face_count=len(res.faces),
                boxes=[float(v) for f in res.faces for v in f.bbox],
                landmarks=[float(v) for f in res.faces for v in np.ravel(f.landmarks)],
                scores=[float(f.score) for f in res.faces], main_face=res.main,
                chips=np.ascontiguousarray(res.chips).tobytes(), frame_index=fr.index, timestamp_s=fr.time,
                segment=segment))

    got = sample_frames(fs, uri, settings.video_fps, start, end, on_frame=on_frame)
    if too_large:
        return [_status_row(uri, segment, start, TOO_LARGE, too_large[0], *size)]
    if got.error:
        for r in rows:
            r["error"] = got.error
    if rows:
        return rows
    if not got.opened:
        return [_status_row(uri, segment, start, DECODE_ERROR, got.error or "not a video")]
    if got.error and not size:
        return [_status_row(uri, segment, start, DECODE_ERROR, got.error)]
    return [_status_row(uri, segment, start, NO_FACE, got.error, *(size or [None, None]))]


def _status_row(uri: str, segment: int, start: float, status: str, error: str | None,
                width: int | None = None, height: int | None = None) -> dict:
    return dict(image_uri=uri, status=status, error=error, width=width, height=height, face_count=0,
                boxes=[], landmarks=[], scores=[], main_face=None, chips=b"", frame_index=None,
                timestamp_s=start, segment=segment)
