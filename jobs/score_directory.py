"""Score every photo under --input: faces, boxes, embeddings (and labels with --model)
into the Parquet prediction table at --output.

    python jobs/score_directory.py --input s3://bucket/photos --output s3://bucket/predictions
    ray job submit --working-dir . -- python jobs/score_directory.py --input … --output …
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, exit_now, positive_int, positive_seconds, run_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="score_directory.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of photos (recursive)")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the Parquet table")
    p.add_argument("--model", help="model bundle (folder or s3:// prefix) from train_classifier.py")
    p.add_argument("--limit", type=positive_int, help="score only the first N photos (sorted by URI)")
    p.add_argument("--resume", action="store_true", help="skip photos already in --output")
    p.add_argument("--video-fps", type=positive_seconds, help="video frames sampled per second (default 1.0)")
    p.add_argument("--video-segment-s", type=positive_seconds,
                   help="seconds of video per task: a long video is split into segments (default 300)")
    p.add_argument("--min-face", type=positive_int, help="smallest face side in photo pixels (default 20)")
    p.add_argument("--det-max-side", type=positive_int, help="detect at this max image side (default 640)")
    p.add_argument("--no-attributes", action="store_true",
                   help="leave out the built-in age, gender and emotion (faster; DESIGN.md columns absent)")
    p.add_argument("--flip-tta", action="store_true", help="average embeddings with the mirrored chip")
    p.add_argument("--crop-actors", type=positive_int,
                   help="CPU actors for decode/detect/crop (default: from the cluster; without GPUs they embed too)")
    p.add_argument("--embed-actors", type=positive_int,
                   help="embedding actors (default: one per GPU; without GPUs, none: the crop actors embed)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="face networks' precision (default auto: bf16 where the CPU/GPU has it natively, "
                        "else fp32 on CPU, fp16 on GPU; env FACERAY_PRECISION)")
    p.add_argument("--device-batch", type=positive_int, help="faces per forward pass (default 256 GPU, 32 CPU)")
    p.add_argument("--file-photos", type=positive_int,
                   help="close (commit) a part file every N photos (default 2000)")
    p.add_argument("--file-seconds", type=positive_seconds,
                   help="… or every S seconds, whichever first (default 30): what a crash can lose")
    add_ray_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command = None if argv is None else " ".join(["score_directory.py", *argv])  # else sys.argv
    from pipeline.stopping import resume_command

    return run_job("score_directory", lambda: _score(args), resume=resume_command("--resume"))


def _score(args: argparse.Namespace) -> int:
    from pipeline.runtime import init_ray
    import ray  # noqa: I001

    from pipeline.resources import plan_resources
    from pipeline.scoring import score
    from pipeline.settings import Settings

    settings = Settings.from_env(min_face=args.min_face, det_max_side=args.det_max_side,
                                 attributes=False if args.no_attributes else None, precision=args.precision,
                                 video_fps=args.video_fps, video_segment_s=args.video_segment_s)
    # the networks run in the actors: the driver loads torch only for a bundle (--model)
    init_ray(args.ray_address, args.num_cpus, verbose=args.verbose, torch_first=bool(args.model))
    plan = plan_resources(ray.cluster_resources(), args.crop_actors, args.embed_actors, args.device_batch,
                          precision=settings.precision)
    from pipeline.parts import FILE_PHOTOS, FILE_SECONDS

    summary = score(args.input, args.output, args.model, args.limit, args.resume, settings, plan,
                    flip_tta=args.flip_tta, file_photos=args.file_photos or FILE_PHOTOS,
                    file_seconds=args.file_seconds or FILE_SECONDS, progress_every=args.progress_every,
                    command=args.command)
    print("\n".join(["", "== faceray score_directory summary", *summary.lines()]))
    return 0


if __name__ == "__main__":
    exit_now(main())  # no interpreter teardown: 1-2 s of a short job's wall time
