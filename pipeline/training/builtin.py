"""Tasks a built-in network already answers (emotion's 7 classes in any order or case,
``age`` regression, ``gender`` female/male): the head starts from that network's own
output layer, and the trained model is compared with the network on the same faces.

Why: a head trained from scratch on 140 photos undoes what FER2013's 28,000 taught the
emotion network (38.6 % vs the network's 47.1 %).  Starting from the network's output
layer (exactly linear in ``attributes.OUTPUT_FEATURES``: mapped to the task's label order
and folded through the head's input standardisation) the head answers as the network does
before any step; the fit keeps that untouched state as a candidate (epoch -1), and
``versus`` measures trained against built-in on validation, so a task that loses ships
the built-in answer (``TaskSpec.prefer_builtin``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.contract import CLASSIFICATION, REGRESSION
from pipeline.heads import BUILTIN, TaskSpec, variant_name


@dataclass
class BuiltinMatch:
    """How one task lines up with a built-in network."""

    task: str
    network: str                       # age | gender | emotion
    features: str                      # what its output layer reads (attributes.OUTPUT_FEATURES)
    rows: list[int] = field(default_factory=list)       # per task label: the network's class, -1 none
    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every label of the task is one of the network's: the network answers the task."""
        return not self.unmatched

    @property
    def variant(self) -> str:
        return variant_name(BUILTIN, self.features)

    def describe(self) -> str:
        if self.network == "age":
            return f"{self.task}: starts from the built-in age network's output layer (its 81 age bins)"
        text = f"{self.task}: starts from the built-in {self.network} network's output layer"
        if self.complete:
            return f"{text} (all {len(self.matched)} labels matched)"
        return (f"{text} for {len(self.matched)} of {len(self.rows)} labels ({', '.join(self.matched)}); "
                f"not matched, so learnt from scratch: {', '.join(self.unmatched)}; the built-in cannot answer "
                "this task, so it is not compared")


def match_task(name: str, kind: str, labels: list[str], open_set: bool = False) -> BuiltinMatch | None:
    """The built-in network a task matches, or None.  Regression: a task named ``age``.
    Classification: the network sharing most labels (case-insensitive), at least two of
    them, or one when the task bears the network's name; open-set tasks never match."""
    from pipeline.attributes import EMOTION_LABELS, GENDER_LABELS, OUTPUT_FEATURES

    if open_set:
        return None
    if kind == REGRESSION:
        return BuiltinMatch(name, "age", OUTPUT_FEATURES["age"]) if name.lower() == "age" else None
    best = None
    for network, classes in (("emotion", EMOTION_LABELS), ("gender", GENDER_LABELS)):
        rows = [classes.index(lab.strip().lower()) if lab.strip().lower() in classes else -1 for lab in labels]
        hits = sum(r >= 0 for r in rows)
        if hits >= 2 or (hits >= 1 and name.lower() == network):
            if best is None or hits > sum(r >= 0 for r in best.rows):
                best = BuiltinMatch(name, network, OUTPUT_FEATURES[network], rows,
                                    [lab for lab, r in zip(labels, rows) if r >= 0],
                                    [lab for lab, r in zip(labels, rows) if r < 0])
    return best


def match_specs(specs: list[TaskSpec]) -> dict[str, BuiltinMatch]:
    """Task name → its match, for the tasks that have one."""
    out = {}
    for s in specs:
        m = match_task(s.name, s.kind, s.labels, s.open_set)
        if m is not None:
            out[s.name] = m
    return out


def match_table(tasks: list[tuple[str, str]], table: pa.Table, open_set: list[str] | None) -> dict[str, BuiltinMatch]:
    """Matches from a labelled table, before the specs exist (the embedding pass must know
    which output-layer features to compute)."""
    from pipeline.heads import default_open_set

    rejecting = set(open_set) if open_set is not None else {n for n, _ in tasks if default_open_set(n)}
    out = {}
    for name, kind in tasks:
        labels = sorted({str(v) for v in table.column(name).to_pylist() if v is not None}) if kind == CLASSIFICATION else []
        m = match_task(name, kind, labels, name in rejecting)
        if m is not None:
            out[name] = m
    return out


_NETS: dict[str, Any] = {}


def builtin_nets(cache_dir: str | None = None) -> dict[str, Any]:
    """The three built-in networks (CPU, loaded once per process)."""
    if not _NETS:
        from pipeline.attributes import AttributeNets

        _NETS.update(AttributeNets(device="cpu", cache_dir=cache_dir).nets)
    return _NETS


def output_head_state(match: BuiltinMatch, spec: TaskSpec, mean: np.ndarray, std: np.ndarray,
                      nets: dict[str, Any]) -> dict[str, Any]:
    """The state of a ``builtin`` head (``heads.make_head``) equal to the network's output
    layer: rows in the task's label order (a label the network lacks: zero weights, the
    mean bias), folded through ``InputNorm`` (x − mean) / std."""
    import torch

    from pipeline.attributes import output_layer

    w, b = output_layer(nets, match.network)
    if spec.kind == CLASSIFICATION:
        rows = np.array(match.rows)
        w = np.where(rows[:, None] >= 0, w[np.maximum(rows, 0)], 0.0)
        b = np.where(rows >= 0, b[np.maximum(rows, 0)], float(b.mean()))
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    w_in = w * std[None, :]
    b_in = b + w @ mean
    return {"0.mean": torch.from_numpy(mean.copy()), "0.std": torch.from_numpy(std.copy()),
            "1.weight": torch.from_numpy(np.ascontiguousarray(w_in, np.float32)),
            "1.bias": torch.from_numpy(np.ascontiguousarray(b_in, np.float32))}


def init_states(specs: list[TaskSpec], matches: dict[str, BuiltinMatch], features: dict[str, np.ndarray],
                cache_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """``task@builtin+<features>`` → its starting state, standardised by the training
    features' statistics (``heads.feature_stats``, what the fit's ``InputNorm`` uses)."""
    from pipeline.heads import feature_stats

    if not matches:
        return {}
    nets = builtin_nets(cache_dir)
    out = {}
    for s in specs:
        m = matches.get(s.name)
        if m is not None:
            out[f"{s.name}@{m.variant}"] = output_head_state(m, s, *feature_stats(features[m.features]), nets)
    return out
