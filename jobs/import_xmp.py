"""Bring face tags already in the photos' XMP into faceray's labels log: regions from
sidecars (IMG_1.jpg.xmp, IMG_1.xmp) or XMP embedded in JPEG, PNG, WebP and HEIC, in
Metadata Working Group (digiKam, Lightroom, darktable, ExifTool) or Microsoft Photo form,
matched to the table's faces (IoU >= 0.5 after EXIF orientation) and appended as `name`
rows (source `xmp`).

    python jobs/import_xmp.py --photos ~/Pictures --table predictions/ --labels labels/
    ray job submit --working-dir . -- python jobs/import_xmp.py --photos s3://… --table s3://… --labels s3://…

Regions with no face in the table go to <labels>/_import_unmatched.parquet with their box.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, exit_now, run_job  # noqa: E402


def _iou(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"an IoU is above 0 and at most 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="import_xmp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", required=True, help="folder or s3:// prefix of the photos (and their sidecars)")
    p.add_argument("--table", required=True, help="prediction table of those photos from score_directory.py")
    p.add_argument("--labels", required=True, help="labels log (folder or s3:// prefix) the names are appended to")
    p.add_argument("--min-iou", type=_iou, default=0.5, help="overlap a region needs with a face (default 0.5)")
    add_ray_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("import_xmp", lambda: _import(args))


def _import(args: argparse.Namespace) -> int:
    from pipeline.runtime import init_ray
    from pipeline.xmp.importing import import_regions, prepare

    plan = prepare(args.photos, args.table, args.labels)  # misuse: before Ray starts
    init_ray(args.ray_address, args.num_cpus, verbose=args.verbose, torch_first=False)
    summary = import_regions(plan, args.min_iou, args.progress_every)
    print("\n".join(["", "== faceray import_xmp summary", *summary.lines()]))
    return 0


if __name__ == "__main__":
    exit_now(main())
