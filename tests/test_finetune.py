"""``--finetune``: on real photos, a real local Ray (2 Train workers) and real weights.

The tuned bundle (conftest ``tuned_bundle``: 5 people × 14 photos, ``--finetune last``)
changes the backbone's last stage only, carries it (its hash in ``model_version``), and
the scoring job labels faces with it; 1 and 2 workers agree; a killed worker resumes;
misuse is a usage error.  The endpoint's parity with it is in test_serve.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

pytestmark = pytest.mark.slow


def _backbones(bundle_dir):
    from pipeline.backbone import LAST_STAGE, load_backbone

    base = load_backbone()[0].state_dict()
    tuned = torch.load(io.BytesIO((bundle_dir / "backbone.pt").read_bytes()), weights_only=True)
    return base, tuned, LAST_STAGE


def test_last_stage_changes_and_the_bundle_carries_it(tuned_bundle, tmp_path):
    from pipeline.contract import ModelFileError
    from pipeline.heads import ModelBundle

    out, metrics, stdout, _, _ = tuned_bundle
    base, tuned, last = _backbones(out)
    assert set(base) == set(tuned)
    frozen = [k for k in base if k.startswith("stem.") or (k.startswith("blocks.") and int(k.split(".")[1]) < last)]
    trained = [k for k in base if k.startswith("fc.") or (k.startswith("blocks.") and int(k.split(".")[1]) >= last)]
    assert frozen and trained
    assert all(torch.equal(base[k], tuned[k]) for k in frozen)          # last: the trunk untouched
    changed = [k for k in trained if not torch.equal(base[k], tuned[k])]
    assert len(changed) == len(trained), set(trained) - set(changed)
    meta = json.loads((out / "model.json").read_text())
    assert meta["finetune"]["mode"] == "last"
    assert meta["finetune"]["weights_sha256"] == hashlib.sha256((out / "backbone.pt").read_bytes()).hexdigest()
    ft = metrics["finetune"]
    print("METRIC finetune:", {k: v for k, v in ft.items() if k != "history"}, "test", metrics["test"])
    assert 1 <= ft["epochs_run"] <= 3 and ft["best_epoch"] < ft["epochs_run"] and ft["frozen_test"]
    assert metrics["test"]["identity"]["accuracy"] >= 0.8, metrics["test"]
    assert "fine-tuned (last)" in stdout
    # the backbone is part of the bundle: swap it for the base weights and the bundle refuses to load
    bundle = ModelBundle.load(str(out))
    assert bundle.tuned_backbone is not None and bundle.model_version == meta["model_version"]
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    buf = io.BytesIO()
    torch.save(base, buf)
    (forged / "backbone.pt").write_bytes(buf.getvalue())
    with pytest.raises(ModelFileError, match="backbone.pt changed"):
        ModelBundle.load(str(forged))


def test_scoring_labels_with_the_tuned_backbone(tuned_bundle, people, tmp_path):
    """score_directory.py with the bundle: each face's label and score are the heads' on the
    tuned backbone's embedding of its chip, not on the table's (base) embedding."""
    from conftest import FINETUNE_PER
    from jobs.score_directory import main
    from pipeline.faces import FaceDetector
    from pipeline.heads import ModelBundle
    from pipeline.photos import analyse_photo
    from pipeline.settings import Settings

    out, _, _, _, _ = tuned_bundle
    photos = tmp_path / "photos"
    photos.mkdir()
    held = [f for files in people.values() for f in files[FINETUNE_PER:FINETUNE_PER + 2]]
    for f in held:
        (photos / f.name).symlink_to(f)
    table = tmp_path / "table"
    assert main(["--input", str(photos), "--output", str(table), "--model", str(out), "--no-attributes"]) == 0
    rows = pads.dataset(str(table), format="parquet").to_table().to_pylist()
    bundle = ModelBundle.load(str(out))
    settings = Settings()
    detector = FaceDetector.from_settings(settings)
    tuned_vs_base, right = [], 0
    for f in held:
        mine = sorted((r for r in rows if r["image_uri"].endswith("/" + f.name)), key=lambda r: r["face_index"])
        faces = analyse_photo(f.read_bytes(), detector, settings.max_pixels, settings.max_bytes)
        chips = np.asarray(faces.chips)
        base = np.asarray([r["embedding"] for r in mine], np.float32)
        ids = np.zeros(len(chips), np.int64)
        want = bundle.predict(bundle.head_embeddings(chips, base, settings.precision), ids)["identity"]
        plain = bundle.predict(base, ids)["identity"]
        assert [r["identity"] for r in mine] == list(want[0]), f.name
        # bf16 on this CPU: another batch composition moves a borderline face's probability by < 0.01
        np.testing.assert_allclose([r["identity_score"] for r in mine], want[1], atol=0.02)
        tuned_vs_base.append(float(np.abs(want[1] - plain[1]).max()))
        right += any(r["identity"] == f.parent.name for r in mine)
    print("METRIC tuned scoring: right", right, "of", len(held), "score change vs base embeddings", tuned_vs_base)
    assert max(tuned_vs_base) > 1e-3   # the table's labels did not come from the base embeddings
    assert right >= 0.8 * len(held)


def test_one_and_two_workers_agree(tuned_bundle, tmp_path):
    from pipeline.training.config import TrainConfig
    from pipeline.training.run import train

    _, two, _, data, cache = tuned_bundle
    one = train(str(data), str(tmp_path / "one"), "folders", None,
                TrainConfig(workers=1, epochs=15, finetune="last", finetune_epochs=3), cache_uri=cache,
                report=False, log=lambda *_: None)
    a, b = one.metrics["test"]["identity"]["accuracy"], two["test"]["identity"]["accuracy"]
    print("METRIC finetune 1 worker", a, "2 workers", b)
    assert one.embed_info["embedded"] == 0 and one.metrics["workers"] == 1
    n = one.metrics["test"]["identity"]["faces"]
    assert n == two["test"]["identity"]["faces"]
    # ~10 test faces, 3 epochs with random augmentation: the two runs may differ by one or two
    assert round(abs(a - b) * n) <= 2


def test_killed_worker_resumes_fine_tuning(tuned_bundle, tmp_path):
    """SIGKILL a Train worker once two fine-tuning checkpoints exist; the run resumes from one."""
    from pipeline.training.config import TrainConfig
    from pipeline.training.run import train
    from train_chaos import kill_a_worker_during

    _, _, _, data, cache = tuned_bundle
    out = tmp_path / "killed"
    cfg = TrainConfig(workers=2, epochs=10, finetune="last", finetune_epochs=8, patience=8, max_failures=2, seed=1)
    outcome, killed = kill_a_worker_during(
        lambda: train(str(data), str(out), "folders", None, cfg, cache_uri=cache, report=False,
                      keep_checkpoints=True, log=lambda *_: None),
        out / "checkpoints", "finetune-*/checkpoint_*", wait_s=300)
    history = outcome.metrics["finetune"]["history"]
    print("METRIC killed fine-tuning worker", killed, [h["resumed_from"] for h in history])
    assert max(h["resumed_from"] for h in history) >= 1
    assert [h["epoch"] for h in history] == list(range(len(history)))   # no epoch lost or repeated


def test_finetune_misuse_is_a_usage_error(ray_cluster, data_dir, tmp_path, capsys):
    from jobs.train_classifier import main

    names = tmp_path / "names.csv"
    names.write_text("person,name\n0,someone\n")
    assert main(["--data", str(tmp_path), "--output", str(tmp_path / "m"), "--layout", "people",
                 "--names", str(names), "--finetune", "last"]) == 2
    err = capsys.readouterr().err.strip()
    assert "people layout" in err and len(err.splitlines()) == 1
    assert main(["--data", str(data_dir / "identities"), "--output", str(tmp_path / "m"), "--finetune", "all",
                 "--features", "age"]) == 2
    assert "--features identity" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--data", "x", "--output", "y", "--finetune", "some"])
    assert exc.value.code == 2
