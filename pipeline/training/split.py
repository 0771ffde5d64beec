"""Seeded stratified split and target encoding of the usable photos."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.contract import CLASSIFICATION
from pipeline.heads import IDENTITY, TaskSpec, feature_dim, variant_name


def stratified_split(strata: list[str], val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """'train'/'val'/'test' per row; every stratum keeps at least one training row."""
    rng = np.random.default_rng(seed)
    out = np.array(["train"] * len(strata), dtype=object)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    carry_v = carry_t = 0.0  # carry rounding remainders so small strata add up to the fractions
    for s in sorted(groups):
        idx = np.array(groups[s])
        rng.shuffle(idx)
        n = len(idx)
        want_t, want_v = n * test_frac + carry_t, n * val_frac + carry_v
        n_t, n_v = int(round(want_t)), int(round(want_v))
        while n_t + n_v > n - 1 and (n_t or n_v):  # keep one for training
            if n_t >= n_v and n_t:
                n_t -= 1
            else:
                n_v -= 1
        carry_t, carry_v = want_t - n_t, want_v - n_v
        out[idx[:n_t]] = "test"
        out[idx[n_t:n_t + n_v]] = "val"
    return out


def strata_for(table: pa.Table, tasks: list[tuple[str, str]]) -> list[str]:
    """Stratify on the first classification task, else on regression quintiles."""
    cls = [n for n, k in tasks if k == CLASSIFICATION]
    if cls:
        return [str(v) for v in table.column(cls[0]).to_pylist()]
    vals = np.asarray(table.column(tasks[0][0]).to_numpy(zero_copy_only=False), np.float64)
    finite = vals[np.isfinite(vals)]
    edges = np.quantile(finite, [0.2, 0.4, 0.6, 0.8]) if len(finite) else []
    return [("nan" if not np.isfinite(v) else str(int(np.searchsorted(edges, v)))) for v in vals]


@dataclass
class Encoded:
    """Embeddings and per-task targets (-1 / NaN = missing) of the usable rows; ``faces``
    is the face index of each row where it is not the photo's main face (people layout);
    ``features`` the attribute networks' features of the same faces, by name (when some
    head may read them)."""

    x: np.ndarray
    y: dict[str, np.ndarray]
    split: np.ndarray
    uris: list[str]
    faces: np.ndarray | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    chips: np.ndarray | None = None     # N×S×S×3 uint8 main chips (fine-tuning only)
    tuned: dict[str, np.ndarray] = field(default_factory=dict)   # feature sets of tuned attribute networks

    def part(self, name: str) -> "Encoded":
        m = self.split == name
        return Encoded(self.x[m], {k: v[m] for k, v in self.y.items()}, self.split[m],
                       [u for u, keep in zip(self.uris, m) if keep],
                       self.faces[m] if self.faces is not None else None,
                       {k: v[m] for k, v in self.features.items()},
                       self.chips[m] if self.chips is not None else None,
                       {k: v[m] for k, v in self.tuned.items()})

    def head_x(self) -> np.ndarray:
        """The embeddings as a bundle's heads read them: carrying the tuned networks'
        features (``heads.HeadEmbeddings``) when some were tuned; ``features`` stay the base
        networks' (a ``prefer_builtin`` head reads those)."""
        if not self.tuned:
            return self.x
        from pipeline.heads import HeadEmbeddings

        out = np.asarray(self.x, np.float32).view(HeadEmbeddings)
        out.features = dict(self.tuned)
        return out


def parse_features(text: str) -> tuple[str, ...]:
    """``--features``: auto (identity and every attribute network's features), identity, or
    a comma-separated list of identity / age / gender / emotion."""
    from pipeline.attributes import AUTO_FEATURES
    from pipeline.contract import UsageError

    if text.strip().lower() == "auto":
        return (IDENTITY, *AUTO_FEATURES)
    names = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    for n in names:
        try:
            feature_dim(n)
        except ValueError as exc:
            raise UsageError(f"--features: {exc}") from None
    if not names:
        raise UsageError("--features: name at least one of auto, identity, age, gender, emotion")
    return names


def task_variants(specs: list[TaskSpec], head: str, features: str,
                  extra: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The ``head[+features]`` variants trained per task: every head type asked for on every
    feature set asked for; open-set tasks on the identity embedding only (their centroids
    and distances live in identity space); plus ``extra`` per task (a head that starts from
    a built-in network's output layer, ``builtin.py``)."""
    heads = ["linear", "mlp"] if head == "auto" else [head]
    sets = parse_features(features)
    return {s.name: [variant_name(h, f) for f in ((IDENTITY,) if s.open_set else sets) for h in heads]
            + [v for v in (extra or {}).get(s.name, [])] for s in specs}


def attribute_features(variants: dict[str, list[str]]) -> tuple[str, ...]:
    """The attribute feature sets some variant reads (what the embedding pass must compute)."""
    from pipeline.heads import split_variant

    return tuple(sorted({split_variant(v)[1] for vs in variants.values() for v in vs} - {IDENTITY}))


def encode(table: pa.Table, specs: list[TaskSpec]) -> dict[str, np.ndarray]:
    """Class indices (-1: no label) or float targets (NaN: none) per task."""
    y = {}
    for s in specs:
        col = table.column(s.name)
        if s.kind == CLASSIFICATION:
            lut = {lab: i for i, lab in enumerate(s.labels)}
            y[s.name] = np.array([lut.get(v, -1) if v is not None else -1 for v in col.to_pylist()], np.int64)
        else:
            y[s.name] = np.array([np.nan if v is None else v for v in col.to_pylist()], np.float32)
    return y


def make_specs(tasks: list[tuple[str, str]], table: pa.Table, hidden: int,
               open_set: list[str] | None) -> list[TaskSpec]:
    """A TaskSpec per task: labels seen among photos with a face, or the target scaling.

    ``open_set`` None: identity-like task names reject to ``unknown`` (and are exclusive).
    """
    from pipeline.contract import UsageError
    from pipeline.heads import default_open_set, regression_scale

    rejecting = set(open_set) if open_set is not None else {n for n, _ in tasks if default_open_set(n)}
    specs = []
    for name, kind in tasks:
        if kind == CLASSIFICATION:
            labels = sorted({v for v in table.column(name).to_pylist() if v is not None})
            if len(labels) < 2:
                raise UsageError(f"task {name!r} has {len(labels)} label(s) among photos with a face: need ≥ 2")
            specs.append(TaskSpec(name, kind, labels, hidden=hidden, open_set=name in rejecting,
                                  exclusive=name in rejecting))
        else:
            mean, std = regression_scale(np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64))
            specs.append(TaskSpec(name, kind, hidden=hidden, mean=mean, std=std))
    return specs
