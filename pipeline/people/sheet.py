"""The contact sheet (``_people.html``): the largest people, their most typical faces."""
from __future__ import annotations

import base64
import html
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.people.index import list_people
from pipeline.people.reading import parquet_files


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
