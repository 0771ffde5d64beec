"""A prediction table with ``person`` and ``name`` on every face, from the people table and
the labels log; with --model, a frozen-feature bundle's tasks applied to the stored
embeddings (no photo is read again).  Ray tasks, one per part file of the table.

    python jobs/label_table.py --table predictions/ --people people/ --labels labels/ --output labelled/
    python jobs/label_table.py --table predictions/ --model models/family --output labelled/
    python jobs/label_table.py --forget "Ada Lovelace" --labels labels/ --table predictions/ --people people/ --output labelled/
    ray job submit --working-dir . -- python jobs/label_table.py --table s3://… --model s3://… --output s3://…

A face takes its own ``name`` decision, else its person's name (the name most of its
named faces have) unless it is marked ``not`` that name.  The output replaces the previous
one only when the run finished: a run stopped or killed before leaves it readable.

--forget NAME: appends a ``forget`` row to --labels, then in the tables given (--table,
--output: rows kept, those faces' embedding, person and name nulled; --people: those faces
removed) clears every face ever named NAME and every face of its person.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, exit_now, run_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="label_table.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", help="prediction table (folder or s3:// prefix) from score_directory.py")
    p.add_argument("--output", help="folder or s3://bucket/prefix for the labelled table")
    p.add_argument("--people", help="people table from cluster_faces.py (a face takes its person's name)")
    p.add_argument("--labels", help="labels log (folder or s3:// prefix) with the naming decisions")
    p.add_argument("--model", help="frozen-feature model bundle: its tasks on the stored embeddings")
    p.add_argument("--forget", metavar="NAME",
                   help="forget NAME: a forget row in --labels, and its faces cleared in --table, --output, --people")
    add_ray_flags(p)
    args = p.parse_args(argv)
    if args.forget is None and not (args.table and args.output):
        p.error("--table and --output are required (or --forget NAME with --labels)")
    if args.forget is not None and args.model:
        p.error("--forget takes no --model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("label_table", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from pipeline.runtime import init_ray

    if args.forget is not None:
        from pipeline.forgetting import forget

        init_ray(args.ray_address, args.num_cpus, verbose=args.verbose, torch_first=False)
        summary = forget(args.forget, args.labels, args.table, args.people, args.output, author="label_table")
        print("\n".join(["", "== faceray label_table --forget summary", *summary.lines()]))
        return 0
    from pipeline import labelling

    plan = labelling.prepare(args.table, args.output, args.people, args.labels, args.model)  # misuse: before Ray
    init_ray(args.ray_address, args.num_cpus, verbose=args.verbose, torch_first=bool(args.model))
    summary = labelling.run(plan, progress_every=args.progress_every)
    print("\n".join(["", "== faceray label_table summary", *summary.lines()]))
    return 0


if __name__ == "__main__":
    exit_now(main())
