"""Actor pools and batch sizes from what the cluster has, so one command fits a 2-core
laptop, a multi-node CPU cluster and a GPU cluster.

GPU requests are made only when the cluster has GPUs: asking for one that does not exist
leaves Ray Data waiting forever.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.precision import describe_for_plan


#: Clusters with at most this many CPUs get fractional CPU requests: whole-CPU actors plus
#: a write task (or a Serve app next to a job) on 2 CPUs make Ray wait forever.
SMALL_CLUSTER_CPUS = 4


def is_small(cpus: float) -> bool:
    return cpus <= SMALL_CLUSTER_CPUS


@dataclass(frozen=True)
class Plan:
    cpus: float
    gpus: float
    crop_actors: int
    crop_cpus: float          # per crop actor
    embed_actors: int         # 0: fused, the crop actors embed too (CPU-only clusters)
    embed_cpus: float         # per embed actor
    embed_gpus: float         # per embed actor (0 on CPU clusters)
    crop_batch: int           # photos per crop call
    embed_batch: int          # photos per embed call
    device_batch: int         # faces per forward pass
    write_cpus: float
    precision: str = "auto"   # Settings.precision; the plan line says what it resolves to

    @property
    def fused(self) -> bool:
        return self.embed_actors == 0

    def describe(self) -> str:
        head = f"cluster {self.cpus:g} CPU / {self.gpus:g} GPU: "
        if self.fused:
            return (head + f"{self.crop_actors} actors × {self.crop_cpus:g} CPU, each decode → detect → "
                    f"crop → embed, {self.crop_batch} photos per call, {self.device_batch} faces per forward, "
                    + describe_for_plan(self.precision, gpus=False))
        where = f"{self.embed_actors}×GPU" if self.embed_gpus else f"{self.embed_actors}×CPU"
        return (head + f"crop {self.crop_actors} actors × {self.crop_cpus:g} CPU, embed {where} actors, "
                f"batches {self.crop_batch}/{self.embed_batch} photos, {self.device_batch} faces per forward, "
                + describe_for_plan(self.precision, gpus=bool(self.embed_gpus)))


def plan_resources(resources: dict[str, float], crop_actors: int | None = None,
                   embed_actors: int | None = None, device_batch: int | None = None,
                   precision: str = "auto") -> Plan:
    """Split the cluster between the CPU crop stage and the embedding stage.

    Without GPUs the two stages are fused into one actor per core (unless ``embed_actors``
    asks for a split): split CPU pools have a fixed ratio, while the work per photo does
    not (1 face in a portrait, 8+ in a group photo), so one pool always waited on the
    other (benchmarks/README.md, score_speed).  Small clusters (≤ 4 CPUs) get fractional
    CPU requests: whole-CPU actors plus a write task on 2 CPUs make Ray Data wait forever.
    """
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    small = is_small(cpus)
    write_cpus = 0.25 if small else 0.5
    if gpus < 1 and not embed_actors:
        n = crop_actors or max(1, int(cpus) if small else int(cpus - write_cpus))
        per = max(0.1, math.floor((cpus - write_cpus) / n * 100) / 100) if small else 1.0
        return Plan(cpus, gpus, n, per, 0, 0.0, 0.0, crop_batch=8, embed_batch=8,
                    device_batch=device_batch or 32, write_cpus=write_cpus, precision=precision)
    if gpus >= 1:
        n_embed = embed_actors or int(gpus)
        embed_cpus, embed_gpus, dev_batch = 1.0, 1.0, device_batch or 256
    else:
        n_embed, embed_cpus, embed_gpus, dev_batch = embed_actors, (0.5 if small else 1.0), 0.0, device_batch or 32
    crop_cpus = 0.5 if small else 1.0
    free = cpus - write_cpus - (0 if embed_gpus else n_embed * embed_cpus)
    n_crop = crop_actors or max(1, int(free // crop_cpus))
    return Plan(cpus, gpus, n_crop, crop_cpus, n_embed, embed_cpus, embed_gpus,
                crop_batch=8, embed_batch=64 if embed_gpus else 32, device_batch=dev_batch,
                write_cpus=write_cpus, precision=precision)


def serve_actor_options(resources: dict[str, float]) -> dict[str, dict[str, float]]:
    """CPU/GPU requests per Serve deployment, by the same rule as the batch plan.

    A GPU is requested (for Embeddings only) when the cluster has one: asking for a GPU
    that does not exist leaves the replica pending forever.
    """
    cpus, gpus = float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))
    small = is_small(cpus)
    embed = {"num_cpus": 1.0, "num_gpus": 1.0} if gpus >= 1 else {"num_cpus": 0.5 if small else 1.0}
    return {"Faces": {"num_cpus": 0.5 if small else 1.0}, "Embeddings": embed,
            "Heads": {"num_cpus": 0.1 if small else 0.25}, "Predictions": {"num_cpus": 0.1 if small else 0.5},
            "Api": {"num_cpus": 0.1 if small else 0.5}}
