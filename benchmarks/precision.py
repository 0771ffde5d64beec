"""Precision of the face networks: speed per core and accuracy, fp32 vs bf16 (vs fp16), one run.

    .venv/bin/python benchmarks/precision.py [--precisions fp32,bf16,fp16] [--repeats 7]

Same real chips for every precision, same process: the LFW pair photos and the attribute
photos cut by the pipeline (YuNet, 128 px ``DLIB_CHIP`` chips; ``lfw_pairs.load_pairs``,
``attributes.load_sets``).

* Speed: faces/s on one thread (= per core) at batch 1, 8 (the CPU plan's 8 photos per call,
  portraits) and 32 (faces per forward), for each network on its own
  (identity: 128 → 150 resize + ResNet; age, gender, emotion: resampling + network, the
  code paths of ``Embedder`` and ``AttributeNets``) and for the whole face path (all four).
  The precisions are interleaved pass by pass, so each sees the same load on a shared
  machine; the best pass is the figure, the median is shown next to it.
* Accuracy: LFW 10-fold verification (``lfw_pairs``' protocol), gender accuracy, age MAE
  and emotion accuracy (``attributes``' sets), and the parity to fp32 (embedding cosine,
  age difference, labels that change).  A precision is fit to be the default when no
  figure is worse than fp32's by more than 0.2 points (0.2 years of age MAE); the output
  also says whether every figure is within ±0.2 (one FER2013 face is 0.25 points, one LFW
  pair 0.08, one UTKFace face 0.16).
* Per photo: what a CPU scoring actor (``stages.FaceStage``) does, without Ray: decode →
  detect → crop (``photos.analyse_photo``) → ``predict.FaceModels`` (identity + age, gender,
  emotion) on every face, 8 photos per call (the CPU plan's ``crop_batch``), 1 thread; on
  LFW portraits and WIDER group photos.  The crop half is the same code for every precision.
* Layouts (identity network): channels_last vs NCHW, weights cast at load vs
  ``torch.autocast``, as the pipeline does it.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attributes import load_sets, scores  # noqa: E402
from benchmarks.common import group_photos, header, portraits  # noqa: E402
from benchmarks.lfw_pairs import load_pairs  # noqa: E402
from pipeline.attributes import AttributeNets  # noqa: E402
from pipeline.embed import Embedder  # noqa: E402
from pipeline.faces import FaceDetector  # noqa: E402
from pipeline.photos import analyse_photo  # noqa: E402
from pipeline.precision import choose, cpu_bf16_features  # noqa: E402
from pipeline.predict import FaceModels  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

NETWORKS = ("identity", "age", "gender", "emotion")
TOLERANCE = 0.2   # points (percent) or years of age MAE


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} cores"


def network_fns(emb: Embedder, nets: AttributeNets) -> dict[str, callable]:
    """Each network alone on a batch of chips, through its class's own batch code."""
    fns = {"identity": emb._batch}
    for task in nets.nets:
        sub = copy.copy(nets)
        sub.nets = {task: nets.nets[task]}
        fns[task] = sub._batch
    fns["face path"] = lambda c: (emb._batch(c), nets._batch(c))
    return fns


def timed(fn, chips: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(chips), batch):
        fn(chips[i:i + batch])
    return time.perf_counter() - t0


def speed(models: dict[str, tuple[Embedder, AttributeNets]], chips: np.ndarray, repeats: int) -> None:
    fns = {p: network_fns(*m) for p, m in models.items()}
    names = [*NETWORKS, "face path"]
    precisions = list(models)
    for batch in (1, 8, 32):
        for p in precisions:          # warm-up (oneDNN primitive creation)
            for n in names:
                timed(fns[p][n], chips[:max(batch, 2)], batch)
        t = {(n, p): [] for n in names for p in precisions}
        for _ in range(repeats):
            for n in names:
                for p in precisions:
                    t[n, p].append(timed(fns[p][n], chips, batch))
        print(f"\nbatch {batch}: faces/s on 1 thread, best of {repeats} interleaved passes of {len(chips)} faces "
              f"(median in brackets); ×: vs fp32 (best)")
        print(f"{'network':<11}" + "".join(f"{p:>26}" for p in precisions))
        for n in names:
            best = {p: len(chips) / min(t[n, p]) for p in precisions}
            med = {p: len(chips) / float(np.median(t[n, p])) for p in precisions}
            cells = [f"{best[p]:8.1f} ({med[p]:6.1f})" + (f" {best[p] / best['fp32']:4.2f}×" if p != "fp32" else "      ")
                     for p in precisions]
            print(f"{n:<11}" + "".join(f"{c:>26}" for c in cells))
        if "fp32" in precisions:
            total = {p: sum(min(t[n, p]) for n in NETWORKS) / len(chips) * 1e3 for p in precisions}
            print("sum of the four networks, ms/face: " + ", ".join(
                f"{p} {total[p]:.2f}" + (f" ({total['fp32'] / total[p]:.2f}× fp32)" if p != "fp32" else "")
                for p in precisions))
        print(f"({load()})")


def per_photo(precisions: list[str], n_portraits: int, n_groups: int, repeats: int) -> None:
    import cv2

    cv2.setNumThreads(1)      # as CropStage: one core per actor
    settings = Settings()
    detector = FaceDetector.from_settings(settings)
    models = {p: FaceModels(settings.model_copy(update={"precision": p})) for p in precisions}
    sets = {"LFW portraits": [f.read_bytes() for f in portraits(n_portraits)],
            "WIDER group photos": [f.read_bytes() for f in group_photos()[:n_groups]]}

    def run(photos: list[bytes], fm: FaceModels) -> int:
        faces = 0
        for i in range(0, len(photos), 8):     # one actor call: crop 8 photos, then one face-path pass
            chips = [analyse_photo(b, detector, settings.max_pixels).chips for b in photos[i:i + 8]]
            chips = np.concatenate(chips)
            if len(chips):
                fm(chips, np.zeros(len(chips), np.int64))
            faces += len(chips)
        return faces

    print(f"\nper photo, 1 thread: decode → detect → crop → identity + age/gender/emotion, 8 photos per call; "
          f"best of {repeats} interleaved passes (median in brackets)")
    for name, photos in sets.items():
        faces = run(photos[:8], models[precisions[0]])
        for fm in models.values():
            run(photos[:8], fm)
        t = {p: [] for p in precisions}
        for _ in range(repeats):
            for p in precisions:
                t0 = time.perf_counter()
                faces = run(photos, models[p])
                t[p].append(time.perf_counter() - t0)
        best = {p: 1e3 * min(t[p]) / len(photos) for p in precisions}
        print(f"  {name} ({len(photos)} photos, {faces} faces): " + ", ".join(
            f"{p} {best[p]:.1f} ms/photo ({1e3 * float(np.median(t[p])) / len(photos):.1f})"
            + (f" {best['fp32'] / best[p]:.2f}×" if p != "fp32" else "") for p in precisions))
    print(f"({load()})")


def layouts(emb: Embedder, chips: np.ndarray, repeats: int) -> None:
    """Identity network, bf16 four ways and fp32 two ways: memory format × how bf16 is applied."""
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(emb.net_input, emb.net_input), mode="bilinear", align_corners=False)
    base = emb.model.float()
    cl, nchw = base.to(memory_format=torch.channels_last), copy.deepcopy(base).to(memory_format=torch.contiguous_format)
    cl16, nchw16 = copy.deepcopy(cl).to(torch.bfloat16), copy.deepcopy(nchw).to(torch.bfloat16)
    fmt = {True: torch.channels_last, False: torch.contiguous_format}

    def run(model, channels_last: bool, how: str):
        def f(c: torch.Tensor) -> None:
            c = c.contiguous(memory_format=fmt[channels_last])
            with torch.inference_mode():
                if how == "autocast":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        model(c)
                else:
                    model(c.to(torch.bfloat16) if how == "cast" else c)
        return f

    variants = {"fp32 channels_last": run(cl, True, "fp32"), "fp32 NCHW": run(nchw, False, "fp32"),
                "bf16 autocast, channels_last": run(cl, True, "autocast"),
                "bf16 autocast, NCHW": run(nchw, False, "autocast"),
                "bf16 weights cast, channels_last": run(cl16, True, "cast"),
                "bf16 weights cast, NCHW": run(nchw16, False, "cast")}
    print(f"\nidentity network alone (after the resize), ms/face, 1 thread, best of {repeats}:")
    print(f"{'variant':<34}{'batch 1':>9}{'batch 32':>10}")
    res = {}
    for batch in (1, 32):
        for f in variants.values():
            timed(f, x[:2], batch)
        t = {v: [] for v in variants}
        for _ in range(repeats):
            for v, f in variants.items():
                t[v].append(timed(f, x, batch))
        for v in variants:
            res[v, batch] = min(t[v]) / len(x) * 1e3
    for v in variants:
        print(f"{v:<34}{res[v, 1]:>9.2f}{res[v, 32]:>10.2f}")
    print(f"({load()})")


def accuracy(models: dict[str, tuple[Embedder, AttributeNets]], lfw, sets) -> None:
    print(f"\naccuracy: LFW {len(lfw.rows)} pairs 10-fold ({len(lfw.chips)} chips); UTKFace {len(sets.utk)} faces "
          f"(gender, age), FER2013 {len(sets.fer)} faces (emotion)")
    print(f"{'precision':<10}{'LFW acc.':>17}{'cos to fp32 min / median':>27}{'gender':>9}{'age MAE':>9}"
          f"{'emotion':>9}{'  age Δ max, labels changed':>29}  verdict")
    ref: dict[str, object] = {}
    for p, (emb, nets) in models.items():
        t0 = time.perf_counter()
        vecs = emb(lfw.chips)
        t_emb = time.perf_counter() - t0
        accs, _ = lfw.accuracy(vecs)
        s = scores(nets, sets.utk, sets.fer)
        figures = {"lfw": 100 * accs.mean(), "gender": 100 * np.mean(s["gender"] == sets.gender),
                   "age": float(np.abs(s["age"] - sets.age).mean()), "emotion": 100 * np.mean(s["emotion"] == sets.emotion)}
        if not ref:
            ref = {"vecs": vecs, "s": s, "figures": figures}
        cos = (vecs * ref["vecs"]).sum(1)
        changed = int(np.sum(s["gender"] != ref["s"]["gender"]) + np.sum(s["emotion"] != ref["s"]["emotion"]))
        age_d = float(np.abs(s["age"] - ref["s"]["age"]).max())
        delta = {k: figures[k] - ref["figures"][k] for k in figures}
        worse = {k: -d if k != "age" else d for k, d in delta.items()}     # > 0: worse than fp32
        no_loss = all(w <= TOLERANCE + 1e-9 for w in worse.values())
        within = all(abs(d) <= TOLERANCE + 1e-9 for d in delta.values())
        print(f"{p:<10}{figures['lfw']:>9.2f} ± {100 * accs.std():.2f}%{cos.min():>15.6f} / {np.median(cos):.6f}"
              f"{figures['gender']:>8.1f}%{figures['age']:>9.2f}{figures['emotion']:>8.1f}%"
              f"{age_d:>14.2f} y, {changed:>4}     "
              f"{'reference' if p == list(models)[0] else verdict(no_loss, within, delta)}"
              f"   (LFW embed {t_emb:.1f} s)")


def verdict(no_loss: bool, within: bool, delta: dict[str, float]) -> str:
    moved = ", ".join(f"{k} {d:+.2f}" for k, d in delta.items())
    return (("accuracy: no loss > 0.2" if no_loss else "accuracy: LOSS > 0.2, not the default")
            + ("; all within ±0.2" if within else "; not all within ±0.2") + f" (Δ {moved})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default="fp32,bf16,fp16", help="comma-separated; fp32 first (the reference)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--faces", type=int, default=32, help="faces per timed pass")
    ap.add_argument("--portraits", type=int, default=120, help="LFW portraits for the per-photo figure")
    ap.add_argument("--groups", type=int, default=40, help="WIDER group photos for the per-photo figure")
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if precisions[0] != "fp32":
        sys.exit("--precisions must start with fp32 (the reference)")

    header("face networks' precision: speed per core and accuracy")
    auto = choose("auto", "cpu")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{'/'.join(cpu_bf16_features()) or 'none'} → auto = {auto.describe()}")
    print(f"start: {load()}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lfw, sets = load_pairs(), load_sets()
    print(f"chips cut in {time.perf_counter() - t0:.0f} s")
    models = {p: (Embedder(device="cpu", threads=1, precision=p), AttributeNets(device="cpu", threads=1, precision=p))
              for p in precisions}
    for p, (emb, nets) in models.items():
        print(f"  {p}: embedder {emb.precision.describe()}, attributes {nets.precision.describe()}")

    rng = np.random.default_rng(0)
    chips = np.ascontiguousarray(lfw.chips[rng.choice(len(lfw.chips), args.faces, replace=False)])
    speed(models, chips, args.repeats)
    per_photo(precisions, args.portraits, args.groups, max(3, args.repeats // 2))
    layouts(Embedder(device="cpu", threads=1), chips, args.repeats)
    accuracy(models, lfw, sets)
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
