"""plan_resources: the same job fits a laptop, a CPU cluster and a GPU cluster."""
from __future__ import annotations

import pytest

from pipeline.resources import plan_resources


def _fits(plan) -> bool:
    """Every actor plus one write task fit in the cluster's CPUs at once (else Ray Data waits)."""
    cpu_actors = plan.crop_actors * plan.crop_cpus + (0 if plan.embed_gpus else plan.embed_actors * plan.embed_cpus)
    return cpu_actors + plan.write_cpus <= plan.cpus + 1e-9


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_clusters_get_one_fused_actor_per_core(cpus: int) -> None:
    plan = plan_resources({"CPU": float(cpus)})
    assert plan.fused and plan.embed_actors == 0 and plan.embed_gpus == 0
    assert plan.crop_actors == (cpus if cpus <= 4 else cpus - 1)
    assert _fits(plan)
    assert "decode → detect → crop → embed" in plan.describe()


def test_gpu_clusters_embed_on_every_gpu_and_crop_on_the_cpus() -> None:
    plan = plan_resources({"CPU": 36.0, "GPU": 2.0})
    assert not plan.fused
    assert plan.embed_actors == 2 and plan.embed_gpus == 1.0 and plan.device_batch == 256
    assert plan.crop_actors == 35 and plan.crop_cpus == 1.0
    assert _fits(plan) and "2×GPU" in plan.describe()


def test_a_fraction_of_a_gpu_is_not_a_gpu() -> None:
    assert plan_resources({"CPU": 4.0, "GPU": 0.5}).fused


def test_overrides() -> None:
    split = plan_resources({"CPU": 2.0}, embed_actors=1)  # a CPU cluster can still split the stages
    assert not split.fused and split.embed_actors == 1 and split.embed_gpus == 0 and _fits(split)
    one = plan_resources({"CPU": 2.0}, crop_actors=1, device_batch=8)
    assert one.fused and one.crop_actors == 1 and one.device_batch == 8 and _fits(one)
    assert plan_resources({"CPU": 8.0, "GPU": 1.0}, crop_actors=3).crop_actors == 3
