"""Built-in network vs frozen heads vs ``--finetune last`` vs ``all`` vs what the trainer
ships, on the same split, seed and test faces.

    python benchmarks/finetune.py [--sets fer20,fer,utk] [--epochs 10] [--workers 2] [--num-cpus N] [--cache DIR]

Sets (../shared/data/attributes): ``fer20`` FER2013 with 20 training photos per class (the
split's test share raised so the rest are test faces), ``fer`` the whole FER2013 set
(15 % validation, 15 % test), ``utk`` UTKFace age and gender.  Each trained through the
training library (``pipeline.training.run.train``, 2 Ray Train workers, ``--features auto``):

* ``built-in`` — the built-in network's own answer (``AttributeNets``) on the test faces;
* ``frozen`` — the heads on frozen features (``prefer_builtin`` off: the trained head
  itself, even where it loses);
* ``last`` / ``all`` — fine-tuned, shipped even where it loses (``keep_tuned``);
* ``shipped`` — the job's defaults with ``--finetune last``: the better of frozen and tuned on
  validation, then the built-in wherever the trained head does not beat it
  (``prefer_builtin``).

Printed per task: the test figure (accuracy with its Wilson 95 % interval, MAE with a
bootstrap 95 % interval) and each model's paired bootstrap 95 % interval of the difference
against the built-in network and against ``shipped`` on the same faces; the goal is that
``shipped`` is never worse than the best of the others beyond the interval.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, header  # noqa: E402

SETS = {  # name: (folder, layout, tasks, val_frac, test_frac, ~training photos per class or None)
    "fer20": ("fer2013", "folders", "emotion", 0.15, 0.52, 20),
    "fer": ("fer2013", "folders", "emotion", 0.15, 0.15, None),
    "utk": ("utkface", "utk", "age,gender", 0.15, 0.15, None),
}
MODELS = ("built-in", "frozen", "last", "all", "shipped")


def per_face(outcome, task: str) -> tuple[list[str], np.ndarray]:
    """(test uris, 1/0 correct per face or the absolute error) of a run's bundle."""
    from pipeline.training.outcome import RegressionResult

    r = outcome.evaluation.test[task]
    if isinstance(r, RegressionResult):
        return r.uris, np.abs(np.asarray(r.pred, float) - np.asarray(r.true, float))
    # the bundle's answer (label), so a prefer_builtin task counts what it ships
    spec = next(s for s in outcome.evaluation.specs if s.name == task)
    true = np.asarray(spec.labels, dtype=object)[r.true]
    return r.uris, (np.asarray(r.label, dtype=object) == true).astype(float)


def builtin_per_face(uris: list[str], outcome, task: str) -> np.ndarray:
    """The built-in network's answer on the same test photos (their main face, cut by the
    scoring stage), scored against the run's labels."""
    from pipeline import storage
    from pipeline.attributes import AttributeNets
    from pipeline.faces import FaceDetector
    from pipeline.photos import analyse_photo
    from pipeline.settings import Settings
    from pipeline.training.outcome import RegressionResult

    settings = Settings()
    detector = FaceDetector.from_settings(settings)
    chips = []
    for u in uris:
        fs, path = storage.resolve(u)
        photo = analyse_photo(storage.read_bytes(fs, u), detector, settings.max_pixels)
        chips.append(photo.chips[photo.main])
    preds = AttributeNets(precision=settings.precision, cache_dir=settings.cache_dir).run(np.stack(chips)).predictions
    r = outcome.evaluation.test[task]
    if isinstance(r, RegressionResult):
        return np.abs(np.asarray(preds[task][0], float) - np.asarray(r.true, float))
    spec = next(s for s in outcome.evaluation.specs if s.name == task)
    true = np.array([spec.labels[i].lower() for i in r.true], dtype=object)
    return (np.asarray(preds[task][0], dtype=object) == true).astype(float)


def main() -> None:
    from pipeline.training.versus import boot_ci, paired_ci, wilson

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="fer20,fer,utk")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (max)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--cache", help="embedding cache folder to reuse (default: a fresh one)")
    args = ap.parse_args()
    header("built-in vs frozen vs --finetune last vs all vs shipped (same split, seed, test faces)")
    from pipeline.runtime import init_ray
    from pipeline.training.config import TrainConfig
    from pipeline.training.run import train

    init_ray(None, args.num_cpus)
    root = data_dir() / "attributes"
    work = Path(tempfile.mkdtemp(prefix="faceray-finetune-"))
    cache = args.cache or str(work / "cache")
    quiet = lambda *_: None  # noqa: E731
    for name in args.sets.split(","):
        folder, layout, tasks, val_frac, test_frac, _ = SETS[name]
        data = root / folder
        runs = {}
        for model in MODELS[1:]:
            cfg = TrainConfig(workers=args.workers, seed=args.seed, val_frac=val_frac, test_frac=test_frac,
                              finetune={"frozen": "none", "shipped": "last"}.get(model, model),
                              finetune_epochs=args.epochs, prefer_builtin=model == "shipped",
                              keep_tuned=model in ("last", "all"))
            out = train(str(data), str(work / f"{name}-{model}"), layout, tasks, cfg, cache_uri=cache,
                        report=False, log=quiet)
            runs[model] = out
            ft = out.metrics.get("finetune") or {}
            split = out.metrics["split"]
            print(f"{name} {model:>7}: train/val/test {split['train']}/{split['val']}/{split['test']}, "
                  f"{out.fit_seconds:.0f} s, heads {out.metrics['features']}"
                  + (f", tuned {ft.get('networks')} {ft.get('epochs_run')} epochs (best {ft.get('best_epoch', -1) + 1}),"
                     f" kept {ft.get('kept')}" if ft else "")
                  + (f", prefer_builtin {out.meta.get('prefer_builtin')}" if out.meta.get("prefer_builtin") else ""),
                  flush=True)
        for task in runs["frozen"].metrics["test"]:
            uris, _ = per_face(runs["frozen"], task)
            faces = {m: per_face(runs[m], task) for m in MODELS[1:]}
            assert all(u == uris for u, _ in faces.values()), "runs differ in their test faces"
            v = {m: f for m, (_, f) in faces.items()}
            v["built-in"] = builtin_per_face(uris, runs["frozen"], task)
            regression = "mae" in runs["frozen"].metrics["test"][task]
            print(f"\n{name} / {task}: {len(uris)} test faces, {'MAE (lower is better)' if regression else 'accuracy'}"
                  f"; Δ = paired bootstrap 95 % of (row − column) on the same faces")
            for m in MODELS:
                lo, hi = boot_ci(v[m]) if regression else wilson(int(v[m].sum()), len(v[m]))
                line = f"  {m:>8}: {v[m].mean():.3f} [{lo:.3f}, {hi:.3f}]"
                for ref in ("built-in", "shipped"):
                    if m != ref:
                        d, dlo, dhi = paired_ci(v[ref], v[m])
                        line += f"   Δ vs {ref} {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                print(line, flush=True)
            best = (min if regression else max)((m for m in MODELS if m != "shipped"), key=lambda m: v[m].mean())
            d, dlo, dhi = paired_ci(v[best], v["shipped"])
            worse = (dlo > 0) if regression else (dhi < 0)
            print(f"  shipped vs the best other ({best}): {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                  f" -> {'WORSE beyond the interval' if worse else 'not worse beyond the interval'}", flush=True)


if __name__ == "__main__":
    main()
