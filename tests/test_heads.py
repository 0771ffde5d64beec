"""Fast unit tests of the heads, the bundle, open-set calibration, per-photo assignment,
loss masking, the split and the layout readers (no Ray, no photos decoded)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.datasets import parse_utk_name, read_labelled
from pipeline.heads import (ModelBundle, TaskSpec, assign_exclusive, build_heads, calibrate_open_set,
                            class_centroids)
from pipeline.contract import ModelFileError
from pipeline.training.ddp import task_losses
from pipeline.training.split import stratified_split


def _clusters(k: int = 6, per: int = 40, noise: float = 0.25, seed: int = 0):
    """Unit vectors around k random unit centres (like face embeddings of k people)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, 128))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), per)
    x = c[y] + noise * rng.normal(size=(len(y), 128)) / np.sqrt(128) * 4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y, c


def _trained_bundle(tmp_path, x, y, k, open_set=True):
    """Fit a linear identity head by plain gradient descent and write a bundle."""
    spec = TaskSpec("identity", "classification", [f"p{i}" for i in range(k)], open_set=open_set,
                    exclusive=open_set)
    heads = build_heads([spec])
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(heads["identity"](xt), yt).backward()
        opt.step()
    cents = class_centroids(x, y, k)
    bundle_tmp = ModelBundle({"tasks": [spec.to_json()], "model_version": "x"},
                             {**{f"heads.{n}": p for n, p in heads.state_dict().items()},
                              "centroids.identity": torch.from_numpy(cents)})
    cal = calibrate_open_set(bundle_tmp.raw(x)["identity"], x, y, cents, 0.02)
    spec.min_prob, spec.max_dist = cal.min_prob, cal.max_dist
    ModelBundle.write(str(tmp_path), [spec], heads.state_dict(), {"identity": cents},
                      {"backbone": {"id": "test"}, "created_at": "now"})
    return ModelBundle.load(str(tmp_path)), cal


def test_exclusive_assignment_gives_distinct_labels_per_photo():
    probs = np.array([[0.9, 0.08, 0.02],    # photo 0, face A: best label 0
                      [0.7, 0.25, 0.05],    # photo 0, face B: also 0, less sure → its next label 1
                      [0.8, 0.1, 0.1]],     # photo 1: label 0 again is fine (other photo)
                     np.float32)
    ok = np.ones_like(probs, bool)
    assert assign_exclusive(probs, ok, np.array([0, 0, 1])).tolist() == [0, 1, 0]
    # with an open-set floor of 0.3 B's next label is not acceptable → unknown, not a wrong name
    ok2 = probs >= 0.3
    assert assign_exclusive(probs, ok2, np.array([0, 0, 1])).tolist() == [0, -1, 0]
    # more faces than labels: someone stays unknown, nobody shares a label
    many = np.full((4, 2), 0.5, np.float32)
    out = assign_exclusive(many, np.ones_like(many, bool), np.zeros(4, int))
    assert sorted(out.tolist()) == [-1, -1, 0, 1]


def test_exclusive_assignment_maximises_the_joint_probability():
    # greedy by score would give A→0 (0.6) then B→1 (0.1): joint 0.06; optimal A→1, B→0: 0.4*0.9
    probs = np.array([[0.6, 0.4], [0.9, 0.1]], np.float32)
    assert assign_exclusive(probs, np.ones_like(probs, bool), np.array([7, 7])).tolist() == [1, 0]


def test_bundle_roundtrip_open_set_and_joint_labels(tmp_path):
    x, y, centres = _clusters()
    k = len(centres)
    bundle, cal = _trained_bundle(tmp_path / "m", x, y, k)
    assert bundle.tasks == [("identity", "classification")]
    labels, scores = bundle.predict(x, np.arange(len(x)))["identity"]
    assert labels.dtype == object and scores.dtype == np.float32
    assert (labels == np.array([f"p{i}" for i in y], object)).mean() > 0.95
    assert (labels == "unknown").mean() <= 0.05
    # new people: other random centres → mostly unknown
    xu, _, _ = _clusters(k=5, per=20, seed=99)
    lu, _ = bundle.predict(xu, np.arange(len(xu)))["identity"]
    assert (lu == "unknown").mean() >= 0.9
    # two faces of the same person in one photo: only one gets the name
    two, _ = bundle.predict(np.stack([x[0], x[1]]), np.array([5, 5]))["identity"]
    assert two[0] != two[1] or two[0] == "unknown"
    assert "p0" in two.tolist()


def test_bundle_version_is_a_content_hash_and_tampering_is_refused(tmp_path):
    x, y, centres = _clusters(k=3, per=10)
    b, _ = _trained_bundle(tmp_path / "a", x, y, 3)
    again = ModelBundle.load(str(tmp_path / "a"))
    assert again.model_version == b.model_version and len(b.model_version) == 16
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["tasks"][0]["labels"] == ["p0", "p1", "p2"]
    assert 0 < meta["tasks"][0]["max_dist"] < 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    meta["tasks"][0]["labels"] = ["p0", "p2", "p1"]   # swap names without re-hashing
    (tmp_path / "b" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hash"):
        ModelBundle.load(str(tmp_path / "b"))
    with pytest.raises(ModelFileError, match=str(tmp_path / "nowhere")):
        ModelBundle.load(str(tmp_path / "nowhere"))


def test_regression_head_predicts_in_task_units_with_a_score(tmp_path):
    spec = TaskSpec("age", "regression", mean=40.0, std=10.0)
    heads = build_heads([spec])
    ModelBundle.write(str(tmp_path), [spec], heads.state_dict(), {}, {})
    values, scores = ModelBundle.load(str(tmp_path)).predict(np.eye(128, dtype=np.float32)[:3], np.arange(3))["age"]
    assert values.dtype == np.float32 and np.all(np.abs(values - 40) < 40)
    assert np.all((scores > 0) & (scores <= 1))


def test_missing_labels_do_not_contribute_to_a_task_loss():
    torch.manual_seed(0)
    specs = [TaskSpec("gender", "classification", ["f", "m"]), TaskSpec("age", "regression", mean=30, std=10)]
    heads = build_heads(specs, ["linear"])
    x = torch.nn.functional.normalize(torch.randn(6, 128), dim=1)
    cw = {"gender": torch.ones(2)}

    def grads(ys):
        heads.zero_grad()
        out = {k: h(x) for k, h in heads.items()}
        sum(task_losses(out, ys, specs, ["linear"], cw, 0.2).values()).backward()
        return {n: p.grad.clone() for n, p in heads.named_parameters()}

    full = {"gender": torch.tensor([0, 1, 0, 1, 0, 1]), "age": torch.tensor([20., 30., 40., 50., 60., 70.])}
    # rows 4-5 lose their gender, rows 0-1 their age: the masked rows' values must not matter
    a = {"gender": torch.tensor([0, 1, 0, 1, -1, -1]), "age": torch.tensor([float("nan"), float("nan"), 40., 50., 60., 70.])}
    b = {"gender": torch.tensor([0, 1, 0, 1, -1, -1]), "age": torch.tensor([float("nan"), float("nan"), 40., 50., 60., 70.])}
    ga, gb, gf = grads(a), grads(b), grads(full)
    assert all(torch.isfinite(g).all() for g in ga.values())
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    assert not torch.allclose(ga["gender@linear.1.weight"], gf["gender@linear.1.weight"])
    # a task with no label in the batch gives zero loss, not NaN
    none = {"gender": torch.full((6,), -1), "age": torch.full((6,), float("nan"))}
    out = {k: h(x) for k, h in heads.items()}
    losses = task_losses(out, none, specs, ["linear"], cw, 0.2)
    assert all(float(v.detach()) == 0.0 for v in losses.values())


def test_stratified_split_is_seeded_and_keeps_every_class_in_training():
    strata = [f"c{i % 7}" for i in range(300)] + ["rare"] * 2
    a = stratified_split(strata, 0.15, 0.15, seed=1)
    assert a.tolist() == stratified_split(strata, 0.15, 0.15, seed=1).tolist()
    assert a.tolist() != stratified_split(strata, 0.15, 0.15, seed=2).tolist()
    for c in set(strata):
        assert "train" in a[np.array(strata) == c]
    assert abs((a == "test").mean() - 0.15) < 0.02 and abs((a == "val").mean() - 0.15) < 0.02


def test_utk_names_and_readers(data_dir, tmp_path):
    assert parse_utk_name("26_1_2_20170116174525125.jpg.chip.jpg") == (26.0, "female", "asian")
    assert parse_utk_name("3_0_4_2017.jpg") == (3.0, "male", "others")
    assert parse_utk_name("26_1_20170116174525125.jpg.chip.jpg") is None
    utk = read_labelled(str(data_dir / "attributes" / "utkface"), "utk", "age,gender")
    assert utk.tasks == [("age", "regression"), ("gender", "classification")]
    assert utk.table.num_rows == 608 and utk.label_counts("gender") == {"female": 304, "male": 304}
    ids = read_labelled(str(data_dir / "identities"), "folders")
    assert ids.table.num_rows == 1449 and len(ids.label_counts("identity")) == 42
    # csv: a numeric column is regression, text is classification, empty cells are missing
    src = sorted((data_dir / "attributes" / "utkface").glob("*.jpg"))[:4]
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    rows = ["path,age,mood"] + [f"{f.name},{20 + i}," + ("" if i == 1 else "happy" if i % 2 else "sad")
                                for i, f in enumerate(src)]
    rows[3] = f"{src[2].name},,sad"
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    ls = read_labelled(str(tmp_path), "csv")
    assert ls.tasks == [("age", "regression"), ("mood", "classification")]
    assert ls.table.column("mood").to_pylist() == ["sad", None, "sad", "happy"]
    assert ls.table.column("age").to_pylist()[2] is None
    with pytest.raises(ValueError, match="layout"):
        read_labelled(str(tmp_path), "xml")


def test_heads_on_attribute_features_round_trip_and_need_their_features(tmp_path):
    """A head reading the emotion features: standardised by the training statistics saved
    with it, format_version 2, and a clear error when the features are not given."""
    from pipeline.attributes import FEATURE_DIMS
    from pipeline.heads import feature_stats

    rng = np.random.default_rng(0)
    n, d = 60, FEATURE_DIMS["emotion"]
    y = np.repeat([0, 1], n // 2)
    feats = (rng.normal(size=(n, d)) * 5 + 10).astype(np.float32)
    feats[:, 0] += 20 * y                                   # the label lives in the features only
    emb = rng.normal(size=(n, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    mood = TaskSpec("mood", "classification", ["calm", "cross"], features="emotion")
    age = TaskSpec("age", "regression", mean=30.0, std=10.0)
    heads = build_heads([mood, age], {"mood": ["linear+emotion"], "age": ["linear"]},
                        {"emotion": feature_stats(feats)})
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(heads["mood@linear+emotion"](torch.from_numpy(feats)),
                                          torch.from_numpy(y)).backward()
        opt.step()
    state = {f"{k.split('@')[0]}.{p}": v for k, m in heads.items() for p, v in m.state_dict().items()}
    meta = ModelBundle.write(str(tmp_path), [mood, age], state, {}, {})
    assert meta["format_version"] == 2 and [t["features"] for t in meta["tasks"]] == ["emotion", "identity"]
    bundle = ModelBundle.load(str(tmp_path))
    assert bundle.feature_sets == ["emotion"]
    labels, _ = bundle.predict(emb, np.arange(n), {"emotion": feats})["mood"]
    assert (labels == np.array(["calm", "cross"], object)[y]).mean() > 0.95
    with pytest.raises(ValueError, match="emotion"):
        bundle.predict(emb, np.arange(n))
    with pytest.raises(ValueError, match="expected"):
        bundle.raw(emb, {"emotion": feats[:, :10]})


def test_bundles_without_features_still_load_as_identity_heads(tmp_path):
    """A format 1 bundle (written before heads could read attribute features: no
    ``features`` key) loads and predicts from the embedding alone."""
    from pipeline.heads import content_hash

    x, y, _ = _clusters(k=3, per=10)
    b, _ = _trained_bundle(tmp_path / "a", x, y, 3)
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["tasks"][0]["features"] == "identity"
    for t in meta["tasks"]:
        del t["features"]
    meta["model_version"] = content_hash(meta, (tmp_path / "a" / "heads.pt").read_bytes())
    (tmp_path / "a" / "model.json").write_text(json.dumps(meta))
    old = ModelBundle.load(str(tmp_path / "a"))
    assert old.specs[0].features == "identity" and old.feature_sets == []
    np.testing.assert_array_equal(old.predict(x, np.arange(len(x)))["identity"][0],
                                  b.predict(x, np.arange(len(x)))["identity"][0])


def test_training_variants_are_head_by_features_and_open_set_stays_on_identity():
    from pipeline.contract import UsageError
    from pipeline.training.ddp import MultiHead
    from pipeline.training.split import attribute_features, parse_features, task_variants

    specs = [TaskSpec("identity", "classification", ["a", "b"], open_set=True, exclusive=True),
             TaskSpec("age", "regression")]
    v = task_variants(specs, "auto", "auto")
    assert v["identity"] == ["linear", "mlp"]
    assert v["age"] == ["linear", "mlp", "linear+age", "mlp+age", "linear+gender", "mlp+gender",
                        "linear+emotion", "mlp+emotion"]
    assert task_variants(specs, "linear", "identity") == {"identity": ["linear"], "age": ["linear"]}
    assert attribute_features(task_variants(specs, "mlp", "gender,identity")) == ("gender",)
    with pytest.raises(UsageError, match="unknown features"):
        parse_features("age,nose")
    model = MultiHead(specs, task_variants(specs, "linear", "identity,age"))
    out = model({"identity": torch.zeros(3, 128), "age": torch.zeros(3, 256)})
    assert {k: tuple(o.shape) for k, o in out.items()} == {"identity@linear": (3, 2), "age@linear": (3, 2),
                                                          "age@linear+age": (3, 2)}


@pytest.fixture(scope="module")
def fer_chips(data_dir):
    """Main-face chips of 5 FER2013 photos per emotion and 12 UTKFace photos, made by the pipeline."""
    from pipeline.attributes import EMOTION_LABELS
    from pipeline.faces import FaceDetector, main_face_index
    from pipeline.photos import analyse_photo
    from pipeline.settings import Settings

    root = data_dir / "attributes"
    files = [f for e in EMOTION_LABELS for f in sorted((root / "fer2013" / e).glob("*.jpg"))[:5]]
    files += sorted((root / "utkface").glob("*.jpg"))[::50][:12]
    settings = Settings.from_env()
    detector = FaceDetector.from_settings(settings)
    out = []
    for f in files:
        r = analyse_photo(f.read_bytes(), detector, settings.max_pixels)
        i = main_face_index(r.faces, r.width or 0, r.height or 0)
        if i is not None:
            out.append(r.chips[i])
    return np.stack(out)


def test_a_head_that_matches_a_builtin_network_starts_as_that_network(fer_chips):
    """Before any step, a head whose labels are the emotion network's (another order and
    case), a gender head and an age head answer exactly as the built-in networks do on real
    faces: they start from the networks' own output layers, not from a fresh head."""
    from pipeline.attributes import AttributeNets
    from pipeline.heads import BUILTIN, feature_stats
    from pipeline.training.builtin import builtin_nets, match_task, output_head_state

    out = AttributeNets(device="cpu").run(fer_chips)
    labels = ["Surprise", "Sad", "Neutral", "Happy", "Fear", "Disgust", "Angry"]
    tasks = {"expression": ("classification", labels), "gender": ("classification", ["female", "male"]),
             "age": ("regression", [])}
    specs, state, matches = [], {}, {}
    for name, (kind, labs) in tasks.items():
        m = matches[name] = match_task(name, kind, labs)
        assert m is not None and m.complete, name
        s = TaskSpec(name, kind, labs, head=BUILTIN, features=m.features, mean=30.0, std=15.0)
        specs.append(s)
        st = output_head_state(m, s, *feature_stats(out.features[m.features]), builtin_nets())
        state.update({f"{name}.{k}": v for k, v in st.items()})
    bundle = ModelBundle.in_memory(specs, state, {})
    preds = bundle.predict(np.zeros((len(fer_chips), 128), np.float32), np.arange(len(fer_chips)), out.features)
    builtin_emotion = out.predictions["emotion"][0]
    assert [lab.lower() for lab in preds["expression"][0]] == list(builtin_emotion)
    np.testing.assert_allclose(preds["expression"][1], out.predictions["emotion"][1], atol=1e-4)
    assert list(preds["gender"][0]) == list(out.predictions["gender"][0])
    np.testing.assert_allclose(preds["age"][0], out.predictions["age"][0], atol=0.01)
    assert len(set(builtin_emotion)) >= 4   # real, varied faces


def test_partial_label_matches_are_named():
    from pipeline.training.builtin import match_task

    m = match_task("mood", "classification", ["happy", "other", "sad"])
    assert m is not None and m.network == "emotion" and not m.complete
    assert m.matched == ["happy", "sad"] and m.unmatched == ["other"]
    assert "other" in m.describe() and "2 of 3" in m.describe()
    assert match_task("identity", "classification", ["happy", "sad"], open_set=True) is None
    assert match_task("height", "regression", []) is None
    assert match_task("gender", "classification", ["0", "1"]) is None


def test_open_set_calibration_spends_the_known_rejection_budget():
    """Known validation faces rejected: the budget (--target-frr), not a fraction of it, with
    stand-in strangers or real ones; a larger budget rejects at least as many strangers."""
    from pipeline.heads import budget_curve, calibrate_with_strangers

    x, y, _ = _clusters(k=6, per=60, noise=0.45)
    cents = class_centroids(x, y, 6)
    logits = torch.from_numpy(x @ cents.T * 12)
    probs = torch.softmax(logits, 1).numpy()
    n = len(y)
    for target in (0.02, 0.05, 0.1):
        c = calibrate_open_set(probs, x, y, cents, target)
        assert target - 1.5 / n <= c.val_known_reject <= target + 1e-9, (target, c)
    xs, _, _ = _clusters(k=6, per=30, noise=1.2)   # the same centres, far noisier: strangers that overlap
    s_probs = torch.softmax(torch.from_numpy(xs @ cents.T * 12), 1).numpy()
    c = calibrate_with_strangers(probs, x, y, cents, s_probs, xs, 0.05)
    assert 0.05 - 1.5 / n <= c.val_known_reject <= 0.05 + 1e-9, c
    curve = budget_curve(probs, x, y, cents, s_probs, xs)
    rejected = [r["strangers_rejected"] for r in curve]
    assert rejected[-1] > rejected[0] and 0 < rejected[0] < 1, rejected
    assert all(r["known_rejected"] <= r["budget"] + 1e-9 for r in curve)
