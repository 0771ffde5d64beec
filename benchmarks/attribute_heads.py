"""Built-in attribute networks vs trained heads on the identity embedding vs trained heads
that may read the attribute networks' penultimate features, on the same test photos.

    python benchmarks/attribute_heads.py [--workers 2] [--seed 0] [--num-cpus N]

UTKFace (age regression + gender, ``--layout utk``) and FER2013 (emotion, ``folders``) of
../shared/data/attributes.  Each set is trained twice through the training library
(``pipeline.training.run.train`` on a local Ray), with the same split and seed:
``features="identity"`` (heads on the 128-d embedding) and ``features="auto"`` (heads on
the embedding and on each network's features, the best per task on validation).  The
built-in networks are scored on the same test photos (the same main face, from the same
crop stage).  Printed: gender accuracy, age MAE, emotion accuracy and per-class F1.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, header  # noqa: E402

SETS = {"utkface": ("utk", "age,gender"), "fer2013": ("folders", "emotion")}


def f1(pred: np.ndarray, true: np.ndarray, labels: list[str]) -> dict[str, float]:
    out = {}
    for label in labels:
        tp = np.sum((pred == label) & (true == label))
        p, r = tp / max(1, np.sum(pred == label)), tp / max(1, np.sum(true == label))
        out[label] = float(2 * p * r / max(p + r, 1e-9))
    return out


def builtin_on(uris: list[str]) -> dict[str, np.ndarray]:
    """The built-in networks' age, gender and emotion for the main face of each photo."""
    from pipeline.attributes import AttributeNets
    from pipeline.faces import FaceDetector
    from pipeline.photos import analyse_photo
    from pipeline.settings import Settings

    settings = Settings()
    detector = FaceDetector.from_settings(settings)
    chips = []
    for u in uris:
        r = analyse_photo(Path(u).read_bytes(), detector, settings.max_pixels, settings.max_bytes)
        chips.append(r.chips[r.main])
    preds = AttributeNets(precision=settings.precision).run(np.stack(chips)).predictions
    return {k: np.asarray(v[0]) for k, v in preds.items()}


@dataclasses.dataclass
class Run:
    features: str
    outcome: object


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()
    header("attribute_heads: built-in networks vs heads on the identity embedding vs heads on attribute features")

    from pipeline.runtime import init_ray
    from pipeline.settings import Settings
    from pipeline.training.config import TrainConfig
    from pipeline.training.run import train

    init_ray(None, args.num_cpus)
    root = data_dir() / "attributes"
    settings = Settings()
    rows: dict[str, dict[str, str]] = {"built-in networks": {}, "heads on identity (features=identity)": {},
                                       "heads, features=auto (chosen on validation)": {}}
    f1_lines: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (layout, tasks) in SETS.items():
            runs = []
            for features in ("identity", "auto"):
                cfg = TrainConfig(workers=args.workers, seed=args.seed, features=features)
                out = train(str(root / name), f"{tmp}/{name}-{features}", layout, tasks, cfg, settings,
                            cache_uri=f"{tmp}/cache", report=False, log=lambda *_: None)
                runs.append(Run(features, out))
            ident, auto = runs
            m_auto = auto.outcome.metrics
            notes.append(f"{name}: split {m_auto['split']}, no face {m_auto['no_face']}; heads chosen: "
                         f"identity run {ident.outcome.metrics['heads']}, auto run {m_auto['heads']}")
            for task in tasks.split(","):
                results = {r.features: r.outcome.evaluation.test[task] for r in runs}
                uris = results["identity"].uris
                assert uris == results["auto"].uris, "the two runs must share the test split"
                builtin = builtin_on(uris)[task]
                spec = next(s for s in ident.outcome.evaluation.specs if s.name == task)
                if spec.kind == "regression":
                    true = results["identity"].true
                    cells = {"built-in networks": np.abs(builtin - true).mean(),
                             "heads on identity (features=identity)": np.abs(results["identity"].pred - true).mean(),
                             "heads, features=auto (chosen on validation)": np.abs(results["auto"].pred - true).mean()}
                    for k, v in cells.items():
                        rows[k][f"{task} MAE (y)"] = f"{v:.2f}"
                else:
                    labels = list(spec.labels)
                    true = np.asarray(labels, object)[results["identity"].true]
                    preds = {"built-in networks": builtin,
                             "heads on identity (features=identity)": np.asarray(labels, object)[results["identity"].pred],
                             "heads, features=auto (chosen on validation)":
                                 np.asarray(labels, object)[results["auto"].pred]}
                    for k, p in preds.items():
                        rows[k][f"{task} acc."] = f"{100 * np.mean(p == true):.1f} %"
                        if task == "emotion":
                            rows[k]["emotion macro-F1"] = f"{np.mean(list(f1(p, true, labels).values())):.2f}"
                            f1_lines.append(f"| {k} | " + " | ".join(f"{v:.2f}" for v in f1(p, true, labels).values())
                                            + " |")
                    if task == "emotion":
                        f1_lines.insert(len(f1_lines) - 3, "| emotion F1 | " + " | ".join(labels) + " |")
                        f1_lines.insert(len(f1_lines) - 3, "|---|" + "---|" * len(labels))
                rows["heads, features=auto (chosen on validation)"][f"{task} features"] = \
                    next(s.features for s in auto.outcome.evaluation.specs if s.name == task)
                n_test = len(results["identity"].true)
                notes.append(f"{task}: {n_test} test faces")
    cols = ["gender acc.", "age MAE (y)", "emotion acc.", "emotion macro-F1"]
    print()
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for k, r in rows.items():
        print(f"| {k} | " + " | ".join(r.get(c, "–") for c in cols) + " |")
    chosen = rows["heads, features=auto (chosen on validation)"]
    print(f"\nfeatures chosen (auto): gender {chosen.get('gender features')}, age {chosen.get('age features')}, "
          f"emotion {chosen.get('emotion features')}")
    print()
    print("\n".join(f1_lines))
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
