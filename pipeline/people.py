"""People without labels: every face of a prediction table grouped into people.

How (numbers in benchmarks/README.md, "people"):

1. kNN graph (``pipeline.knn``): each face's K nearest faces by cosine, Ray tasks.
2. Keep an edge when its cosine is at least ``THRESHOLD``.  The threshold comes from
   this backbone's own verification statistics, never from the archive: on the LFW
   pairs (600 same, 600 different, ``../shared/data/pairs``) the cosines are
   same ~ N(0.949, 0.020) and different ~ N(0.833, 0.037); the two likelihoods are equal
   at cos 0.905 (dlib's 0.6 Euclidean rule is cos 0.912 here: raw descriptors have norm
   1.43, not 1) and ``THRESHOLD`` is where "same" is ``EDGE_ODDS`` = 100× likelier than
   "different", cos 0.939.  An equal-odds edge is right per pair but, with every face
   offering K candidates, enough wrong ones chain people together (1 component for
   1,846 LFW faces at 0.91); at 100:1 the graph's wrong edges are few and isolated.
3. Connected components of that graph, then Infomap (igraph) inside each component to cut
   the remaining bridges between two people.  Components are independent, so they are
   clustered in Ray tasks, batches of components per task.

A person's centre is the normalised mean of its faces; ``similarity`` is the cosine to it.
Person ids (``p000001``…) are given largest first and never change on ``--resume``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline import stopping, storage
from pipeline.contract import UsageError
from pipeline.knn import knn_graph
from pipeline.table import embedding_matrix

SAME_COS = (0.9492, 0.0201)    # mean, std of same-person cosine, LFW pairs/ (600), this backbone
DIFF_COS = (0.8330, 0.0371)    # different people (600 pairs)
EDGE_ODDS = 100.0              # an edge needs "same" 100× likelier than "different"
K = 30                         # neighbours per face in the graph
# Faces whose box is smaller than this (shorter side, photo pixels) are not linked to any
# other: their embeddings are too unreliable.  Without it, tiny, blurred and half-cut faces
# (crowd backgrounds, faces cut by a photo's border) fell together into large false people
# at the top of the contact sheet (a 65-face one in the LFW set: median side 33 px,
# det_score 0.79).  Each such face is a person of its own.
MIN_LINK_PX = 40
BACKBONE = "dlib_resnet_v1 (128-d, L2-normalised)"
PEOPLE_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("face_index", pa.int32()),
    pa.field("person", pa.string()),
    pa.field("person_size", pa.int32()),
    pa.field("similarity", pa.float32()),
])
ROWS_PER_FILE = 1_000_000
BATCH_NODES = 200_000          # graph nodes per clustering task


class PeopleError(UsageError):
    """The table cannot be clustered (no embeddings, no faces, unreadable): exit 2."""


def log_likelihood_ratio(cos: np.ndarray | float) -> np.ndarray:
    """log p(cos | same person) / p(cos | different), Gaussian fits of the measured pairs."""
    (ms, ss), (md, sd) = SAME_COS, DIFF_COS
    c = np.asarray(cos, np.float64)
    return (-0.5 * ((c - ms) / ss) ** 2 - math.log(ss)) - (-0.5 * ((c - md) / sd) ** 2 - math.log(sd))


def odds_threshold(odds: float = EDGE_ODDS) -> float:
    """The cosine (between the two means) where same/different likelihoods reach ``odds``."""
    lo, hi = DIFF_COS[0], SAME_COS[0]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_likelihood_ratio(mid) < math.log(odds) else (lo, mid)
    return round((lo + hi) / 2, 3)


THRESHOLD = odds_threshold()   # 0.939


# ---------------------------------------------------------------- reading tables

@dataclass
class Faces:
    """The faces of a table, sorted by (image_uri, face_index)."""
    image_uri: pa.Array
    face_index: np.ndarray          # int32
    embedding: np.ndarray           # float32 N×128, unit rows
    bbox: np.ndarray | None = None  # float32 N×4 (x, y, w, h) in photo pixels

    def __len__(self) -> int:
        return len(self.face_index)


def parquet_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The table's Parquet files (``storage.table_files``), misuse as a ``PeopleError``."""
    try:
        return storage.table_files(uri)
    except storage.StorageError as exc:
        raise PeopleError(str(exc)) from exc


def read_faces(table_uri: str, with_bbox: bool = False) -> Faces:
    """Every face (status ok, with an embedding) of a prediction table."""
    fs, files = parquet_files(table_uri)
    if not files:
        raise PeopleError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    names = set(ds.schema.names)
    missing = {"image_uri", "face_index", "embedding"} - names
    if missing:
        raise PeopleError(f"{table_uri}: not a prediction table with embeddings (no column "
                          f"{', '.join(sorted(missing))})")
    cols = ["image_uri", "face_index", "embedding"] + (["bbox"] if with_bbox and "bbox" in names else [])
    flt = pc.is_valid(pc.field("embedding")) & pc.is_valid(pc.field("face_index"))
    if "status" in names:
        flt = flt & (pc.field("status") == "ok")
    t = ds.to_table(columns=cols, filter=flt)
    if t.num_rows == 0:
        raise PeopleError(f"{table_uri}: no faces with embeddings (every row lacks a face or an embedding)")
    t = t.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    bbox = None
    if "bbox" in t.column_names:
        b = t.column("bbox").combine_chunks()
        bbox = np.stack([b.field(n).to_numpy(zero_copy_only=False) for n in "xywh"], 1).astype(np.float32)
    return Faces(t.column("image_uri").combine_chunks(), t.column("face_index").to_numpy().astype(np.int32),
                 embedding_matrix(t.column("embedding")), bbox)


# ---------------------------------------------------------------- clustering

def graph_edges(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (a < b, cosine) of a kNN graph at cosine ≥ threshold, each once."""
    n, k = ids.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols, s = ids.ravel(), sims.ravel()
    keep = (s >= threshold) & (cols >= 0) & (cols != rows)
    a, b, s = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep]), s[keep]
    _, first = np.unique(a * n + b, return_index=True)
    return a[first], b[first], s[first].astype(np.float32)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def _infomap(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Infomap communities of one batch of whole components (local node numbers)."""
    import igraph as ig

    random.seed(0)  # python-igraph draws from Python's random: same input, same people
    g = ig.Graph(n=n, edges=np.stack([a, b], 1).tolist())
    return np.asarray(g.community_infomap(edge_weights=list(map(float, w))).membership, np.int64)


def cluster_graph(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray,
                  batch_nodes: int = BATCH_NODES) -> np.ndarray:
    """Labels 0..P-1 of n nodes: components, then Infomap inside those of 3+ faces.

    Components of 1–2 faces are people as they are; bigger ones go, whole, in batches of
    about ``batch_nodes`` nodes, to Ray tasks (or run here without Ray)."""
    comp = components(n, a, b)
    sizes = np.bincount(comp)
    labels = comp.copy()
    big = np.flatnonzero(sizes >= 3)
    if len(big):
        batch_of = np.full(len(sizes), -1, np.int64)
        # a component bigger than a batch makes the raw numbers skip one: number them densely
        batch_of[big] = np.unique((np.cumsum(sizes[big]) - sizes[big]) // batch_nodes, return_inverse=True)[1]
        node_batch, edge_batch = batch_of[comp], batch_of[comp[a]]
        n_batches = int(batch_of.max()) + 1
        node_order = np.argsort(node_batch, kind="stable")
        node_parts = np.split(node_order, np.searchsorted(node_batch[node_order], np.arange(n_batches + 1)))[1:-1]
        edge_order = np.argsort(edge_batch, kind="stable")
        edge_parts = np.split(edge_order, np.searchsorted(edge_batch[edge_order], np.arange(n_batches + 1)))[1:-1]
        local = np.empty(n, np.int64)
        jobs = []
        for part, e in zip(node_parts, edge_parts):
            local[part] = np.arange(len(part))
            jobs.append((len(part), local[a[e]], local[b[e]], w[e]))
        offset = len(sizes)
        for part, memb in zip(node_parts, _run_batches(jobs)):
            labels[part] = offset + memb
            offset += int(memb.max()) + 1
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def _run_batches(jobs: list[tuple]) -> list[np.ndarray]:
    try:
        import ray
        if ray.is_initialized() and len(jobs) > 0:
            task = ray.remote(num_cpus=1)(_infomap)
            return ray.get([task.remote(*j) for j in jobs])
    except ImportError:
        pass
    return [_infomap(*j) for j in jobs]


def cluster(x: np.ndarray, threshold: float = THRESHOLD, k: int = K,
            log: Callable[[str], None] | None = None, **knn_kwargs) -> np.ndarray:
    """Person labels 0..P-1 for unit embeddings ``x`` (kNN graph → edges → Infomap)."""
    if len(x) == 1:
        return np.zeros(1, np.int64)
    sims, ids, _ = knn_graph(x, k + 1, log=log, **knn_kwargs)
    t0 = time.monotonic()
    a, b, w = graph_edges(sims, ids, threshold)
    del sims, ids
    labels = cluster_graph(len(x), a, b, w)
    if log:
        log(f"[clustering] {len(x)} faces, {len(a)} edges at cos ≥ {threshold}: "
            f"{labels.max() + 1} people in {time.monotonic() - t0:.1f} s")
    return labels


def centres(x: np.ndarray, labels: np.ndarray, n_people: int | None = None) -> np.ndarray:
    """Normalised mean embedding per label (P×128), by a sparse sum, not a loop."""
    from scipy.sparse import csr_matrix

    p = int(labels.max()) + 1 if n_people is None else n_people
    m = csr_matrix((np.ones(len(labels), np.float32), (labels, np.arange(len(labels)))), shape=(p, len(labels)))
    c = np.asarray(m @ x, np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def ranked_ids(labels: np.ndarray, first: int = 1) -> np.ndarray:
    """Label → id number, largest person first (ties: the earlier face), from ``first``."""
    sizes = np.bincount(labels)
    first_row = np.full(len(sizes), len(labels))
    np.minimum.at(first_row, labels, np.arange(len(labels)))
    order = np.lexsort((first_row, -sizes))
    num = np.empty(len(sizes), np.int64)
    num[order] = np.arange(first, first + len(sizes))
    return num


def person_strings(nums: np.ndarray) -> pa.Array:
    """1 → "p000001" (more digits past 999999)."""
    return pc.binary_join_element_wise("p", pc.utf8_lpad(pc.cast(pa.array(nums), pa.string()), 6, "0"), "")


def person_numbers(person: pa.Array | pa.ChunkedArray) -> np.ndarray:
    s = pc.utf8_slice_codeunits(person, 1)
    return np.asarray(pc.cast(s, pa.int64()).to_numpy(zero_copy_only=False))


# ---------------------------------------------------------------- the job

@dataclass
class PeopleSummary:
    faces: int = 0
    people: int = 0
    singletons: int = 0
    largest: int = 0
    joined: int = 0          # --resume: new faces that joined an existing person
    new_people: int = 0      # --resume: people founded by new faces
    kept: int = 0            # --resume: faces already in the output
    unlinked: int = 0        # faces under MIN_LINK_PX: each a person of its own
    threshold: float = THRESHOLD
    seconds: dict[str, float] = field(default_factory=dict)
    output: str = ""

    def lines(self) -> list[str]:
        out = [f"faces:         {self.faces}",
               f"people:        {self.people} ({self.people - self.singletons} with 2+ faces, "
               f"{self.singletons} single faces, {self.unlinked} of them under {MIN_LINK_PX} px and never "
               f"linked; largest {self.largest})"]
        if self.kept or self.joined or self.new_people:
            out.append(f"--resume:      {self.kept} faces kept their person, {self.joined} new faces joined "
                       f"existing people, {self.new_people} new people")
        out.append(f"threshold:     cos ≥ {self.threshold} (edge odds {EDGE_ODDS:g}:1 from LFW pairs)")
        out.append("seconds:       " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
                   + f", total {sum(self.seconds.values()):.1f}")
        out.append(f"output:        {self.output} (+ _people.json, _people.html)")
        return out


def read_people(uri: str) -> pa.Table | None:
    """An existing people output (image_uri, face_index, person), or None when there is none."""
    fs, files = parquet_files(uri)
    if not files:
        return None
    t = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["image_uri", "face_index", "person"])
    return t


def cluster_table(table_uri: str, output_uri: str, resume: bool = False, threshold: float = THRESHOLD,
                  k: int = K, log: Callable[[str], None] = print, sheet_people: int = 40) -> PeopleSummary:
    """The whole job: read → (resume: join) → kNN + cluster → write table, json, html."""
    summary = PeopleSummary(threshold=threshold, output=output_uri)
    t0 = time.monotonic()
    storage.check_writable(output_uri)
    faces = read_faces(table_uri, with_bbox=True)
    summary.faces = len(faces)
    linkable = np.ones(len(faces), bool) if faces.bbox is None else faces.bbox[:, 2:].min(1) >= MIN_LINK_PX
    previous = read_people(output_uri) if resume else None
    summary.seconds["reading"] = time.monotonic() - t0
    log(f"[reading] {len(faces)} faces from {table_uri}"
        + (f", {previous.num_rows} faces in the existing people" if previous is not None else "")
        + f": {summary.seconds['reading']:.1f} s")

    x = faces.embedding
    nums = np.zeros(len(faces), np.int64)            # person number per face (0 = none yet)
    if previous is not None and previous.num_rows:
        nums = _previous_numbers(faces, previous)
        summary.kept = int((nums > 0).sum())
    todo = np.flatnonzero((nums == 0) & linkable)
    if summary.kept and len(todo):
        t1 = time.monotonic()
        old = np.flatnonzero(nums > 0)
        uniq, lab = np.unique(nums[old], return_inverse=True)
        c = centres(x[old], lab, len(uniq))
        from pipeline.knn import build_index
        s, i = build_index(c).search(x[todo], 1)
        join = s[:, 0] >= threshold
        nums[todo[join]] = uniq[i[join, 0]]
        summary.joined = int(join.sum())
        todo = todo[~join]
        summary.seconds["joining"] = time.monotonic() - t1
        log(f"[joining] {summary.joined} new faces joined existing people (nearest centre cos ≥ {threshold}), "
            f"{len(todo)} left to cluster: {summary.seconds['joining']:.1f} s")
    if len(todo):
        t1 = time.monotonic()
        labels = cluster(x[todo], threshold, k, log=log)
        start = int(nums.max()) + 1 if summary.kept else 1
        nums[todo] = ranked_ids(labels, start)[labels]
        summary.new_people = int(labels.max()) + 1 if summary.kept else 0
        summary.seconds["kNN+clustering"] = time.monotonic() - t1
    small = np.flatnonzero((nums == 0) & ~linkable)   # each its own person, after the others
    if len(small):
        nums[small] = int(nums.max()) + 1 + np.arange(len(small))
        summary.new_people += len(small) if summary.kept else 0
    summary.unlinked = int((~linkable).sum())

    t1 = time.monotonic()
    uniq, lab = np.unique(nums, return_inverse=True)
    c = centres(x, lab, len(uniq))
    sim = np.einsum("ij,ij->i", x, c[lab]).astype(np.float32)
    sizes = np.bincount(lab)
    summary.people, summary.singletons, summary.largest = len(uniq), int((sizes == 1).sum()), int(sizes.max())
    table = pa.table({"image_uri": faces.image_uri, "face_index": pa.array(faces.face_index, pa.int32()),
                      "person": person_strings(nums), "person_size": pa.array(sizes[lab].astype(np.int32)),
                      "similarity": pa.array(np.clip(sim, -1, 1))}, schema=PEOPLE_SCHEMA)
    files = write_table(output_uri, table)
    meta = {"source_table": table_uri, "backbone": BACKBONE, "threshold": threshold, "edge_odds": EDGE_ODDS,
            "same_cos": SAME_COS, "different_cos": DIFF_COS, "k": k, "faces": summary.faces,
            "people": summary.people, "people_2plus": summary.people - summary.singletons,
            "single_faces": summary.singletons, "unlinked_small_faces": summary.unlinked, "min_link_px": MIN_LINK_PX,
            "largest": summary.largest, "resumed": bool(previous is not None),
            "joined": summary.joined, "new_people": summary.new_people, "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text(output_uri, "_people.json", json.dumps(meta, indent=2))
    write_text(output_uri, "_people.html", contact_sheet(table, table_uri, meta, sheet_people))
    summary.seconds["writing"] = time.monotonic() - t1
    log(f"[writing] {table.num_rows} rows, {summary.people} people → {output_uri}: {summary.seconds['writing']:.1f} s")
    return summary


def _previous_numbers(faces: Faces, previous: pa.Table) -> np.ndarray:
    """Person number of each face that the previous output already holds, else 0 (a hash join)."""
    mine = pa.table({"image_uri": faces.image_uri, "face_index": pa.array(faces.face_index, pa.int32()),
                     "row": pa.array(np.arange(len(faces), dtype=np.int64))})
    prev = previous.select(["image_uri", "face_index"]).append_column("num", pa.array(person_numbers(previous.column("person"))))
    prev = prev.cast(pa.schema([("image_uri", pa.string()), ("face_index", pa.int32()), ("num", pa.int64())]))
    j = mine.join(prev, keys=["image_uri", "face_index"], join_type="inner")
    nums = np.zeros(len(faces), np.int64)
    nums[j.column("row").to_numpy()] = j.column("num").to_numpy()
    return nums


def write_table(output_uri: str, table: pa.Table) -> list[str]:
    """Write ``part-<run>-NNNNN.parquet`` files, then remove older part files (so a crash
    mid-write leaves the previous people readable, never half of them)."""
    fs, path = storage.resolve(output_uri)
    run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    _, old = parquet_files(output_uri)
    names = []
    with stopping.deferred():  # a Ctrl-C waits: never old and new people side by side
        for n, lo in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_FILE)):
            name = f"part-{run}-{n:05d}.parquet"
            storage.put_parquet(fs, f"{path}/{name}", table.slice(lo, ROWS_PER_FILE))
            names.append(name)
        for p in old:
            fs.delete_file(p)
    return names


def write_text(output_uri: str, name: str, text: str) -> None:
    fs, path = storage.resolve(output_uri)
    storage.put_atomic(fs, f"{path}/{name}", text.encode())


# ---------------------------------------------------------------- contact sheet

def contact_sheet(people: pa.Table, table_uri: str, meta: dict, n_people: int = 40, per_person: int = 8,
                  thumb: int = 96) -> str:
    """HTML of the largest people, each with its most typical faces (highest similarity)."""
    top = list_people(people, limit=n_people)
    want = {p["person"] for p in top}
    t = people.filter(pc.is_in(people.column("person"), pa.array(sorted(want))))
    t = t.sort_by([("person", "ascending"), ("similarity", "descending")])
    per = t.group_by("person", use_threads=False).aggregate([("image_uri", "list"), ("face_index", "list")])
    picks = {p: list(zip(u[:per_person], i[:per_person])) for p, u, i in
             zip(per.column("person").to_pylist(), per.column("image_uri_list").to_pylist(),
                 per.column("face_index_list").to_pylist())}
    boxes = _boxes(table_uri, {u for v in picks.values() for u, _ in v})
    jobs = [(u, boxes.get((u, i))) for v in picks.values() for u, i in v]
    with ThreadPoolExecutor(16) as pool:
        thumbs = dict(zip(jobs, pool.map(lambda j: _thumbnail(j[0], j[1], thumb), jobs)))
    rows = []
    for p in top:
        imgs = "".join(f'<img src="data:image/jpeg;base64,{thumbs[(u, boxes.get((u, i)))]}" title="{html.escape(u)} #{i}">'
                       if thumbs[(u, boxes.get((u, i)))] else '<span class="miss">?</span>'
                       for u, i in picks[p["person"]])
        rows.append(f'<div class="p"><div class="id">{p["person"]}<br><small>{p["size"]} faces</small></div>'
                    f'<div class="faces">{imgs}</div></div>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>faceray people</title><style>
body{{font-family:sans-serif;margin:16px;background:#fafafa}} .p{{display:flex;align-items:center;margin:6px 0;
background:#fff;border:1px solid #ddd;padding:4px}} .id{{width:110px;font-weight:bold}} img{{width:{thumb}px;
height:{thumb}px;margin:2px;object-fit:cover}} .miss{{display:inline-block;width:{thumb}px}} small{{color:#666;font-weight:normal}}
</style></head><body><h1>People</h1><p>{meta['people']} people ({meta['people_2plus']} with 2+ faces) from
{meta['faces']} faces of <code>{html.escape(table_uri)}</code>; threshold cos ≥ {meta['threshold']}.
The {len(top)} largest, most typical faces first.</p>{''.join(rows)}</body></html>"""


def _boxes(table_uri: str, uris: set[str]) -> dict[tuple[str, int], tuple[float, float, float, float]]:
    fs, files = parquet_files(table_uri)
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    if "bbox" not in ds.schema.names or not uris:
        return {}
    t = ds.to_table(columns=["image_uri", "face_index", "bbox"],
                    filter=pc.is_in(pc.field("image_uri"), pa.array(sorted(uris))) & pc.is_valid(pc.field("bbox")))
    b = t.column("bbox").combine_chunks()
    xywh = np.stack([b.field(n).to_numpy(zero_copy_only=False) for n in "xywh"], 1)
    return {(u, int(i)): tuple(map(float, r)) for u, i, r in
            zip(t.column("image_uri").to_pylist(), t.column("face_index").to_pylist(), xywh)}


def _thumbnail(image_uri: str, box: tuple[float, float, float, float] | None, size: int) -> str | None:
    """Base64 JPEG of a face: its box widened by 30 %, from the photo after EXIF rotation."""
    from PIL import Image, ImageOps

    try:
        fs, _ = storage.resolve(image_uri)
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(storage.read_bytes(fs, image_uri))))
        img = img.convert("RGB")
        if box is not None:
            x, y, w, h = box
            m = 0.3 * max(w, h)
            img = img.crop((int(x - m), int(y - m), int(x + w + m), int(y + h + m)))
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=80)
        return base64.b64encode(out.getvalue()).decode()
    except Exception:  # a photo gone or unreadable since scoring: a blank cell, not a failed job
        return None


# ---------------------------------------------------------------- serving helpers

def list_people(people: pa.Table | str, limit: int = 50, offset: int = 0) -> list[dict]:
    """``GET /v1/people``: people largest first (ties by id), each with its size and the
    face nearest its centre as the representative."""
    if isinstance(people, str):
        fs, files = parquet_files(people)
        if not files:
            raise PeopleError(f"{people}: no people table")
        people = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    t = people.sort_by([("person", "ascending"), ("similarity", "descending")])
    person = t.column("person").combine_chunks()
    first = np.flatnonzero(np.r_[True, pc.not_equal(person[1:], person[:-1]).to_numpy(zero_copy_only=False)])
    reps = t.take(pa.array(first))
    order = np.lexsort((np.arange(reps.num_rows), -reps.column("person_size").to_numpy()))
    reps = reps.take(pa.array(order[offset:offset + limit]))
    return [{"person": p, "size": s, "image_uri": u, "face_index": i} for p, s, u, i in
            zip(reps.column("person").to_pylist(), reps.column("person_size").to_pylist(),
                reps.column("image_uri").to_pylist(), reps.column("face_index").to_pylist())]


class FaceIndex:
    """Search a table's faces by embedding (``POST /v1/search``): exact below
    ``knn.EXACT_MAX`` faces, IVF above; ``person`` from a people table when given."""

    def __init__(self, faces: Faces, person: pa.Array | None = None) -> None:
        from pipeline.knn import build_index

        self.image_uri = faces.image_uri
        self.face_index = faces.face_index
        self.person = person
        self.index = build_index(faces.embedding)

    @classmethod
    def from_uris(cls, table_uri: str, people_uri: str | None = None) -> "FaceIndex":
        faces = read_faces(table_uri)
        person = None
        if people_uri:
            prev = read_people(people_uri)
            if prev is None:
                raise PeopleError(f"{people_uri}: no people table")
            nums = _previous_numbers(faces, prev)
            person = pc.if_else(pa.array(nums > 0), person_strings(nums), pa.scalar(None, pa.string()))
        return cls(faces, person)

    def __len__(self) -> int:
        return len(self.face_index)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, int, float, str | None]]]:
        """Per query (unit N×128): up to k (image_uri, face_index, similarity, person), best first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        s, i = self.index.search(q, min(k, len(self)))
        out = []
        for srow, irow in zip(s, i):
            ok = irow >= 0
            ids = pa.array(irow[ok])
            uris = self.image_uri.take(ids).to_pylist()
            people = self.person.take(ids).to_pylist() if self.person is not None else [None] * len(uris)
            out.append(list(zip(uris, self.face_index[irow[ok]].tolist(), srow[ok].astype(float).tolist(), people)))
        return out
