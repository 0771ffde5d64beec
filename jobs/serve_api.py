"""Run the faceray HTTP endpoint from Python (the same app as ``serve run serve/config.yaml``).

    python jobs/serve_api.py --model s3://models/m1 --table s3://predictions/run1 --port 8000

Starts (or joins, with --ray-address / RAY_ADDRESS) Ray, serves on 127.0.0.1 until Ctrl-C
or SIGTERM, then stops the local Ray it started with Serve in it (on a joined cluster: shuts
Serve down, at most 5 s), and exits 130 / 143.  The token comes from FACERAY_API_TOKEN (or --token-env).

On a Ray it starts itself (one node) the one FacePipeline replica answers HTTP on --port
itself (Serve's direct ingress, no proxy hop; serve/ingress.py); on a cluster it joins, or
with --replicas > 1, Serve's proxy answers there.  --ingress picks.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, positive_int, run_job  # noqa: E402

SERVE_SHUTDOWN_S = 5.0  # serve.shutdown on a joined cluster, at most


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve_api.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model bundle (folder or s3:// prefix); without it: faces, no labels")
    p.add_argument("--table", help="prediction table (folder or s3:// prefix) for GET /v1/predictions and POST /v1/search")
    p.add_argument("--people", help="people table from cluster_faces.py for GET /v1/people (and persons in search)")
    p.add_argument("--labels", help="labels log (folder or s3:// prefix) the review page (GET /review) writes; "
                                    "with --table and --people")
    p.add_argument("--table-embeddings", action="store_true", help="also load the table's embeddings")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body cap (413 above)")
    p.add_argument("--replicas", "--faces-replicas", type=int,
                   help="FacePipeline replicas (default: from the cluster, pipeline/resources.py:serve_plan)")
    p.add_argument("--ingress", choices=("auto", "direct", "proxy"), default="auto",
                   help="who answers --port: the replica itself (direct: a Ray started here, one replica) "
                        "or Serve's proxy; auto: direct where it can (default)")
    p.add_argument("--token-env", default="FACERAY_API_TOKEN",
                   help="environment variable holding the bearer token (unset: no token)")
    p.add_argument("--min-face", type=positive_int, help="smallest face side in photo pixels (default 20)")
    p.add_argument("--det-max-side", type=positive_int, help="detect at this max image side (default 640)")
    add_ray_flags(p, progress=False)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("serve_api", lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    from serve import ingress

    local = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
    args.ingress = ingress.choose(args.ingress, local, args.replicas)
    if args.ingress == ingress.DIRECT:  # before ray.serve is imported and Ray starts: both read it
        os.environ.update(ingress.direct_ingress_env(args.port))
    import torch  # noqa: F401  (before ray: pipeline/runtime.py)
    from pipeline.runtime import init_ray, started_local
    from ray import serve  # noqa: I001

    from pipeline import stopping
    from pipeline.settings import Settings
    from serve.app import APP_NAME, build_app

    # the job's flags reach every replica: one Settings, made here, passed to build_app
    settings = Settings.from_env(min_face=args.min_face, det_max_side=args.det_max_side,
                                 api_token=os.environ.get(args.token_env) or None)
    init_ray(args.ray_address, args.num_cpus)
    try:
        return _run(serve, args, settings, APP_NAME, build_app)
    except stopping.Stopped as stop:
        if started_local():  # Serve goes with the local Ray that run_job stops next
            stop.done.append("Serve stopped with the local Ray")
            raise
        # on a cluster: remove the app; Serve's controller can take 30 s and more to go
        # (when its replicas got the same Ctrl-C), so that is bounded
        ok = stopping.bounded(serve.shutdown, SERVE_SHUTDOWN_S)
        stop.done.append("Serve shut down" if ok else f"serve.shutdown did not finish in {SERVE_SHUTDOWN_S:g} s")
        raise


def _run(serve, args: argparse.Namespace, settings, app_name: str, build_app) -> int:  # noqa: ANN001
    from pipeline import stopping

    from serve import ingress

    direct = args.ingress == ingress.DIRECT
    ingress.start(serve, args.host, args.port, args.ingress)
    app = build_app({"model": args.model, "table": args.table, "people": args.people, "labels": args.labels,
                     "table_embeddings": args.table_embeddings,
                     "max_body_bytes": int(args.max_body_mb * 1024 * 1024), "settings": settings,
                     "replicas": args.replicas, "direct_ingress": direct})
    serve.run(app, name=app_name, route_prefix="/")
    if direct:
        ingress.check_direct(app_name, args.host, args.port)
    how = "the replica answers HTTP itself (direct ingress)" if direct else "Serve's proxy"
    print(f"faceray serving on http://{args.host}:{args.port}  (docs: /docs, health: /healthz; {how})", flush=True)
    if args.table and args.people:
        print(f"review page: http://{args.host}:{args.port}/review", flush=True)
    stopping.wait_forever()  # until SIGINT / SIGTERM: run_job exits 130 / 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
