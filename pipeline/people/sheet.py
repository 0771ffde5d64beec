"""The contact sheet (``_people.html``): the largest people, their most typical faces."""
from __future__ import annotations

import base64
import html
import io
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.people.index import list_people
from pipeline.people.reading import parquet_files

Box = tuple[float, float, float, float]     # x, y, w, h in photo pixels
SHEET_DEADLINE_S = 60.0   # every thumbnail of the sheet by then; the rest are placeholders
THUMB_THREADS = 16        # photo reads at once (S3 latency, not CPU)


@dataclass
class Sheet:
    """The contact sheet's HTML and how many of its faces could not be shown."""
    html: str
    faces: int = 0          # face cells on the sheet
    unreadable: int = 0     # of them placeholders: photo gone, unreadable, or not read by the deadline


def contact_sheet(people: pa.Table, table_uri: str, meta: dict, n_people: int = 40, per_person: int = 8,
                  thumb: int = 96, deadline_s: float = SHEET_DEADLINE_S) -> Sheet:
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
    faces = sorted({f for v in picks.values() for f in v})
    thumbs = read_thumbnails(faces, boxes, thumb, deadline_s)
    rows = []
    named = ({} if "name" not in t.column_names else  # names (issue 24): each person's name from the labels log
             dict(zip(t.column("person").to_pylist(), t.column("name").to_pylist())))
    for p in top:
        label = f'<br><b>{html.escape(named[p["person"]])}</b>' if named.get(p["person"]) else ""
        imgs = "".join(f'<img src="data:image/jpeg;base64,{thumbs[(u, i)]}" title="{html.escape(u)} #{i}">'
                       if thumbs.get((u, i)) else
                       f'<span class="miss" title="unreadable: {html.escape(u)} #{i}"></span>'
                       for u, i in picks[p["person"]])
        rows.append(f'<div class="p"><div class="id">{p["person"]}{label}<br><small>{p["size"]} faces</small></div>'
                    f'<div class="faces">{imgs}</div></div>')
    unreadable = sum(1 for f in faces if not thumbs.get(f))
    missing = f" {unreadable} of {len(faces)} faces could not be read (grey)." if unreadable else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>faceray people</title><style>
body{{font-family:sans-serif;margin:16px;background:#fafafa}} .p{{display:flex;align-items:center;margin:6px 0;
background:#fff;border:1px solid #ddd;padding:4px}} .id{{width:110px;font-weight:bold}} img{{width:{thumb}px;
height:{thumb}px;margin:2px;object-fit:cover}} .miss{{display:inline-block;width:{thumb}px;height:{thumb}px;
margin:2px;background:#ccc}} small{{color:#666;font-weight:normal}}
</style></head><body><h1>People</h1><p>{meta['people']} people ({meta['people_2plus']} with 2+ faces) from
{meta['faces']} faces of <code>{html.escape(table_uri)}</code>; threshold cos ≥ {meta['threshold']}.
The {len(top)} largest, most typical faces first.{missing}</p>{''.join(rows)}</body></html>"""
    return Sheet(page, len(faces), unreadable)


def read_thumbnails(faces: list[tuple[str, int]], boxes: dict[tuple[str, int], Box], size: int,
                    deadline_s: float = SHEET_DEADLINE_S, threads: int = THUMB_THREADS) -> dict[tuple[str, int], str | None]:
    """Base64 JPEG per face, each photo read once, all by ``deadline_s``; a face missing
    from the result (or None) gets a placeholder.

    Reads run in daemon threads and nothing ever joins them: a read blocked on a store
    that does not answer (bounded anyway by ``storage.PREVIEW_LIMITS``) is left behind at
    the deadline, and a stop (SIGINT/SIGTERM raised in this thread while it waits) or the
    job's exit never waits for it.  (A ``ThreadPoolExecutor`` would: its workers are
    joined at interpreter exit whatever ``shutdown`` was told.)"""
    by_photo: dict[str, list[int]] = {}
    for u, i in faces:
        by_photo.setdefault(u, []).append(i)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for u in by_photo:
        todo.put(u)
    done: queue.SimpleQueue = queue.SimpleQueue()
    stores: dict[bool, pafs.FileSystem] = {}
    lock = threading.Lock()
    quit_ = threading.Event()

    def store(uri: str) -> pafs.FileSystem:
        with lock:  # one client per store: an S3 client is costly to make
            if storage.is_s3(uri) not in stores:
                stores[storage.is_s3(uri)] = storage.resolve(uri, storage.PREVIEW_LIMITS)[0]
            return stores[storage.is_s3(uri)]

    def work() -> None:
        while not quit_.is_set():
            try:
                u = todo.get_nowait()
            except queue.Empty:
                return
            try:
                out = _thumbnails(store(u), u, [boxes.get((u, i)) for i in by_photo[u]], size)
            except Exception:  # a photo gone or unreadable since scoring: placeholders, not a failed job
                out = [None] * len(by_photo[u])
            done.put((u, out))

    for _ in range(min(threads, len(by_photo))):
        threading.Thread(target=work, daemon=True, name="faceray-thumbnail").start()
    result: dict[tuple[str, int], str | None] = {}
    end = time.monotonic() + deadline_s
    try:
        for _ in range(len(by_photo)):
            try:
                u, out = done.get(timeout=max(end - time.monotonic(), 0.0))
            except queue.Empty:
                break  # the deadline: what is not read yet stays a placeholder
            result.update(((u, i), b) for i, b in zip(by_photo[u], out))
    finally:
        quit_.set()  # threads take no new photo; one blocked in a read is left to end alone
    return result


def _boxes(table_uri: str, uris: set[str]) -> dict[tuple[str, int], Box]:
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


def _thumbnails(fs: pafs.FileSystem, image_uri: str, boxes: list[Box | None], size: int) -> list[str | None]:
    """Base64 JPEGs of a photo's faces: each box widened by 30 %, after EXIF rotation."""
    from PIL import Image, ImageOps

    photo = ImageOps.exif_transpose(Image.open(io.BytesIO(storage.read_bytes(fs, image_uri)))).convert("RGB")
    out = []
    for box in boxes:
        img = photo
        if box is not None:
            x, y, w, h = box
            m = 0.3 * max(w, h)
            img = img.crop((int(x - m), int(y - m), int(x + w + m), int(y + h + m)))
        img = img.copy()
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out
