"""The embedded default: what faceray is for, end to end on a local Ray and a local S3.

Starts SeaweedFS on 127.0.0.1, uploads photos (../shared/data's groups, fr_examples,
some LFW portraits and a few non-faces when present; else scikit-image's sample photos;
or --photos DIR), runs the scoring job from s3:// to s3:// (faces, boxes, embeddings, age,
gender, emotion; names too with --model), groups the faces into people with the people
job, prints both summaries and a few rows, copies the contact sheet next to you
(--sheet), keeps a local copy of the photos, table and people (--keep) and prints the
command that opens the review page on them, stops S3.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stage_photos(dest: Path, photos: str | None) -> str:
    """Fill ``dest`` with the demo photos; returns where they came from."""
    import shutil

    from pipeline.settings import Settings

    if photos:
        shutil.copytree(photos, dest, dirs_exist_ok=True)
        return photos
    data = Path(Settings().data_dir)
    if data.is_dir():
        for sub in ("fr_examples", "groups/images/13--Interview", "nonfaces/objects"):
            if (data / sub).is_dir():
                shutil.copytree(data / sub, dest / sub.replace("/", "_"), dirs_exist_ok=True)
        for person in ("George_W_Bush", "Colin_Powell", "Laura_Bush", "Jennifer_Lopez"):  # people to group
            for f in sorted((data / "identities" / person).glob("*.jpg"))[:6]:
                (dest / "portraits").mkdir(exist_ok=True)
                shutil.copy(f, dest / "portraits" / f.name)
        return str(data)
    import cv2
    import skimage.data as samples

    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket"):
        img = getattr(samples, name)()
        img = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        cv2.imwrite(str(dest / f"{name}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return "scikit-image sample photos"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__)
    p.add_argument("--photos", help="a folder of your own photos to score instead")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--model", help="a model bundle from train_classifier.py: faces get names too")
    p.add_argument("--sheet", default="faceray-demo-people.html",
                   help="where to copy the people contact sheet (default ./faceray-demo-people.html)")
    p.add_argument("--keep", default="faceray-demo",
                   help="where to keep the photos, table and people for the review page (default ./faceray-demo)")
    args = p.parse_args(argv)
    if args.photos and not Path(args.photos).is_dir():
        p.error(f"--photos {args.photos}: not a folder")
    from jobs.cli import run_job

    return run_job("demo", lambda: _demo(args))  # Ctrl-C: S3 and Ray stopped, exit 130


def _demo(args: argparse.Namespace) -> int:
    import os

    import pyarrow.dataset as pads

    import torch  # noqa: F401  (before ray: pipeline/runtime.py)
    from pipeline.runtime import init_ray
    from pipeline.people import cluster_table  # noqa: I001
    from pipeline.s3server import LocalS3
    from pipeline.scoring import score

    with tempfile.TemporaryDirectory(prefix="faceray-demo-") as tmp, LocalS3() as s3:
        source = stage_photos(Path(tmp), args.photos)
        s3.create_bucket("faceray-demo")
        n = s3.upload_dir(tmp, "faceray-demo", "photos")
        print(f"local S3 at {s3.endpoint}: uploaded {n} files from {source} to s3://faceray-demo/photos")
        os.environ.update(s3.env)  # the job (and Ray's workers) read the usual AWS variables
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        init_ray(num_cpus=args.num_cpus)
        summary = score("s3://faceray-demo/photos", "s3://faceray-demo/predictions", model_uri=args.model)
        print("\n".join(["", "== faceray demo: faces", *summary.lines()]))
        people = cluster_table("s3://faceray-demo/predictions", "s3://faceray-demo/people")
        print("\n".join(["", "== faceray demo: people", *people.lines()]))
        fs = s3.filesystem()
        t = pads.dataset("faceray-demo/predictions", filesystem=fs, format="parquet").to_table()
        who = pads.dataset("faceray-demo/people", filesystem=fs, format="parquet").to_table()
        keep = [c for c in t.schema.names if c in ("image_uri", "face_index", "age", "gender", "emotion",
                                                    "identity", "identity_score")]
        rows = t.select(keep).join(who, ["image_uri", "face_index"], join_type="left outer").sort_by("image_uri")
        rows = rows.filter(pads.field("face_index").is_valid())
        names = [c for c in ("identity", "identity_score") if c in rows.schema.names]
        cols = ["image_uri", "face_index", "person", "person_size", "age", "gender", "emotion", *names]
        df = rows.select([c for c in cols if c in rows.schema.names]).to_pandas()
        df["image_uri"] = df.image_uri.str.split("/").str[-1]
        print("\nfaces with their person and attributes (largest people first):")
        print(df.sort_values(["person_size", "person"], ascending=[False, True]).head(16).to_string(
            index=False, float_format=lambda v: f"{v:.2f}"))
        with fs.open_input_stream("faceray-demo/people/_people.html") as f:
            Path(args.sheet).write_bytes(f.read())
        print(f"\npeople contact sheet (open it in a browser): {Path(args.sheet).resolve()}")
        kept = keep_for_review(fs, Path(tmp), Path(args.keep).resolve())
    here = Path.cwd()
    rel = lambda p: p.relative_to(here) if p.is_relative_to(here) else p  # noqa: E731
    print(f"\nname the people in a browser (the review page; names go to the labels log {rel(kept / 'labels')}):\n"
          f"  {rel(Path(sys.executable))} {rel(Path(__file__).resolve().parent / 'serve_api.py')} "
          f"--table {rel(kept / 'predictions')} --people {rel(kept / 'people')} "
          f"--labels {rel(kept / 'labels')} --port 8000\n"
          f"  then open http://127.0.0.1:8000/review")
    return 0


def keep_for_review(fs, photos: Path, keep: Path) -> Path:  # noqa: ANN001
    """A local copy of the demo's photos, prediction table and people (their ``image_uri``
    pointing at the copied photos), so the review page can serve them after the demo's S3
    stops.  The labels log under ``keep/labels`` stays across runs: it is keyed by face."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    shutil.copytree(photos, keep / "photos", dirs_exist_ok=True)
    for name in ("predictions", "people"):
        t = pads.dataset(f"faceray-demo/{name}", filesystem=fs, format="parquet").to_table()
        uri = pc.replace_substring_regex(t.column("image_uri"), "^s3://faceray-demo/photos", str(keep / "photos"))
        t = t.set_column(t.schema.get_field_index("image_uri"), "image_uri", uri)
        shutil.rmtree(keep / name, ignore_errors=True)
        (keep / name).mkdir(parents=True)
        pq.write_table(t, keep / name / "part-0.parquet")
    return keep


if __name__ == "__main__":
    sys.exit(main())
