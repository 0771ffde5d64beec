"""The training report: its statistics on their own (fast), then a report built from a real
small identity fit (8 people of the real photos, strangers from the unknown photos, 1 Ray
Train worker, a few epochs) checked for the sections a data scientist needs and for sane
numbers."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.training.report import fit, stats, tasks, write_report
from pipeline.contract import CLASSIFICATION, REGRESSION, UNKNOWN
from pipeline.heads import TaskSpec

# -- statistics, no Ray ------------------------------------------------------------------


def test_wilson_interval_known_values_and_edges():
    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)   # textbook Wilson 95 % for 8/10
    assert stats.wilson(0, 20)[0] == 0.0 and 0 < stats.wilson(0, 20)[1] < 0.2
    assert stats.wilson(20, 20)[1] == 1.0 and 0.8 < stats.wilson(20, 20)[0] < 1.0
    assert all(np.isnan(stats.wilson(0, 0)))


def test_bootstrap_mae_is_seeded_and_contains_the_mae():
    rng = np.random.default_rng(3)
    true = rng.uniform(0, 80, 60)
    pred = true + rng.normal(0, 8, 60)
    mae = float(np.abs(pred - true).mean())
    lo, hi = stats.bootstrap_mae(true, pred)
    assert lo < mae < hi and hi - lo < mae
    assert stats.bootstrap_mae(true, pred) == (lo, hi)


def test_baselines():
    b = stats.classification_baselines(3, np.array([0, 1, 1, 1, 2, -1]), np.array([1, 1, 0, 2]))
    assert b["chance"] == pytest.approx(1 / 3) and b["majority_class"] == 1 and b["majority"] == 0.5
    spec = TaskSpec("age", REGRESSION, mean=30.0, std=10.0)
    assert stats.regression_baseline(spec, np.array([20.0, 40.0]))["mae"] == 10.0


def test_roc_points_run_from_nothing_to_everything_accepted():
    far, tar = stats.roc_points(np.array([0.1, 0.2, np.inf]), np.array([0.3, 0.4, np.inf, np.inf]))
    assert (far[0], tar[0]) == (0.0, 0.0) and (far[-1], tar[-1]) == (1.0, 1.0)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    at = np.searchsorted(far, 0.0, side="right") - 1
    assert tar[at] == pytest.approx(2 / 3)      # both finite known faces before any stranger


def test_validation_rows_pick_each_candidates_best_epoch_and_mark_the_chosen():
    spec = TaskSpec("gender", CLASSIFICATION, labels=["female", "male"])
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1),
                "val_gender@linear_loss": l1, "val_gender@linear_acc": a1,
                "val_gender@mlp+age_loss": l2, "val_gender@mlp+age_acc": a2}
               for e, (l1, a1, l2, a2) in enumerate([(0.6, 0.7, 0.5, 0.8), (0.4, 0.8, 0.55, 0.79),
                                                      (0.45, 0.81, 0.6, 0.7)])]
    rows = fit.validation_rows(spec, history, {"variant": "linear", "best_epoch": 1})
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"linear", "mlp+age"}
    assert by["linear"]["chosen"] and by["linear"]["epoch"] == 1 and by["linear"]["metric"] == 0.8
    assert not by["mlp+age"]["chosen"] and by["mlp+age"]["epoch"] == 0


# -- a report from a real fit --------------------------------------------------------------

PEOPLE, PHOTOS, STRANGERS = 8, 16, 8


@pytest.fixture(scope="module")
def small_identity(ray_cluster, data_dir, tmp_path_factory):
    """A real identity fit on a small subset of the real photos, with strangers, kept in
    process (report=False) so the test renders the report from the TrainOutcome itself."""
    from pipeline.settings import Settings
    from pipeline.training.config import TrainConfig
    from pipeline.training.run import train

    root = tmp_path_factory.mktemp("report")
    people = sorted((d for d in (data_dir / "identities").iterdir() if d.is_dir()),
                    key=lambda d: (-len(list(d.glob("*.jpg"))), d.name))[:PEOPLE]
    for d in people:
        (root / "ids" / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:PHOTOS]:
            (root / "ids" / d.name / f.name).symlink_to(f)
    for d in sorted(d for d in (data_dir / "unknown").iterdir() if d.is_dir())[:STRANGERS]:
        (root / "unknown" / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg")):
            (root / "unknown" / d.name / f.name).symlink_to(f)
    out = root / "bundle"
    outcome = train(str(root / "ids"), str(out), "folders", None,
                    TrainConfig(workers=1, epochs=12, patience=12, val_frac=0.2, test_frac=0.25),
                    cache_uri=str(root / "cache"), unknown_uri=str(root / "unknown"), report=False,
                    log=lambda *_: None)
    uri = write_report(str(out), outcome, Settings(), log=lambda *_: None)
    return outcome, (out / "report.html").read_text(), uri


def _text(page: str) -> str:
    """The page without its embedded images (what a reader reads)."""
    return re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', page)


def test_report_has_validation_baselines_intervals_and_the_open_set(small_identity):
    outcome, page, uri = small_identity
    assert uri.endswith("/report.html")
    text = _text(page)
    for needle in ("tasks at a glance", "validation and head selection", "Head chosen:", "95 % CI",
                   "chance", "majority class", "identity: open set", "known test faces rejected",
                   "strangers accepted as someone", 'alt="learning curves"', 'alt="distance histogram"',
                   'alt="ROC"', 'alt="confusion matrix"', "most confident mistakes",
                   "identity: what the known-rejection budget buys", "(used)"):
        assert needle in text, needle
    # the calibration spends the --target-frr budget on validation (within one face of it)
    c = outcome.metrics["open_set"]["identity"]
    n_val = outcome.metrics["split"]["val"]
    assert c["target_frr"] - 1 / n_val <= c["val_known_reject"] <= c["target_frr"] + 1e-9, (c, n_val)
    assert page.count("data:image/png;base64,") >= 6
    # readable: no raw dicts, no unrounded floats in the text
    assert "{'" not in text and not re.search(r"\d\.\d{5,}", text), re.findall(r"[^>]{0,40}\d\.\d{5,}", text)


def test_report_numbers_are_sane(small_identity):
    outcome, _, _ = small_identity
    ev = outcome.evaluation
    (spec,) = ev.specs
    d = ev.test["identity"]
    rows = fit.validation_rows(spec, ev.history, outcome.metrics["selection"]["identity"])
    assert sum(r["chosen"] for r in rows) == 1 and len(rows) >= 2
    h = tasks.headline(spec, d, ev.train_counts["identity"], rows)
    print("METRIC report small identity:", {k: v for k, v in h.items() if k != "baseline"}, h["baseline"])
    lo, hi = h["accuracy_ci"]
    assert lo <= h["accuracy"] <= hi and hi - lo < 0.5
    lo, hi = h["open_set_accuracy_ci"]
    assert lo <= h["open_set_accuracy"] <= hi
    b = h["baseline"]
    assert b["chance"] == pytest.approx(1 / PEOPLE) and b["majority"] <= 0.3
    assert h["accuracy"] > b["majority_ci"][1] and h["accuracy"] >= 0.9
    assert 0 < h["val_accuracy"] <= 1
    # the open-set picture: the rule's distance reproduces the bundle's answers face by face
    known_acc = np.isfinite(d.dist) & (d.dist <= spec.max_dist)
    assert np.array_equal(known_acc, d.label != UNKNOWN)
    s = ev.strangers["identity"]
    assert len(s.label) > 20 and s.dist is not None and len(s.dist) == len(s.label)
    assert np.array_equal(np.isfinite(s.dist) & (s.dist <= spec.max_dist), s.label != UNKNOWN)
    assert (s.label == UNKNOWN).mean() >= 0.7
    far, tar = stats.roc_points(d.dist, s.dist)
    assert np.trapezoid(tar, far) > 0.8
