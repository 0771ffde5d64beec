"""Write one XMP sidecar per photo with faces: Metadata Working Group face regions
(``mwg-rs:Regions``) and ``Iptc4xmpExt:PersonInImage``, which digiKam, Lightroom,
darktable and ExifTool read.

    python jobs/export_xmp.py --table predictions/ --output sidecars/ --people people/ --labels labels/
    python jobs/export_xmp.py --table predictions/ --beside --labels labels/     # IMG_1.jpg → IMG_1.jpg.xmp
    ray job submit --working-dir . -- python jobs/export_xmp.py --table s3://… --output s3://…

Sidecars go to ``<OUTPUT>/<path of the photo under its listing root>.xmp``; an existing
sidecar is never touched without --overwrite, and with it faceray's regions and names are
merged in (its other tags stay).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, exit_now, run_job  # noqa: E402


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a detector score is between 0 and 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export_xmp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help="prediction table (folder or s3:// prefix) from score_directory.py")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", help="folder or s3://bucket/prefix for the sidecars")
    where.add_argument("--beside", action="store_true",
                       help="write each sidecar next to its photo (photos in a local folder)")
    p.add_argument("--people", help="people table from cluster_faces.py (a face takes its person's name)")
    p.add_argument("--labels", help="labels log (folder or s3:// prefix) with the naming decisions")
    p.add_argument("--min-score", type=_score, metavar="S", help="leave out faces with a detector score under S")
    p.add_argument("--overwrite", action="store_true",
                   help="merge into existing sidecars (their other tags stay; regions and PersonInImage are replaced)")
    add_ray_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("export_xmp", lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    from pipeline.runtime import init_ray
    from pipeline.xmp.export import export, prepare

    plan = prepare(args.table, None if args.beside else args.output, args.people, args.labels)  # misuse: before Ray
    init_ray(args.ray_address, args.num_cpus, verbose=args.verbose, torch_first=False)
    summary = export(plan, args.min_score, args.overwrite, args.progress_every)
    print("\n".join(["", "== faceray export_xmp summary", *summary.lines()]))
    return 0


if __name__ == "__main__":
    exit_now(main())
