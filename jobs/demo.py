"""The embedded default: score real photos end to end on a local Ray and a local S3.

Starts SeaweedFS on 127.0.0.1, uploads photos (../shared/data's groups, fr_examples and
a few non-faces when present; else scikit-image's sample photos; or --photos DIR), runs
the scoring job from s3:// to s3://, prints the summary and a few rows, stops S3.
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
    args = p.parse_args(argv)
    if args.photos and not Path(args.photos).is_dir():
        p.error(f"--photos {args.photos}: not a folder")

    import os

    import pyarrow.dataset as pads

    from pipeline.s3server import LocalS3
    from pipeline.runtime import init_ray
    from pipeline.scoring import score

    with tempfile.TemporaryDirectory(prefix="faceray-demo-") as tmp, LocalS3() as s3:
        source = stage_photos(Path(tmp), args.photos)
        s3.create_bucket("faceray-demo")
        n = s3.upload_dir(tmp, "faceray-demo", "photos")
        print(f"local S3 at {s3.endpoint}: uploaded {n} files from {source} to s3://faceray-demo/photos")
        os.environ.update(s3.env)  # the job (and Ray's workers) read the usual AWS variables
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        init_ray(num_cpus=args.num_cpus)
        summary = score("s3://faceray-demo/photos", "s3://faceray-demo/predictions")
        print("\n".join(["", "== faceray demo summary", *summary.lines()]))
        fs = s3.filesystem()
        t = pads.dataset("faceray-demo/predictions", filesystem=fs, format="parquet").to_table(
            columns=["image_uri", "status", "face_count", "face_index", "bbox", "det_score"])
        print("\nfirst rows of the prediction table:")
        print(t.slice(0, 12).to_pandas().to_string(max_colwidth=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
