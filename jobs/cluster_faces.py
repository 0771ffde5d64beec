"""Group every face of a prediction table into people, with no labels: a kNN graph over
the embeddings (faiss, Ray tasks), cut at a threshold from the backbone's own
verification statistics, clustered by Infomap per connected component (Ray tasks).

    python jobs/cluster_faces.py --table s3://bucket/predictions --output s3://bucket/people
    python jobs/cluster_faces.py --table … --output … --resume   # new faces join existing people
    python jobs/cluster_faces.py --table … --output … --labels labels/   # names bind the people (below)
    ray job submit --working-dir . -- python jobs/cluster_faces.py --table … --output …

Output: a Parquet table (image_uri, face_index, person, person_size, similarity, name) plus
_people.json, _people.html (contact sheet of the largest people) and _index/ (the search
index serve_api.py --people loads: pipeline/people/search_index.py) under --output.

--labels (fresh run and --resume alike, pipeline/people/names.py): faces named alike end in
one person; a face marked `not X` never stays in X's person (it goes to the nearest other
person within the threshold, or alone); each person carries the name most of its named
faces have.  Conflict (one cluster holding two names): the cluster is split by name — each
named face goes with its name, each unnamed face with the name whose faces' centre is
nearer — and the name with the most faces keeps the person's id; the summary counts it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, exit_now, positive_int, run_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cluster_faces.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help="prediction table (folder or s3:// prefix) from score_directory.py")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the people table")
    p.add_argument("--resume", action="store_true",
                   help="keep the people already in --output: new faces join them (ids stay) or found new ones")
    p.add_argument("--labels", help="labels log (folder or s3:// prefix): faces named alike end in one person, a face "
                                    "marked `not X` never joins X's person, each person carries its majority name")
    p.add_argument("--sheet-people", type=positive_int, default=40, help="people on the contact sheet (default 40)")
    p.add_argument("--edge-rule", default="fixed", choices=["fixed", "adaptive", "mutual"],
                   help="which kNN pairs become edges (pipeline/people/graph.py; default fixed: cos ≥ the 100:1 "
                        "threshold)")
    p.add_argument("--batch-faces", type=positive_int, default=50_000,
                   help="faces per clustering task (whole connected groups; default 50000): smaller batches spread "
                        "Infomap over more tasks and nodes, each holding less")
    p.add_argument("--search-index", default="fp16", choices=["fp16", "sq8", "none"],
                   help="the search index written to OUTPUT/_index for serve_api.py: fp16 (default; 256 bytes a face, "
                        "recall ≈ exact search), sq8 (128 bytes, recall@10 ≈ 0.95) or none")
    add_ray_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.stopping import resume_command

    return run_job("cluster_faces", lambda: _cluster(args), resume=resume_command())


def _cluster(args: argparse.Namespace) -> int:
    import torch  # noqa: F401  (before ray: pipeline/runtime.py)
    from pipeline.runtime import init_ray
    from pipeline.people import cluster_table  # noqa: I001
    from pipeline.people.spread import check_table

    check_table(args.table)  # a table without embeddings fails before Ray starts (its schema only)
    state = None
    if args.labels:  # names (issue 24): an unreadable log fails before Ray starts too
        from pipeline import labels

        state = labels.load(args.labels)
    from pipeline.progress import Heartbeat

    init_ray(args.ray_address, args.num_cpus, verbose=args.verbose)
    with Heartbeat("cluster_faces", args.progress_every) as beat:  # a line when a phase runs long
        summary = cluster_table(args.table, args.output, resume=args.resume, sheet_people=args.sheet_people,
                                log=beat.log, label_state=state, rule=args.edge_rule, batch_faces=args.batch_faces,
                                search_index=args.search_index)
    print("\n".join(["", "== faceray cluster_faces summary", *summary.lines()]))
    return 0


if __name__ == "__main__":
    exit_now(main())  # no interpreter teardown: it would wait for a thumbnail read still blocked
