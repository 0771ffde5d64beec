"""The embedding pass of training: main-face embeddings per labelled photo, cached.

Rows are matched to the cache by (image_uri, size), so a retrain with other settings, or
on a grown set, embeds only what is new; the key holds the weights' content hash and
every detector threshold, so other weights under the same file name never reuse rows.
With ``features`` (attribute feature sets some head may read) the pass also runs the
attribute networks on the main chip and the rows carry ``features_<name>`` columns; the key
then names them, so a cache written without them is never read for them.
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


def cache_schema(features: tuple[str, ...] = (), chips: bool = False) -> pa.Schema:
    from pipeline.attributes import FEATURE_DIMS

    return pa.schema([*table.main_face_schema({f: FEATURE_DIMS[f] for f in features}, chips),
                      pa.field("size", pa.int64())])


def backbone_info(settings: Settings) -> dict[str, Any]:
    """Backbone id, weights hash and chip geometry: recorded in the bundle and keying the cache."""
    from pipeline.backbone import DLIB_RESNET, read_weights_bytes

    data, _ = read_weights_bytes(settings.weights)
    geo = DLIB_RESNET.geometry
    return {"id": DLIB_RESNET.id, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "geometry": {"size": geo.size, "net_input": geo.net_input,
                         "template_norm": [list(p) for p in geo.template_norm]}}


def embedding_precision(settings: Settings) -> str:
    """The precision the embedding actors will run at (GPU when the cluster has one)."""
    import ray

    from pipeline.precision import choose

    gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    return choose(settings.precision, "cuda" if gpu else "cpu").name


def cache_key(data_uri: str, settings: Settings, flip_tta: bool, features: tuple[str, ...] = (),
              chips: bool = False) -> str:
    detector = {"det_max_side": settings.det_max_side, "det_score": settings.det_score,
                "det_score_large": settings.det_score_large, "min_face": settings.min_face,
                "model": settings.detector_model}
    key: dict[str, Any] = {"data": data_uri.rstrip("/"), "backbone": backbone_info(settings),
                           "detector": detector, "flip": flip_tta}
    precision = embedding_precision(settings)
    if precision != "fp32":  # fp32 keys stay what they were (their caches stay valid)
        key["precision"] = precision
    if features:  # identity-only keys stay what they were (their caches stay valid)
        from pipeline.attributes import MODEL_FILES

        key["attribute_features"] = {"sets": sorted(features), "models": dict(sorted(MODEL_FILES.items()))}
    if chips:  # fine-tuning's cache also holds the chips (~48 KiB a photo): its own file
        key["chips"] = True
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_stages(manifest: pa.Table, data_uri: str, settings: Settings, flip_tta: bool = False,
               log: Callable[[str], None] = print, features: tuple[str, ...] = (), chips: bool = False) -> pa.Table:
    """The scoring job's stages on Ray Data, main faces only: ``table.main_face_schema`` rows."""
    import ray

    from pipeline import progress
    from pipeline.resources import plan_resources
    from pipeline.stages import face_dataset

    plan = plan_resources(ray.cluster_resources(), precision=settings.precision)
    log(f"embedding {manifest.num_rows} photos: {plan.describe()}")
    with progress.watch("train-embed", progress.new_run_id(), "embedding", manifest.num_rows, log=log) as w:
        ds = face_dataset(manifest, data_uri, settings, plan, flip_tta=flip_tta, main_only=True, progress=w.board,
                          features=features, chips=chips)
        parts = [p for p in ray.get(ds.to_arrow_refs()) if p.num_rows]
    if parts:
        return pa.concat_tables(parts)
    from pipeline.attributes import FEATURE_DIMS

    return table.main_face_schema({f: FEATURE_DIMS[f] for f in features}, chips).empty_table()


def _read_cache(cache_file: str, fs, schema: pa.Schema) -> pa.Table | None:
    """The cached rows, or None (no file, or one without every column asked for)."""
    try:
        with fs.open_input_file(cache_file) as f:
            return pq.read_table(f).select(schema.names).cast(schema)
    except (FileNotFoundError, OSError, KeyError, pa.ArrowInvalid):
        return None


def embed_labelled(manifest: pa.Table, data_uri: str, settings: Settings, cache_uri: str | None,
                   flip_tta: bool = False, log: Callable[[str], None] = print,
                   features: tuple[str, ...] = (), chips: bool = False) -> tuple[pa.Table, dict]:
    """Main-face embeddings (and the ``features_<name>`` columns of ``features``, and with
    ``chips`` the main chip) for every photo of ``manifest`` (manifest order), via the cache."""
    features = tuple(sorted(set(features)))
    schema = cache_schema(features, chips)
    key = cache_key(data_uri, settings, flip_tta, features, chips)
    cached, cache_file, fs = None, None, None
    if cache_uri:
        fs, cpath = storage.resolve(cache_uri)
        cache_file = f"{cpath}/{key}.parquet"
        cached = _read_cache(cache_file, fs, schema)
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
        new = run_stages(todo, data_uri, settings, flip_tta, log, features, chips)
        sizes = dict(zip(todo.column("image_uri").to_pylist(), todo.column("size").to_pylist()))
        new = new.append_column("size", pa.array([sizes[u] for u in new.column("image_uri").to_pylist()],
                                                 pa.int64())).cast(schema)
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
