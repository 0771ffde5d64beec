"""Fit classifier heads (identity, attributes, several tasks at once) on face embeddings
with Ray Train DDP, and write a model bundle (model.json, heads.pt, metrics.json,
report.html) to --output.

    python jobs/train_classifier.py --data ../shared/data/identities --output models/people
    python jobs/train_classifier.py --data s3://bucket/utkface --layout utk --task age,gender --output s3://bucket/models/utk
    ray job submit --working-dir . -- python jobs/train_classifier.py --data … --output … --workers 4 --use-gpu
    python jobs/train_classifier.py --layout people --data people/ --names names.csv --output models/family
    python jobs/train_classifier.py --layout labels --data predictions/ --labels labels/ --output models/family

Photos go through the scoring job's crop and embed stages; each photo contributes its
main face, photos without a face are counted and reported.  Embeddings are cached
(--cache) so a retrain with other settings does not re-embed.  --finetune last|all then
trains the network(s) the heads the frozen fit chose read (the identity backbone, an
attribute network, or both) with those heads, on the cached face chips
(pipeline/training/finetune.py); the bundle carries each tuned network, and only when the
tuned model beats the frozen one on validation.  A task a built-in network answers
(emotion, age, gender) starts from that network's output layer and ships the built-in
answer (prefer_builtin) unless the trained head beats it on validation.

--layout people: --data is a cluster_faces.py output and --names a CSV (person,name);
every face of a named person trains the identity task under that name, with the
embeddings of the table it was clustered from (no photo is read again); unnamed people
are the strangers the open-set rule learns to reject.  With --labels L its names are also
appended to the labels log (one row per face).  --layout labels: --data is a prediction
table and --labels a labels log; its named faces train identity, the unnamed ones are the
strangers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or working dir

from jobs.cli import add_ray_flags, positive_int, run_job  # noqa: E402

PEOPLE_TARGET_FRR = 0.03   # people layout: known faces rejected at most, strangers rejected as many as possible


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5), got {value}")
    return value


def _weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"task weight {part!r} is not NAME=NUMBER") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_classifier.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled photos: folder or s3://bucket/prefix "
                                                 "(--layout people: a cluster_faces.py output)")
    p.add_argument("--output", required=True, help="model bundle: folder or s3://bucket/prefix")
    p.add_argument("--layout", choices=("folders", "csv", "utk", "people", "labels"), default="folders",
                   help="folders: <root>/<label>/<img>; csv: <root>/index.csv; utk: UTKFace names; "
                        "people: named people of a cluster_faces.py output (with --names); "
                        "labels: the named faces of a labels log (--labels) in a prediction table (--data)")
    p.add_argument("--names", help="--layout people: CSV (local or s3://) with columns person,name")
    p.add_argument("--labels", help="labels log (folder or s3://): --layout labels trains from its named faces; "
                                    "--layout people appends the --names to it")
    p.add_argument("--task", help="folders: the task's name (default identity); csv/utk: tasks to train, "
                                  "comma-separated (default all)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (the cluster must have them)")
    p.add_argument("--epochs", type=positive_int, default=60, help="maximum epochs (early stopping on validation)")
    p.add_argument("--patience", type=positive_int, default=8, help="epochs without validation gain before stopping")
    p.add_argument("--head", choices=("auto", "linear", "mlp"), default="auto",
                   help="head type; auto trains both in one run and keeps the better per task on validation")
    p.add_argument("--features", default="auto", metavar="auto|identity|age,gender,…",
                   help="what the heads read: auto (default) trains each head on the identity embedding "
                        "and on each attribute network's penultimate features (age, gender, emotion) and "
                        "keeps the best per task on validation; identity: the embedding only; or a "
                        "comma-separated list. Open-set (identity-like) tasks always read the embedding")
    p.add_argument("--hidden", type=positive_int, default=256, help="MLP hidden width")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-frac", type=_fraction, default=0.15, help="validation share (stratified)")
    p.add_argument("--test-frac", type=_fraction, default=0.15, help="test share (stratified)")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    p.add_argument("--task-weights", type=_weights, default={}, help="loss weight per task, e.g. age=0.5,gender=1")
    p.add_argument("--open-set", help="tasks with 'unknown' rejection, comma-separated "
                                      "(default: identity-like names: identity, person, name); 'none' for none")
    p.add_argument("--target-frr", type=float, default=None,
                   help="share of known validation faces the open-set rule may reject (default 0.02; "
                        f"{PEOPLE_TARGET_FRR} with --layout people, where strangers set the thresholds)")
    p.add_argument("--unknown", help="faces of people NOT in --data (folder/s3): report how many are rejected")
    p.add_argument("--cache", help="embedding cache folder or s3:// prefix (default ~/.cache/faceray/embeddings)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from a checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep <output>/checkpoints after success")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--finetune", choices=("none", "last", "all"), default="none",
                   help="after a frozen-feature fit, train the network(s) the chosen heads read (identity "
                        "backbone, attribute network) with them (DESIGN.md): last = their last stage, all = all "
                        "of them; the tuned model ships only if it beats the frozen one on validation; "
                        "none (default) = heads on frozen features")
    p.add_argument("--finetune-epochs", type=positive_int, default=10, help="maximum fine-tuning epochs (default 10)")
    p.add_argument("--finetune-lr", type=float, default=1e-4,
                   help="the tuned networks' learning rate (heads: 10×; default 1e-4)")
    add_ray_flags(p)
    args = p.parse_args(argv)
    if args.val_frac + args.test_frac >= 0.8:
        p.error("--val-frac + --test-frac must leave most photos for training")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.stopping import resume_command

    return run_job("train_classifier", lambda: _train(args), resume=resume_command() + (
        f"   (the same command: the fit continues from its last checkpoint under {args.output.rstrip('/')}/checkpoints)"))


def _train(args: argparse.Namespace) -> int:
    from pipeline.runtime import init_ray
    from pipeline.settings import Settings
    from pipeline.training.config import TrainConfig
    from pipeline.training.people import check_flags
    from pipeline.training.run import train

    from pipeline.training import finetune

    check_flags(args.layout, args.names, args.labels)   # before starting Ray: misuse answers at once
    finetune.check_flags(args.finetune, args.layout, args.features)
    settings = Settings()
    open_set = None
    if args.open_set:
        open_set = [] if args.open_set.strip().lower() == "none" else [t.strip() for t in args.open_set.split(",") if t.strip()]
    cfg = TrainConfig(workers=args.workers, use_gpu=args.use_gpu, epochs=args.epochs, patience=args.patience,
                      head=args.head, features=args.features, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
                      val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed,
                      task_weights=args.task_weights, open_set=open_set,
                      target_frr=args.target_frr if args.target_frr is not None
                      else PEOPLE_TARGET_FRR if args.layout in ("people", "labels") else TrainConfig.target_frr,
                      max_failures=args.max_failures, finetune=args.finetune,
                      finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr)
    cache = args.cache or str(Path(settings.cache_dir) / "embeddings")
    from pipeline import progress

    progress.configure(every=args.progress_every)
    init_ray(args.ray_address, args.num_cpus, verbose=args.verbose)
    outcome = train(args.data, args.output, args.layout, args.task, cfg, settings, cache_uri=cache,
                    unknown_uri=args.unknown, report=not args.no_report,
                    keep_checkpoints=args.keep_checkpoints, names_uri=args.names,
                    labels_uri=args.labels)
    print("\n".join(["", "== faceray train_classifier summary", *outcome.lines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
