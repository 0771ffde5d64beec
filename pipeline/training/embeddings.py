"""The embedding pass of training: main-face embeddings per labelled photo, cached.

Rows are matched to the cache by (image_uri, size), so a retrain with other settings, or
on a grown set, embeds only what is new; the key holds the weights' content hash and
every detector threshold, so other weights under the same file name never reuse rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage, table
from pipeline.settings import Settings

CACHE_SCHEMA = pa.schema([*table.MAIN_FACE_SCHEMA, pa.field("size", pa.int64())])


def backbone_info(settings: Settings) -> dict[str, Any]:
    """Backbone id, weights hash and chip geometry: recorded in the bundle and keying the cache."""
    from pipeline.backbone import DLIB_RESNET, read_weights_bytes

    data, _ = read_weights_bytes(settings.weights)
    geo = DLIB_RESNET.geometry
    return {"id": DLIB_RESNET.id, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "geometry": {"size": geo.size, "net_input": geo.net_input,
                         "template_norm": [list(p) for p in geo.template_norm]}}


def cache_key(data_uri: str, settings: Settings, flip_tta: bool) -> str:
    detector = {"det_max_side": settings.det_max_side, "det_score": settings.det_score,
                "det_score_large": settings.det_score_large, "min_face": settings.min_face,
                "model": settings.detector_model}
    blob = json.dumps({"data": data_uri.rstrip("/"), "backbone": backbone_info(settings),
                       "detector": detector, "flip": flip_tta}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_stages(manifest: pa.Table, data_uri: str, settings: Settings, flip_tta: bool = False,
               log: Callable[[str], None] = print) -> pa.Table:
    """The scoring job's stages on Ray Data, main faces only: ``table.MAIN_FACE_SCHEMA`` rows."""
    import ray

    from pipeline import progress
    from pipeline.resources import plan_resources
    from pipeline.stages import face_dataset

    plan = plan_resources(ray.cluster_resources())
    log(f"embedding {manifest.num_rows} photos: {plan.describe()}")
    with progress.watch("train-embed", progress.new_run_id(), "embedding", manifest.num_rows, log=log) as w:
        ds = face_dataset(manifest, data_uri, settings, plan, flip_tta=flip_tta, main_only=True, progress=w.board)
        parts = [p for p in ray.get(ds.to_arrow_refs()) if p.num_rows]
    return pa.concat_tables(parts) if parts else table.MAIN_FACE_SCHEMA.empty_table()


def _read_cache(cache_file: str, fs) -> pa.Table | None:
    try:
        with fs.open_input_file(cache_file) as f:
            return pq.read_table(f).select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)
    except (FileNotFoundError, OSError, KeyError, pa.ArrowInvalid):
        return None


def embed_labelled(manifest: pa.Table, data_uri: str, settings: Settings, cache_uri: str | None,
                   flip_tta: bool = False, log: Callable[[str], None] = print) -> tuple[pa.Table, dict]:
    """Main-face embeddings for every photo of ``manifest`` (manifest order), via the cache."""
    key = cache_key(data_uri, settings, flip_tta)
    cached, cache_file, fs = None, None, None
    if cache_uri:
        fs, cpath = storage.resolve(cache_uri)
        cache_file = f"{cpath}/{key}.parquet"
        cached = _read_cache(cache_file, fs)
    want = manifest.select(["image_uri", "size"])
    if cached is not None:
        have = set(zip(cached.column("image_uri").to_pylist(), cached.column("size").to_pylist()))
        todo = want.filter(pa.array([(u, s) not in have for u, s in zip(
            want.column("image_uri").to_pylist(), want.column("size").to_pylist())]))
    else:
        todo = want
    info = {"cache": f"{cache_uri.rstrip('/')}/{key}.parquet" if cache_uri else None,
            "embedded": todo.num_rows, "from_cache": want.num_rows - todo.num_rows}
    if todo.num_rows:
        t0 = time.monotonic()
        new = run_stages(todo, data_uri, settings, flip_tta, log)
        sizes = dict(zip(todo.column("image_uri").to_pylist(), todo.column("size").to_pylist()))
        new = new.append_column("size", pa.array([sizes[u] for u in new.column("image_uri").to_pylist()],
                                                 pa.int64())).cast(CACHE_SCHEMA)
        info["embed_seconds"] = round(time.monotonic() - t0, 1)
        log(f"embedded {todo.num_rows} photos in {info['embed_seconds']} s")
        if cached is not None:
            uris = pa.array(sorted(set(new.column("image_uri").to_pylist())), pa.string())
            cached = pa.concat_tables([cached.filter(pc.invert(pc.is_in(cached.column("image_uri"), uris))), new])
        else:
            cached = new
        if cache_file:
            fs.create_dir(os.path.dirname(cache_file) if not storage.is_s3(cache_uri) else cpath, recursive=True)
            with fs.open_output_stream(cache_file) as f:
                pq.write_table(cached, f)
    else:
        log(f"all {want.num_rows} photos found in the embedding cache {info['cache']}")
    idx = {(u, s): i for i, (u, s) in enumerate(zip(cached.column("image_uri").to_pylist(),
                                                     cached.column("size").to_pylist()))}
    order = [idx[(u, s)] for u, s in zip(want.column("image_uri").to_pylist(), want.column("size").to_pylist())]
    return cached.take(pa.array(order, pa.int64())), info
