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


@dataclass(frozen=True)
class ServePlan:
    """The endpoint's shape on a cluster, by the same rule as the batch job's ``Plan``.

    CPU clusters: ``replicas`` fused ``FacePipeline`` replicas (one per crop actor of the batch
    plan), each decode → detect → align → embed → heads, requests batched at the networks.
    GPU clusters: ``replicas`` CPU replicas (decode/detect/align, heads) feed ``embed_replicas``
    batched GPU ``Embeddings`` replicas.  ``max_ongoing`` per replica is what it admits
    before answering 503 (Retry-After); Serve's own queue in front (per proxy) holds at most
    ``max_queued``, a backstop far above what admission lets through.
    """

    cpus: float
    gpus: float
    replicas: int
    replica_cpus: float
    embed_replicas: int           # 0: fused (CPU clusters)
    max_batch: int                # photos per forward pass (@serve.batch)
    max_ongoing: int              # per replica, admitted at once; beyond: 503 + Retry-After
    max_queued: int               # Serve's queue in front, per proxy (its plain-text 503 beyond): a backstop
    side_cpus: float              # Predictions (table lookups, search)
    direct: bool = False          # Serve's direct ingress: the one replica answers HTTP itself

    @property
    def fused(self) -> bool:
        return self.embed_replicas == 0

    @property
    def detect_threads(self) -> int:
        """Decode/detect threads per replica (one detector each): one per CPU it holds."""
        return max(1, round(self.replica_cpus))

    @property
    def net_threads(self) -> int:
        """Torch threads for the replica's networks (CPU clusters): half its cores, the rest
        decode/detect meanwhile.  One replica on 2 cores (serve_load, 2026-12-04): 1 thread
        148 photos/s at 16 clients and 14 ms for a lone photo, 2 threads 129 and 25 ms."""
        return max(1, self.detect_threads // 2)

    def describe(self) -> str:
        head = f"cluster {self.cpus:g} CPU / {self.gpus:g} GPU: "
        tail = (", direct ingress (the replica answers HTTP itself)" if self.direct
                else ", behind Serve's proxy")
        if self.fused:
            return (head + f"{self.replicas} FacePipeline replicas × {self.replica_cpus:g} CPU, each decode → "
                    f"detect ({self.detect_threads} threads) → align → embed ({self.net_threads} threads) → heads, "
                    f"up to {self.max_batch} photos per forward, {self.max_ongoing} admitted per replica" + tail)
        return (head + f"{self.replicas} FacePipeline replicas × {self.replica_cpus:g} CPU (decode/detect/align, "
                f"heads) → {self.embed_replicas} Embeddings replicas × 1 GPU, up to {self.max_batch} photos "
                f"per forward, {self.max_ongoing} admitted per replica" + tail)

    def autoscaling_config(self) -> dict[str, float]:
        """Serve autoscaling for FacePipeline: a fixed size on CPU clusters (the cores are the
        capacity), up to twice the CPU replicas on GPU clusters.  serve/config.yaml overrides it."""
        return {"min_replicas": self.replicas, "initial_replicas": self.replicas,
                "max_replicas": self.replicas * (1 if self.fused or self.direct else 2),
                "target_ongoing_requests": max(2, self.max_batch // 2),
                "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}


def serve_plan(resources: dict[str, float], replicas: int | None = None, direct: bool = False) -> ServePlan:
    """The endpoint's replicas from the cluster, by ``plan_resources``' rule: as many fused
    replicas as the batch job has fused actors on CPU clusters; on GPU clusters, the batch
    job's crop actors decode/detect and one Embeddings replica per GPU embeds.

    ``direct`` (Serve's direct ingress on one node, ``serve.ingress``): one URL is one
    replica, so a CPU cluster gets **one** fused replica holding the cores the batch job's
    actors would (one decode/detect thread per core, the networks on half of them), admitting
    as many photos as those replicas together."""
    base = plan_resources(resources, crop_actors=replicas or (1 if direct else None))
    side = 0.1 if is_small(base.cpus) else 0.5
    if base.fused:
        n = base.crop_actors
        free = base.cpus - side - base.write_cpus
        if is_small(base.cpus):
            per = max(0.1, math.floor(free / n * 100) / 100)
        else:
            per = max(1.0, float(math.floor(free / n))) if direct else 1.0
        batch = 16
        admitted = batch * max(1, round(per))  # per core held, as one replica per core would
        return ServePlan(base.cpus, base.gpus, n, per, 0, batch, max_ongoing=admitted, max_queued=16 * admitted,
                         side_cpus=side, direct=direct)
    batch = 32
    free = base.cpus - side - base.write_cpus - base.embed_actors * serve_embed_cpus(base.cpus)
    n = replicas or (1 if direct else max(1, int(free // base.crop_cpus)))
    per = max(base.crop_cpus, float(math.floor(free / n))) if direct else base.crop_cpus
    return ServePlan(base.cpus, base.gpus, n, per, base.embed_actors, batch,
                     max_ongoing=batch, max_queued=16 * batch, side_cpus=side, direct=direct)


def serve_embed_cpus(cpus: float) -> float:
    """CPUs next to each GPU Embeddings replica (feeding the GPU)."""
    return 0.5 if is_small(cpus) else 1.0


def serve_actor_options(resources: dict[str, float], plan: ServePlan | None = None) -> dict[str, dict[str, float]]:
    """CPU/GPU requests per Serve deployment, from ``plan`` (default ``serve_plan(resources)``).

    A GPU is requested (for Embeddings only) when the cluster has one: asking for a GPU
    that does not exist leaves the replica pending forever.
    """
    plan = plan or serve_plan(resources)
    return {"FacePipeline": {"num_cpus": plan.replica_cpus},
            "Embeddings": {"num_cpus": serve_embed_cpus(plan.cpus), "num_gpus": 1.0},
            "Predictions": {"num_cpus": plan.side_cpus}}
