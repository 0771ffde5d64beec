"""Actor pools and batch sizes from what the cluster has, so one command fits a 2-core
laptop, a multi-node CPU cluster and a GPU cluster.

GPU requests are made only when the cluster has GPUs: asking for one that does not exist
leaves Ray Data waiting forever.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    cpus: float
    gpus: float
    crop_actors: int
    crop_cpus: float          # per crop actor
    embed_actors: int
    embed_cpus: float         # per embed actor
    embed_gpus: float         # per embed actor (0 on CPU clusters)
    crop_batch: int           # photos per crop call
    embed_batch: int          # photos per embed call
    device_batch: int         # faces per forward pass
    write_cpus: float

    def describe(self) -> str:
        where = f"{self.embed_actors}×GPU" if self.embed_gpus else f"{self.embed_actors}×CPU"
        return (f"cluster {self.cpus:g} CPU / {self.gpus:g} GPU: crop {self.crop_actors} actors × "
                f"{self.crop_cpus:g} CPU, embed {where} actors, batches {self.crop_batch}/"
                f"{self.embed_batch} photos, {self.device_batch} faces per forward")


def plan_resources(resources: dict[str, float], crop_actors: int | None = None,
                   embed_actors: int | None = None, device_batch: int | None = None) -> Plan:
    """Split the cluster between the CPU crop stage and the embedding stage.

    Small clusters (≤ 4 CPUs) get fractional CPU requests: with two whole-CPU actor stages
    and a write task on 2 CPUs, Ray Data waits forever for a free CPU.
    """
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    small = cpus <= 4
    if gpus >= 1:
        n_embed = embed_actors or int(gpus)
        embed_cpus, embed_gpus, dev_batch = 1.0, 1.0, device_batch or 256
    else:
        # On CPUs the embedding is the biggest kernel (benchmarks/README.md score_speed:
        # 15 of 20 ms per portrait, 87 of 122 ms per group photo): half the cores.
        n_embed = embed_actors or max(1, int(cpus // 2))
        embed_cpus, embed_gpus, dev_batch = (0.5 if small else 1.0), 0.0, device_batch or 32
    crop_cpus = 0.5 if small else 1.0
    write_cpus = 0.25 if small else 0.5
    free = cpus - write_cpus - (0 if embed_gpus else n_embed * embed_cpus)
    n_crop = crop_actors or max(1, int(free // crop_cpus))
    return Plan(cpus, gpus, n_crop, crop_cpus, n_embed, embed_cpus, embed_gpus,
                crop_batch=8, embed_batch=64 if embed_gpus else 32, device_batch=dev_batch,
                write_cpus=write_cpus)
