"""Classifier heads on the shared face embedding, the model bundle, open-set rejection and
the per-photo joint assignment of identities.

One small torch module holds a head per task (linear or a small MLP).  The bundle is a
folder or S3 prefix with ``model.json`` (everything needed to rebuild and interpret the
heads) and ``heads.pt`` (their state dict).  Loading is cheap (a few hundred KB) and
``ModelBundle.predict`` does not mutate anything, so one bundle serves many threads
(Ray Serve replicas, Ray Data actors).

Prediction rules (documented in the README):

* classification: softmax over the task's labels.  For **open-set** tasks (identities) a
  face is ``unknown`` when its best probability is below ``min_prob`` or its cosine
  distance to that class's centroid (mean training embedding) is above ``max_dist``;
  both thresholds are calibrated on validation data (see :func:`calibrate_open_set`).
  For **exclusive** tasks (identities) the faces of one photo get distinct labels:
  a Hungarian assignment maximises the joint log-probability over the acceptable
  (face, label) pairs; a face that loses its best label gets its next acceptable one, or
  ``unknown``.  The score is the softmax probability of the label given (for ``unknown``:
  of the best label that was rejected).
* input: a head reads the identity embedding (``TaskSpec.features`` "identity", the default)
  or one attribute network's penultimate features ("age", "gender", "emotion": see
  ``pipeline.attributes.FEATURE_DIMS``), standardised by the training features' mean and
  standard deviation (buffers of the head, saved with it).  ``bundle.feature_sets`` says
  which attribute features ``raw``/``predict`` must be given.
* regression: the head predicts a value and the expected absolute error ``b`` (Laplace
  scale); the value is in the task's own units, the score is ``exp(-b / std)`` in (0, 1]
  where ``std`` is the training targets' standard deviation — 1 means "very sure".
* ``builtin`` heads start as a built-in network's own output layer on the features it is
  exactly linear in (``attributes.OUTPUT_FEATURES``; age: its bins and their expectation,
  ``BinsOut``).  A task marked ``prefer_builtin`` lost to that network on validation: its
  head *is* the untouched output layer, so the bundle answers as the network does.
* a fine-tuned bundle runs its own networks (``backbone.pt``, ``<attribute>.pt``):
  ``head_embeddings`` returns what its heads read, the tuned attribute networks' features
  riding on the embeddings (``HeadEmbeddings``); a ``prefer_builtin`` head reads the base
  network's features.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipeline.contract import CLASSIFICATION, EMBEDDING_DIM, REGRESSION, UNKNOWN, ModelFileError

FORMAT_VERSION = 3              # written when a head is a built-in output layer or a network was tuned
READABLE_VERSIONS = (1, 2, 3)   # 1: every head on the identity embedding (no "features" key); 2: heads
                                # on attribute features
IDENTITY = "identity"
IDENTITY_TASK_NAMES = frozenset({"identity", "person", "name"})


@dataclass
class TaskSpec:
    """One task: its kind, labels (classification) or target scaling (regression)."""

    name: str
    kind: str                                   # classification | regression
    labels: list[str] = field(default_factory=list)
    head: str = "linear"                        # linear | mlp
    features: str = IDENTITY                    # identity | age | gender | emotion: the head's input
    hidden: int = 256
    open_set: bool = False                      # reject to "unknown" (identities)
    exclusive: bool = False                     # each label at most once per photo
    mean: float = 0.0                           # regression target scaling
    std: float = 1.0
    min_prob: float = 0.0                       # open-set thresholds (calibrated)
    max_dist: float = 2.0
    prefer_builtin: bool = False                # lost to the built-in network on validation: the head
                                                # is that network's own output layer (its answer)

    @property
    def out_dim(self) -> int:
        return len(self.labels) if self.kind == CLASSIFICATION else 2  # value, log-scale

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.prefer_builtin:
            d.pop("prefer_builtin")     # model.json of every other bundle stays what it was
        if self.kind == REGRESSION:
            for k in ("labels", "open_set", "exclusive", "min_prob", "max_dist"):
                d.pop(k)
        else:
            d.pop("mean"), d.pop("std")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TaskSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        spec = cls(**known)
        if spec.kind not in (CLASSIFICATION, REGRESSION):
            raise ValueError(f"task {spec.name!r} has unknown kind {spec.kind!r}")
        if spec.kind == CLASSIFICATION and not spec.labels:
            raise ValueError(f"classification task {spec.name!r} has no labels")
        feature_dim(spec.features)  # raises for an unknown feature set
        return spec


def default_open_set(name: str) -> bool:
    """Identity-like tasks are open-set and exclusive; attributes (age, emotion) are not."""
    return name.lower() in IDENTITY_TASK_NAMES


def feature_dim(features: str) -> int:
    """Input width of a head reading ``features`` (the identity embedding or an attribute
    network's penultimate features)."""
    from pipeline.attributes import FEATURE_DIMS

    if features == IDENTITY:
        return EMBEDDING_DIM
    if features not in FEATURE_DIMS:
        raise ValueError(f"unknown features {features!r} ({', '.join([IDENTITY, *FEATURE_DIMS])})")
    return FEATURE_DIMS[features]


def split_variant(variant: str) -> tuple[str, str]:
    """``"mlp+age"`` → ("mlp", "age"); ``"linear"`` → ("linear", "identity")."""
    head, _, features = variant.partition("+")
    return head, features or IDENTITY


def variant_name(head: str, features: str) -> str:
    return head if features == IDENTITY else f"{head}+{features}"


class InputScale(nn.Module):
    """Multiply by a fixed factor (no parameters, nothing in the state dict)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class InputNorm(nn.Module):
    """Standardise features by fixed per-dimension mean and std (buffers: saved with the
    head, set from the training features, never trained)."""

    def __init__(self, dim: int, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.zeros(dim) if mean is None else mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.ones(dim) if std is None else std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


BUILTIN = "builtin"    # head type: a built-in network's own output layer (``pipeline/training/builtin.py``)


class BinsOut(nn.Module):
    """Logits over value bins → the regression head's two outputs (standardised value, raw
    Laplace scale), so a head that starts as the age network's output layer answers its
    age (the bins' expectation) and its spread (mean absolute deviation) exactly."""

    def __init__(self, bins: np.ndarray, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("bins", torch.as_tensor(np.asarray(bins, np.float32)), persistent=False)
        self.mean, self.std = float(mean), max(float(std), 1e-6)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(z.float(), dim=1)
        v = p @ self.bins
        b = (p * (self.bins[None, :] - v[:, None]).abs()).sum(1)
        t = (b / self.std - 1e-3).clamp(min=1e-4)
        return torch.stack([(v - self.mean) / self.std, t + torch.log(-torch.expm1(-t))], 1)  # softplus⁻¹


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (floored, so constant dimensions stay finite) of training features."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0) if len(x) else np.zeros(x.shape[1])
    std = x.std(0) if len(x) else np.ones(x.shape[1])
    return mean.astype(np.float32), np.maximum(std, 1e-3 * max(float(std.mean()) if len(x) else 1.0, 1e-6)).astype(np.float32)


Norms = dict[str, tuple[np.ndarray, np.ndarray]]   # features → (mean, std) of the training rows


def make_head(spec: TaskSpec, variant: str | None = None, dropout: float = 0.2,
              norms: Norms | None = None) -> nn.Module:
    """``variant``: ``head[+features]`` (default the spec's own).  Identity embeddings are unit
    vectors with per-dimension values ~1/sqrt(dim): scaled to ~unit variance by a fixed
    factor; attribute features are standardised (``InputNorm``, statistics from ``norms``
    or, for a bundle, from its state dict)."""
    head, features = split_variant(variant) if variant else (spec.head, spec.features)
    dim = feature_dim(features)
    prep: nn.Module = (InputScale(math.sqrt(dim)) if features == IDENTITY
                       else InputNorm(dim, *(norms or {}).get(features, (None, None))))
    if head == "linear" or (head == BUILTIN and spec.kind == CLASSIFICATION):
        return nn.Sequential(prep, nn.Linear(dim, spec.out_dim))
    if head == BUILTIN:   # regression: the age network's bins, their expectation
        from pipeline.attributes import AGE_BINS

        return nn.Sequential(prep, nn.Linear(dim, len(AGE_BINS)), BinsOut(AGE_BINS, spec.mean, spec.std))
    if head == "mlp":
        return nn.Sequential(prep, nn.Linear(dim, spec.hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(spec.hidden, spec.out_dim))
    raise ValueError(f"unknown head type {head!r} (linear or mlp)")


def build_heads(specs: list[TaskSpec], variants: list[str] | dict[str, list[str]] | None = None,
                norms: Norms | None = None) -> nn.ModuleDict:
    """A ModuleDict of heads keyed ``task`` (bundle) or ``task@variant`` (training several);
    ``variants`` the same for every task, or per task name."""
    if variants is None:
        return nn.ModuleDict({s.name: make_head(s) for s in specs})
    per = variants if isinstance(variants, dict) else {s.name: variants for s in specs}
    return nn.ModuleDict({f"{s.name}@{v}": make_head(s, v, norms=norms) for s in specs for v in per[s.name]})


# ---------------------------------------------------------------- open set + assignment


def cosine_distance(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """N×K cosine distances (1 - cos) between unit embeddings and unit centroids."""
    return 1.0 - np.asarray(emb, np.float32) @ np.asarray(centroids, np.float32).T


def class_centroids(emb: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Unit-normalised mean embedding per class (zeros for a class without samples)."""
    c = np.zeros((n_classes, emb.shape[1]), np.float32)
    np.add.at(c, y, emb)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return np.where(norms > 0, c / np.maximum(norms, 1e-12), 0).astype(np.float32)


@dataclass
class OpenSetCalibration:
    min_prob: float
    max_dist: float
    val_known_reject: float       # measured on validation faces of known classes
    est_unknown_reject: float     # leave-one-class-out estimate (impostor distances)


def calibrate_open_set(probs: np.ndarray, emb: np.ndarray, y: np.ndarray, centroids: np.ndarray,
                       target_frr: float = 0.02) -> OpenSetCalibration:
    """Thresholds from validation faces of known people only, spending the budget: at most
    ``target_frr`` of them rejected (exactly that share, but for ties).

    ``min_prob`` drops the least confident known faces (half the budget at most, never
    more than a majority); ``max_dist`` is then the tightest distance that keeps the
    rejected known faces within the budget, by the single-face rule ``decide`` applies
    (the nearest centroid among labels with probability ≥ ``min_prob``).  Why tight: every
    known face the budget allows to be rejected buys strangers rejected; the earlier rule
    (a margin halfway to the stand-in strangers) rejected 0.8 % of known faces against a
    3 % budget.  ``est_unknown_reject``: the stand-in strangers (each face's distance to the
    nearest *other* centroid: how it would look had its class not been trained) rejected.
    """
    y = np.asarray(y)
    n = len(y)
    if n == 0:
        return OpenSetCalibration(0.0, 2.0, 0.0, 0.0)
    d = cosine_distance(emb, centroids)
    other = d.copy()
    other[np.arange(n), y] = np.inf
    impostor = other.min(axis=1)
    top = np.sort(probs.max(axis=1))
    allowed = int(np.floor(target_frr * n + 1e-9))
    # at most half the budget below min_prob: the (allowed // 2)-th lowest probability, so
    # no more faces than that fall under it (a quantile would interpolate above one)
    min_prob = min(float(top[allowed // 2]), 0.5)
    dk = np.sort(_nearest_acceptable(probs, d, min_prob))
    t = float(dk[n - 1 - allowed]) if allowed < n else 0.0
    if not np.isfinite(t):   # min_prob alone spends the budget: keep it, accept every remaining face
        t = float(dk[np.isfinite(dk)].max()) if np.isfinite(dk).any() else 2.0
    rejected = _nearest_acceptable(probs, d, min_prob) > t
    return OpenSetCalibration(min_prob, t, float(rejected.mean()), float((impostor > t).mean()))


@dataclass
class StrangerCalibration(OpenSetCalibration):
    """Thresholds picked against faces of real strangers (``est_unknown_reject`` is then
    measured on them, not estimated)."""

    strangers: int = 0                        # validation stranger faces used
    target_stranger_reject: float = 0.95


def _nearest_acceptable(probs: np.ndarray, dist: np.ndarray, min_prob: float) -> np.ndarray:
    """Per face the smallest centroid distance among labels with probability ≥ min_prob
    (inf when none): the face is accepted iff that is ≤ max_dist (the single-face rule of
    :meth:`ModelBundle.decide`)."""
    return np.where(probs >= min_prob, dist, np.inf).min(axis=1) if probs.shape[1] else np.full(len(probs), np.inf)


def calibrate_with_strangers(probs: np.ndarray, emb: np.ndarray, y: np.ndarray, centroids: np.ndarray,
                             s_probs: np.ndarray, s_emb: np.ndarray, target_frr: float = 0.03,
                             target_stranger_reject: float = 0.95) -> StrangerCalibration:
    """Thresholds that reject at most ``target_frr`` of the known validation faces and, under
    that budget, as many validation strangers (faces of unnamed people) as possible.

    Why not :func:`calibrate_open_set`: its impostors are known faces seen from the wrong
    centroid, a guess at what strangers look like; with real strangers at hand the
    trade-off is measured instead.  For each candidate ``min_prob`` (a grid spending 0 to
    all of the budget on it) the tightest ``max_dist`` within the budget is found exactly
    from the sorted known distances; the pair rejecting most strangers wins (ties: fewer
    known rejected).  No margin beyond that threshold: the budget is spent (the halfway
    margin to the next stranger distance kept known rejections at 0.8 % of a 3 % budget
    while strangers went through).
    """
    d_known = cosine_distance(emb, centroids)
    d_str = cosine_distance(s_emb, centroids)
    n = len(y)
    allowed = int(np.floor(target_frr * n))
    top = probs.max(axis=1)
    grid = {0.0, *np.quantile(top, np.linspace(0, target_frr, 7)).tolist(), 0.3, 0.5, 0.7, 0.9}
    best: tuple | None = None
    for m in sorted(grid):
        dk = np.sort(_nearest_acceptable(probs, d_known, m))
        t = dk[n - 1 - allowed]
        if not np.isfinite(t):
            continue                                   # min_prob alone spends more than the budget
        ds = _nearest_acceptable(s_probs, d_str, m)
        s_rej = float((ds > t).mean()) if len(ds) else 0.0
        k_rej = float((dk > t).mean())
        key = (s_rej, -k_rej, -m)
        if best is None or key > best[0]:
            best = (key, m, float(t))
    if best is None:   # cannot happen with min_prob 0 (every face has a finite distance); be safe
        c = calibrate_open_set(probs, emb, y, centroids, target_frr)
        return StrangerCalibration(c.min_prob, c.max_dist, c.val_known_reject, c.est_unknown_reject,
                                   len(s_emb), target_stranger_reject)
    _, m, t = best
    k_rej = float((_nearest_acceptable(probs, d_known, m) > t).mean()) if n else 0.0
    s_rej = float((_nearest_acceptable(s_probs, d_str, m) > t).mean()) if len(s_emb) else 0.0
    return StrangerCalibration(float(m), float(t), k_rej, s_rej, len(s_emb), target_stranger_reject)


BUDGETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)   # known-rejection budgets the report compares


def budget_curve(probs: np.ndarray, emb: np.ndarray, y: np.ndarray, centroids: np.ndarray,
                 s_probs: np.ndarray | None = None, s_emb: np.ndarray | None = None,
                 budgets: tuple[float, ...] = BUDGETS) -> list[dict[str, float]]:
    """What each known-rejection budget buys on validation: the known faces and strangers
    (real ones when given, else the stand-ins of ``calibrate_open_set``) it rejects."""
    out = []
    for b in budgets:
        if s_emb is not None and len(s_emb):
            c: OpenSetCalibration = calibrate_with_strangers(probs, emb, y, centroids, s_probs, s_emb, b)
        else:
            c = calibrate_open_set(probs, emb, y, centroids, b)
        out.append({"budget": b, "known_rejected": c.val_known_reject, "strangers_rejected": c.est_unknown_reject,
                    "real_strangers": bool(s_emb is not None and len(s_emb))})
    return out


def assign_exclusive(probs: np.ndarray, acceptable: np.ndarray, photo_ids: np.ndarray) -> np.ndarray:
    """Per photo, distinct labels maximising the joint log-probability; -1 = unknown.

    ``acceptable`` (N×K bool) marks pairs that pass the open-set thresholds.  Each face
    may also go to ``unknown``, which costs more than any acceptable label, so a face is
    left unknown only when every acceptable label is taken by a more likely face.
    """
    from scipy.optimize import linear_sum_assignment

    n, k = probs.shape
    out = np.full(n, -1, np.int64)
    if n == 0 or k == 0:
        return out
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    big = 1e6
    unknown_cost = float(-logp[acceptable].min()) + 1.0 if acceptable.any() else 1.0
    order = np.argsort(photo_ids, kind="stable")
    ids = np.asarray(photo_ids)[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(ids)]):
        rows = order[s:e]
        if len(rows) == 1:
            r = rows[0]
            cand = np.where(acceptable[r], logp[r], -np.inf)
            out[r] = int(cand.argmax()) if np.isfinite(cand.max()) else -1
            continue
        cost = np.where(acceptable[rows], -logp[rows], big)
        cost = np.hstack([cost, np.full((len(rows), len(rows)), unknown_cost)])
        r_idx, c_idx = linear_sum_assignment(cost)
        for ri, ci in zip(r_idx, c_idx):
            out[rows[ri]] = int(ci) if ci < k and cost[ri, ci] < big else -1
    return out


# ---------------------------------------------------------------- the bundle


def bundle_state(heads_state: dict[str, Any], centroids: dict[str, np.ndarray]) -> dict[str, Any]:
    """The state dict of ``heads.pt``: ``heads.<task>.<param>`` and ``centroids.<task>``."""
    state = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads_state.items()}
    state.update({f"centroids.{k}": torch.from_numpy(np.ascontiguousarray(v, np.float32))
                  for k, v in centroids.items()})
    return state


def content_hash(meta: dict[str, Any], weights: bytes) -> str:
    """model_version: sha256 over the weights and model.json without volatile fields."""
    stable = {k: v for k, v in meta.items() if k not in ("model_version", "created_at")}
    h = hashlib.sha256(weights)
    h.update(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


class ModelBundle:
    """model.json + heads.pt: everything the scoring job and the endpoint need to label faces."""

    def __init__(self, meta: dict[str, Any], state: dict[str, Any], backbone: bytes | None = None,
                 networks: dict[str, bytes] | None = None) -> None:
        import threading

        import torch

        self.meta = meta
        #: a fine-tuned identity backbone (``backbone.pt``) the heads read instead of the base one
        self.tuned_backbone = backbone
        #: fine-tuned attribute networks (``<attribute>.pt``) whose features the heads read
        self.tuned_networks: dict[str, bytes] = dict(networks or {})
        self._tuned: Any = None
        self._tuned_attrs: Any = None
        self._lock = threading.Lock()
        self.specs = [TaskSpec.from_json(t) for t in meta["tasks"]]
        self.tasks: list[tuple[str, str]] = [(s.name, s.kind) for s in self.specs]
        self.model_version: str = meta["model_version"]
        self.backbone: dict[str, Any] = meta.get("backbone", {})
        heads_state = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
        self._centroids = {k[len("centroids."):]: v.numpy().astype(np.float32)
                           for k, v in state.items() if k.startswith("centroids.")}
        self._heads = build_heads(self.specs)
        self._heads.load_state_dict(heads_state)
        #: attribute features the heads read (``raw``/``predict`` need them), sorted
        self.feature_sets: list[str] = sorted({s.features for s in self.specs} - {IDENTITY})
        self._heads.eval()
        for p in self._heads.parameters():
            p.requires_grad_(False)
        self._torch = torch

    @classmethod
    def in_memory(cls, specs: list[TaskSpec], heads_state: dict[str, Any],
                  centroids: dict[str, np.ndarray], backbone: bytes | None = None,
                  networks: dict[str, bytes] | None = None) -> "ModelBundle":
        """A bundle not yet written (training calibrates and evaluates with it)."""
        return cls({"tasks": [s.to_json() for s in specs], "model_version": "in-memory"},
                   bundle_state(heads_state, centroids), backbone, networks)

    # -- io
    @classmethod
    def load(cls, uri: str) -> "ModelBundle":
        """Read a bundle from a folder or ``s3://bucket/prefix``; one-line errors name the URI."""
        import torch

        from pipeline import storage

        try:
            fs, path = storage.resolve(uri)
        except storage.StorageError as exc:
            raise ModelFileError(f"model {uri}: {exc}") from None
        try:
            with fs.open_input_stream(f"{path}/model.json") as f:
                meta_bytes = f.read()
            with fs.open_input_stream(f"{path}/heads.pt") as f:
                weights = f.read()
        except (FileNotFoundError, OSError) as exc:
            raise ModelFileError(f"model bundle not found at {uri} (needs model.json and heads.pt): "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        try:
            meta = json.loads(meta_bytes)
        except ValueError as exc:
            raise ModelFileError(f"model {uri}: model.json is not JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
            raise ModelFileError(f"model {uri}: unsupported model.json format_version "
                             f"{meta.get('format_version') if isinstance(meta, dict) else None!r} "
                             f"(this build reads {', '.join(map(str, READABLE_VERSIONS))})")
        if content_hash(meta, weights) != meta.get("model_version"):
            raise ModelFileError(f"model {uri}: heads.pt or model.json changed since the bundle was "
                             "written (content hash mismatch)")
        backbone = cls._read_backbone(fs, path, uri, meta.get("finetune"))
        networks = {name: cls._read_file(fs, path, uri, entry)
                    for name, entry in ((meta.get("finetune") or {}).get("networks") or {}).items()}
        try:
            state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
            return cls(meta, state, backbone, networks)
        except Exception as exc:  # a truncated or foreign state dict is a bad bundle
            raise ModelFileError(f"model {uri}: cannot rebuild the heads: {str(exc).splitlines()[0]}") from None

    @staticmethod
    def _read_file(fs: Any, path: str, uri: str, entry: dict[str, Any]) -> bytes:
        """A tuned network's bytes (``{"file", "weights_sha256"}``), checked against the hash."""
        try:
            with fs.open_input_stream(f"{path}/{entry['file']}") as f:
                data = f.read()
        except (FileNotFoundError, OSError, KeyError) as exc:
            raise ModelFileError(f"model {uri}: fine-tuned network missing ({exc})") from None
        if hashlib.sha256(data).hexdigest() != entry.get("weights_sha256"):
            raise ModelFileError(f"model {uri}: {entry['file']} changed since the bundle was written "
                                 "(sha256 mismatch)")
        return data

    @staticmethod
    def _read_backbone(fs: Any, path: str, uri: str, finetune: dict[str, Any] | None) -> bytes | None:
        """A fine-tuned bundle's backbone bytes, checked against the hash model.json holds
        (which is part of ``model_version``)."""
        if not finetune or "file" not in finetune:
            return None
        try:
            with fs.open_input_stream(f"{path}/{finetune['file']}") as f:
                data = f.read()
        except (FileNotFoundError, OSError, KeyError) as exc:
            raise ModelFileError(f"model {uri}: fine-tuned backbone missing ({exc})") from None
        if hashlib.sha256(data).hexdigest() != finetune.get("weights_sha256"):
            raise ModelFileError(f"model {uri}: {finetune['file']} changed since the bundle was written "
                                 "(sha256 mismatch)")
        return data

    @staticmethod
    def write(uri: str, specs: list[TaskSpec], heads_state: dict[str, Any],
              centroids: dict[str, np.ndarray], extra: dict[str, Any], backbone: bytes | None = None,
              networks: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Write heads.pt (and a fine-tuned ``backbone.pt``, each fine-tuned attribute
        network's ``<attribute>.pt``), then model.json (last, so a half-written bundle never
        loads)."""
        import torch

        from pipeline import storage

        buf = io.BytesIO()
        torch.save(bundle_state(heads_state, centroids), buf)
        weights = buf.getvalue()
        # version 1 while every head reads the identity embedding: older builds still load it
        version = (FORMAT_VERSION if networks or any(s.head == BUILTIN for s in specs)
                   else 2 if any(s.features != IDENTITY for s in specs) else 1)
        meta = {"format_version": version, **extra, "tasks": [s.to_json() for s in specs]}
        if backbone is not None:  # its hash is in model.json, so in model_version
            meta["finetune"] = {**meta.get("finetune", {}), "file": "backbone.pt",
                                "weights_sha256": hashlib.sha256(backbone).hexdigest()}
        if networks:  # each hash in model.json, so in model_version
            meta["finetune"] = {**meta.get("finetune", {}), "networks": {
                name: {"file": f"{name}.pt", "weights_sha256": hashlib.sha256(data).hexdigest()}
                for name, data in sorted(networks.items())}}
        meta["model_version"] = content_hash(meta, weights)
        fs, path = storage.resolve(uri)
        fs.create_dir(path, recursive=True)
        for name, data in sorted((networks or {}).items()):
            with fs.open_output_stream(f"{path}/{name}.pt") as f:
                f.write(data)
        if backbone is not None:
            with fs.open_output_stream(f"{path}/backbone.pt") as f:
                f.write(backbone)
        with fs.open_output_stream(f"{path}/heads.pt") as f:
            f.write(weights)
        with fs.open_output_stream(f"{path}/model.json") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=False).encode())
        return meta

    # -- inference
    def tuned_embedder(self, precision: str = "fp32") -> Any:
        """A fine-tuned bundle's backbone as an ``Embedder`` (built once), or None."""
        if self.tuned_backbone is not None and self._tuned is None:
            from pipeline.embed import Embedder

            self._tuned = Embedder(self.tuned_backbone, precision=precision)
        return self._tuned

    def head_embeddings(self, chips: np.ndarray, embeddings: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """The identity embeddings the heads read: the base ones given, or for a fine-tuned
        bundle its own backbone's on the same chips.  A bundle with tuned attribute
        networks returns them as ``HeadEmbeddings`` carrying those networks' features, which
        ``raw``/``predict`` then read instead of the base features they are given (so every
        caller of ``predict(head_embeddings(…), ids, features)`` runs the tuned networks)."""
        tuned = self.tuned_embedder(precision)
        emb = embeddings if tuned is None or not len(chips) else tuned(chips)
        if not self.tuned_networks:
            return emb
        out = np.asarray(emb, np.float32).view(HeadEmbeddings)
        out.features = self.tuned_features(chips, precision)
        return out

    def tuned_attributes(self, precision: str = "fp32") -> Any:
        """The attribute networks with this bundle's tuned weights (built once), or None."""
        if self.tuned_networks and self._tuned_attrs is None:
            with self._lock:
                if self._tuned_attrs is None:
                    from pipeline.attributes import AttributeNets

                    self._tuned_attrs = AttributeNets(precision=precision, tuned=self.tuned_networks)
        return self._tuned_attrs

    def tuned_features(self, chips: np.ndarray, precision: str = "fp32") -> dict[str, np.ndarray]:
        """The feature sets of the tuned attribute networks on ``chips`` (the ones heads read)."""
        from pipeline.attributes import FEATURE_NETWORK

        nets = self.tuned_attributes(precision)
        if nets is None:
            return {}
        with self._lock:   # one forward at a time: the networks are shared by the bundle's threads
            feats = nets.run(np.asarray(chips)).features
        return {k: v for k, v in feats.items() if FEATURE_NETWORK[k] in self.tuned_networks}

    def inputs(self, embeddings: np.ndarray, features: dict[str, np.ndarray] | None = None
               ) -> dict[str, np.ndarray]:
        """Each head's input by feature set; a clear error for features the bundle needs
        but was not given (or given with the wrong shape)."""
        emb = np.asarray(embeddings, np.float32).reshape(-1, EMBEDDING_DIM)
        xs = {IDENTITY: emb}
        missing = [f for f in self.feature_sets if f not in (features or {})]
        if missing:
            raise ValueError(f"model {self.model_version}: its heads read the attribute features "
                             f"{missing} (TaskSpec.features) but none were given; compute them with "
                             "pipeline.attributes.AttributeNets.run(chips).features")
        for f in self.feature_sets:
            x = np.asarray(features[f], np.float32)  # type: ignore[index]
            if x.shape != (len(emb), feature_dim(f)):
                raise ValueError(f"{f} features: expected {(len(emb), feature_dim(f))}, got {x.shape}")
            xs[f] = x
        return xs

    def raw(self, embeddings: np.ndarray, features: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Head outputs per task: probabilities (classification) or (value, b) (regression).
        ``features``: attribute features by name, needed for ``feature_sets``."""
        torch = self._torch
        # HeadEmbeddings carry the tuned attribute networks' features: every head reads them
        # except a prefer_builtin one, which is the base network's output layer
        carried = getattr(embeddings, "features", None) or {}
        xs = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in self.inputs(embeddings, features).items()}
        tuned = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in carried.items()}
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for s in self.specs:
                x = xs[s.features] if s.prefer_builtin or s.features not in tuned else tuned[s.features]
                y = self._heads[s.name](x)
                if s.kind == CLASSIFICATION:
                    out[s.name] = torch.softmax(y, dim=1).numpy()
                else:
                    value = y[:, 0] * s.std + s.mean
                    b = (torch.nn.functional.softplus(y[:, 1]) + 1e-3) * s.std
                    out[s.name] = torch.stack([value, b], 1).numpy()
        return out

    def predict(self, embeddings: np.ndarray, photo_ids: np.ndarray,
                features: dict[str, np.ndarray] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Labels and scores per task for N faces (see the module docstring for the rules);
        ``features`` as for :meth:`raw`."""
        emb = np.asarray(embeddings, np.float32).reshape(-1, EMBEDDING_DIM)
        photo_ids = np.asarray(photo_ids).reshape(-1)
        if len(photo_ids) != len(emb):
            raise ValueError(f"{len(emb)} embeddings but {len(photo_ids)} photo ids")
        raw = self.raw(embeddings, features)
        preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in self.specs:
            r = raw[s.name]
            if s.kind == REGRESSION:
                preds[s.name] = (r[:, 0].astype(np.float32),
                                 np.exp(-r[:, 1] / max(s.std, 1e-6)).astype(np.float32))
                continue
            idx, score = self.decide(s, r, emb, photo_ids)
            labels = np.asarray(s.labels + [UNKNOWN], dtype=object)[idx]  # -1 → unknown
            preds[s.name] = (labels, score)
        return preds

    def decide(self, s: TaskSpec, probs: np.ndarray, emb: np.ndarray,
               photo_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label index per face (-1 = unknown) and its score, after open set and exclusivity."""
        n = len(probs)
        if s.open_set and s.name in self._centroids:
            dist = cosine_distance(emb, self._centroids[s.name])
            acceptable = (probs >= s.min_prob) & (dist <= s.max_dist)
        else:
            acceptable = np.ones_like(probs, dtype=bool)
        if s.exclusive:
            idx = assign_exclusive(probs, acceptable, photo_ids)
        else:
            best = probs.argmax(1) if n else np.zeros(0, np.int64)
            idx = np.where(acceptable[np.arange(n), best], best, -1)
        score = np.where(idx >= 0, probs[np.arange(n), np.maximum(idx, 0)], probs.max(1) if n else 0)
        return idx, score.astype(np.float32)


class HeadEmbeddings(np.ndarray):
    """Identity embeddings that carry the features of a bundle's tuned attribute networks
    (``ModelBundle.head_embeddings``); a plain array everywhere else."""

    features: dict[str, np.ndarray] | None = None

    def __array_finalize__(self, obj: Any) -> None:
        f = getattr(obj, "features", None)   # kept by views of the same rows only (not slices)
        n = self.shape[0] if self.ndim else -1
        self.features = f if f and all(len(v) == n for v in f.values()) else None


def regression_scale(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return 0.0, 1.0
    std = float(v.std())
    return float(v.mean()), std if std > 1e-6 and math.isfinite(std) else 1.0
