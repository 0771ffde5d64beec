"""Ray Data stages (callable classes for ``map_batches``): crop on CPU actors, embed and
label on GPU actors where the cluster has GPUs; on CPU-only clusters one actor does both
(``FaceStage``).  Scoring and training both use these: scoring keeps every face (rows of
the prediction table), training only each photo's main face (``main_only``), decided
once in the crop stage where the faces exist.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import table
from pipeline.contract import DECODE_ERROR, READ_ERROR
from pipeline.progress import report_batch
from pipeline.resources import Plan
from pipeline.settings import Settings
from pipeline.storage import read_bytes


class CropStage:
    """Photo manifest rows → one row per photo with its faces and 128 px chips."""

    def __init__(self, filesystem: pafs.FileSystem, settings: Settings, io_threads: int = 8) -> None:
        import cv2

        from pipeline.faces import FaceDetector

        cv2.setNumThreads(1)  # one core per actor: parallelism comes from the actor pool
        self.fs = filesystem
        self.settings = settings
        self.detector = FaceDetector.from_settings(settings)
        self.io = ThreadPoolExecutor(io_threads)  # overlap S3 latency with decoding

    def _read(self, uri: str) -> bytes | Exception:
        try:
            return read_bytes(self.fs, uri)
        except Exception as exc:  # a missing or unreadable object is a row, not a crash
            return exc

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.photos import analyse_photo

        uris = batch.column("image_uri").to_pylist()
        segs = batch.column("segment").to_pylist() if "segment" in batch.schema.names else [None] * len(uris)
        photos = [u for u, s in zip(uris, segs) if s is None]
        rows = []
        if len(photos) < len(uris):
            from pipeline.video import segment_rows

            for i, s in enumerate(segs):
                if s is not None:
                    rows.extend(segment_rows(self.fs, uris[i], s, batch.column("segment_start")[i].as_py(),
                                             batch.column("segment_end")[i].as_py(), self.detector, self.settings))
        for uri, data in zip(photos, self.io.map(self._read, photos)):
            if isinstance(data, Exception):
                rows.append(_row(uri, READ_ERROR, f"{type(data).__name__}: {data}"))
                continue
            try:
                res = analyse_photo(data, self.detector, self.settings.max_pixels, self.settings.max_bytes)
            except Exception as exc:  # never lose a photo to an unforeseen decoder failure
                rows.append(_row(uri, DECODE_ERROR, f"{type(exc).__name__}: {exc}"))
                continue
            rows.append(_row(
                uri, res.status, res.error, res.width, res.height, len(res.faces),
                boxes=[float(v) for f in res.faces for v in f.bbox],
                landmarks=[float(v) for f in res.faces for v in np.ravel(f.landmarks)],
                scores=[float(f.score) for f in res.faces], main_face=res.main,
                chips=np.ascontiguousarray(res.chips).tobytes()))
        return table.photo_table(rows)


def _row(uri: str, status: str, error: str | None = None, width: int | None = None,
         height: int | None = None, face_count: int = 0, boxes: list | None = None,
         landmarks: list | None = None, scores: list | None = None, main_face: int | None = None,
         chips: bytes = b"") -> dict:
    return dict(image_uri=uri, status=status, error=error, width=width, height=height,
                face_count=face_count, boxes=boxes or [], landmarks=landmarks or [],
                scores=scores or [], main_face=main_face, chips=chips)


class EmbedStage:
    """Photo rows with chips → prediction-table rows (embeddings, and labels with a model),
    or with ``main_only`` one row per photo with its main face's embedding (training)."""

    def __init__(self, settings: Settings, model_uri: str | None = None, device_batch: int = 32,
                 flip_tta: bool = False, main_only: bool = False, progress=None,
                 features: tuple[str, ...] = (), chips: bool = False) -> None:
        from pipeline.predict import FaceModels

        # training embeds main faces only: no built-in attributes, no bundle; the attribute
        # networks' features of the main face when ``features`` names some
        self.models = FaceModels(settings, None if main_only else model_uri, device_batch, flip_tta,
                                 attributes=False if main_only else None, features=main_only and bool(features))
        self.main_only = main_only
        self.features = tuple(features)
        self.chips = chips  # main_only: keep the main chip too (fine-tuning trains on it)
        self.progress = progress  # a progress.ProgressBoard handle: finished batches are reported to it

    def __call__(self, photos: pa.Table) -> pa.Table:
        out = self._rows(photos)
        report_batch(self.progress, photos)  # fire and forget, after the batch's work is done
        return out

    def _rows(self, photos: pa.Table) -> pa.Table:
        chips = table.photo_chips(photos, self.models.embedder.spec.geometry.size, self.main_only)
        if self.main_only:
            feats = self.models.attribute_pass(chips)[1] if self.features else {}
            return table.main_face_rows(photos, self.models.embedder(chips), {k: feats[k] for k in self.features},
                                        chips if self.chips else None)
        counts = photos.column("face_count").to_numpy(zero_copy_only=False)
        out = self.models.run(chips, np.repeat(np.arange(len(counts)), counts))
        from pipeline.video import assign_tracks, decide_tracks

        preds = out.predictions
        tracks = assign_tracks(photos, out.embeddings)  # videos: after the embeddings exist; None without videos
        if tracks is not None:  # identities per track, on what the heads read
            preds = decide_tracks(photos, tracks, self.models.bundle, preds, out.head_embeddings, out.features)
        return table.face_rows(photos, out.embeddings, preds, self.models.tasks, self.models.model_version, tracks)


class FaceStage:
    """Crop then embed in one actor, for clusters without GPUs: every core does the whole
    chain, so neither half idles waiting for the other whatever the faces per photo."""

    def __init__(self, filesystem: pafs.FileSystem, settings: Settings, model_uri: str | None = None,
                 device_batch: int = 32, flip_tta: bool = False, main_only: bool = False, progress=None,
                 features: tuple[str, ...] = (), chips: bool = False) -> None:
        self.crop = CropStage(filesystem, settings)
        self.embed = EmbedStage(settings, model_uri, device_batch, flip_tta, main_only, progress, features, chips)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.embed(self.crop(batch))


def face_dataset(manifest: pa.Table, input_uri: str, settings: Settings, plan: Plan,
                 model_uri: str | None = None, flip_tta: bool = False, main_only: bool = False,
                 progress=None, features: tuple[str, ...] = (), chips: bool = False):
    """The Ray Data plan scoring and training share: manifest → crop actors → embed actors
    (or one fused pool without GPUs), as a dataset of prediction-table rows (or, with
    ``main_only``, of ``table.MAIN_FACE_SCHEMA`` rows).  ``progress``: a
    ``progress.ProgressBoard`` handle the embed stage reports each finished batch to.
    ``features`` (with ``main_only``): attribute feature sets added as ``features_<name>``
    columns (``table.main_face_schema``), and with ``chips`` the main chip (``chip``)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.storage import resolve

    DataContext.get_current().execution_options.verbose_progress = False
    chunk = max(1, min(256, -(-manifest.num_rows // (4 * plan.crop_actors))))
    video = "segment" in manifest.schema.names and manifest.column("segment").null_count < manifest.num_rows
    uris = manifest.select(["image_uri", "segment", "segment_start", "segment_end"] if video else ["image_uri"])
    # from_blocks, not from_arrow: the block metadata (rows, bytes, schema) comes from the
    # tables here; from_arrow asks a remote task per block for it, which on a fresh job
    # first waits for a worker process to start (benchmarks/startup.py)
    ds = ray.data.from_blocks([uris.slice(i, chunk) for i in range(0, uris.num_rows, chunk)])
    fs = resolve(input_uri)[0]
    if plan.fused:  # a fixed-size pool: every actor starts (imports torch, loads weights) at once
        return ds.map_batches(
            FaceStage, fn_constructor_args=(fs, settings, model_uri, plan.device_batch, flip_tta, main_only, progress,
                                 tuple(features), chips),
            batch_size=plan.crop_batch, batch_format="pyarrow", num_cpus=plan.crop_cpus,
            compute=ActorPoolStrategy(size=plan.crop_actors))
    ds = ds.map_batches(
        CropStage, fn_constructor_args=(fs, settings),
        batch_size=plan.crop_batch, batch_format="pyarrow", num_cpus=plan.crop_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=plan.crop_actors))
    return ds.map_batches(
        EmbedStage, fn_constructor_args=(settings, model_uri, plan.device_batch, flip_tta, main_only, progress,
                                         tuple(features), chips),
        # with videos, whole crop outputs: a segment's frames stay in one call, so tracks can join them
        batch_size=None if video else plan.embed_batch, batch_format="pyarrow", num_cpus=plan.embed_cpus,
        num_gpus=plan.embed_gpus or None,
        compute=ActorPoolStrategy(min_size=1, max_size=plan.embed_actors))
