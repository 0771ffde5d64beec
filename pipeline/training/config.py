"""The training job's knobs (flags of ``train_classifier.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    workers: int = 2
    use_gpu: bool = False
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 8
    head: str = "auto"                  # linear | mlp | auto (train both, keep the better per task)
    features: str = "auto"              # head inputs: auto (identity + every attribute network's
                                        # features, kept per task on validation) | identity | age,gender,…
    hidden: int = 256
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0
    task_weights: dict[str, float] = field(default_factory=dict)
    open_set: list[str] | None = None   # tasks with "unknown" rejection; None: identity-like names
    target_frr: float = 0.02            # share of known validation faces the open set may reject
    huber_delta: float = 0.2            # in target standard deviations
    max_failures: int = 2
    flip_tta: bool = False
    shuffle_buffer: int = 1024
    finetune: str = "none"              # none | last (the backbone's last stage) | all (pipeline/training/finetune.py)
    finetune_epochs: int = 10
    finetune_lr: float = 1e-4           # the backbone's rate; heads learn at HEAD_LR_FACTOR × this
    finetune_batch_size: int = 32
    prefer_builtin: bool = True         # a task that does not beat its built-in network ships that network's answer
    keep_tuned: bool = False            # ship the tuned model even when it loses to the frozen one on
                                        # validation (benchmarks and tests measure it; the job never sets it)
