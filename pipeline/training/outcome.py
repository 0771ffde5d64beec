"""What a training run hands to its report and its summary: plain typed data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.heads import TaskSpec


@dataclass
class ClassificationResult:
    """Test faces of one classification task: true/closed-set indices, probabilities,
    and the open-set labels and scores the bundle answers.  ``faces``: each face's index in
    its photo where it is not the photo's main face (people layout), so thumbnails crop it."""

    true: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    label: np.ndarray
    score: np.ndarray
    uris: list[str]
    faces: np.ndarray | None = None
    dist: np.ndarray | None = None      # the open-set rule's distance, as for ClassificationResult
    # open-set tasks: the distance the open-set rule compares with ``max_dist`` (nearest
    # centroid among labels with probability >= ``min_prob``; inf when none) and the
    # distance to the nearest *other* class's centroid (a stand-in stranger when no real
    # strangers were given); both None for closed-set tasks
    dist: np.ndarray | None = None
    impostor_dist: np.ndarray | None = None


@dataclass
class RegressionResult:
    true: np.ndarray
    pred: np.ndarray
    uris: list[str]


@dataclass
class StrangerResult:
    """Faces of people outside the training set, as one open-set task labels them."""

    label: np.ndarray
    score: np.ndarray
    uris: list[str]
    faces: np.ndarray | None = None
    dist: np.ndarray | None = None      # the open-set rule's distance, as for ClassificationResult


@dataclass
class Evaluation:
    specs: list[TaskSpec]
    test: dict[str, ClassificationResult | RegressionResult]
    train_counts: dict[str, np.ndarray]          # training targets per task (class balance)
    history: list[dict[str, Any]] = field(default_factory=list)
    strangers: dict[str, StrangerResult] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    bundle_uri: str
    meta: dict
    metrics: dict
    photos: int
    faces: int
    no_face: int
    errors: dict[str, int]
    skipped: dict[str, int]
    embed_info: dict
    fit_seconds: float
    evaluation: Evaluation
    report_uri: str | None = None
    data_lines: list[str] = field(default_factory=list)   # what was read, when not photos (people layout)

    def lines(self) -> list[str]:
        out = self.data_lines or [
            f"photos read:   {self.photos}" + (f" (files skipped: {self.skipped})" if self.skipped else ""),
            f"faces found:   {self.faces} in {self.photos - self.no_face - sum(self.errors.values())} photos "
            f"(main face used per photo)",
            f"no face:       {self.no_face} photos (not used for training)",
            f"errors:        {', '.join(f'{k} {v}' for k, v in sorted(self.errors.items())) or 'none'}",
            f"embeddings:    {self.embed_info.get('embedded', 0)} computed, "
            f"{self.embed_info.get('from_cache', 0)} from cache {self.embed_info.get('cache') or '(no cache)'}"]
        out = [*out, f"fit:           {self.fit_seconds:.1f} s, {self.metrics.get('epochs_run')} epochs on "
                     f"{self.metrics.get('workers')} worker(s), heads {self.metrics.get('heads')}"]
        for task, m in self.metrics.get("test", {}).items():
            parts = [f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float))]
            out.append(f"test {task}: " + ", ".join(parts))
        from pipeline.training.versus import builtin_line, tuned_line

        for task, rec in self.metrics.get("builtin", {}).items():
            out.append(builtin_line(task, rec))
        ft = self.metrics.get("finetune") or {}
        for task, rec in ft.get("versus_frozen", {}).items():
            out.append(tuned_line(task, rec))
        for task, why in ft.get("not_tuned", {}).items():
            out.append(f"{task} not tuned: {why}")
        for task, c in self.metrics.get("open_set", {}).items():
            if "target_frr" in c:
                buys = ", ".join(f"{b['budget']:.1%} → {b['strangers_rejected']:.1%}" for b in c.get("budgets", []))
                who = "strangers" if any(b.get("real_strangers") for b in c.get("budgets", [])) else "stand-in strangers"
                out.append(f"open set {task}: known faces rejected {c['val_known_reject']:.1%} of validation (budget "
                           f"--target-frr {c['target_frr']:.1%}), {who} rejected {c['est_unknown_reject']:.1%}; "
                           f"what a budget buys ({who} rejected): {buys}")
        for task, v in self.metrics.get("strangers", {}).items():
            pct = lambda r: "n/a" if r is None else f"{r:.1%}"  # noqa: E731
            out.append(f"open set {task}: known rejected {pct(v['val']['known_rejected'])} val / "
                       f"{pct(v['test']['known_rejected'])} test, strangers rejected "
                       f"{pct(v['val']['strangers_rejected'])} val / {pct(v['test']['strangers_rejected'])} test "
                       f"({v['used']['val']} + {v['used']['test']} stranger faces of {v['people']} unnamed people)")
        if "unknown" in self.metrics:
            out.append("unknown faces: " + ", ".join(f"{t} rejected {v['rejected']:.1%} of {v['faces']}"
                                                     for t, v in self.metrics["unknown"].items()))
        out.append(f"model:         {self.bundle_uri} (version {self.meta['model_version']})")
        if self.report_uri:
            out.append(f"report:        {self.report_uri}")
        return out
