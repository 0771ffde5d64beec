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


@pytest.mark.parametrize("cpus", [2, 4, 16])
def test_serve_plan_direct_is_one_replica_holding_the_cores_and_the_proxy_one_per_core(cpus: int) -> None:
    from pipeline.resources import serve_actor_options, serve_plan

    res = {"CPU": float(cpus)}
    proxy, direct = serve_plan(res), serve_plan(res, direct=True)
    assert proxy.replicas == plan_resources(res).crop_actors and not proxy.direct
    assert direct.replicas == 1 and direct.direct and direct.autoscaling_config()["max_replicas"] == 1
    # the one replica holds what the proxy plan's replicas hold together, one detect thread per core
    assert direct.replica_cpus >= proxy.replicas * proxy.replica_cpus - (0.05 if cpus <= 4 else 1.0)
    assert direct.replica_cpus + direct.side_cpus <= cpus
    assert direct.detect_threads == round(direct.replica_cpus) and proxy.detect_threads == 1
    assert direct.max_ongoing == proxy.max_ongoing * direct.detect_threads
    assert serve_actor_options(res, direct)["FacePipeline"]["num_cpus"] == direct.replica_cpus
    assert "direct ingress" in direct.describe() and "proxy" in proxy.describe()


def test_ingress_direct_only_on_a_ray_started_here_with_one_replica() -> None:
    from pipeline.contract import UsageError
    from serve import ingress

    assert ingress.choose("auto", local=True, replicas=None) == ingress.DIRECT
    assert ingress.choose("auto", local=True, replicas=1) == ingress.DIRECT
    assert ingress.choose("auto", local=True, replicas=2) == ingress.PROXY
    assert ingress.choose("auto", local=False, replicas=None) == ingress.PROXY  # a cluster we join
    assert ingress.choose("proxy", local=True, replicas=None) == ingress.PROXY
    with pytest.raises(UsageError):
        ingress.choose("direct", local=False, replicas=None)
    env = ingress.direct_ingress_env(8123)
    # Serve's port range is [min, max): exactly the user's port, so exactly one replica
    span = env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]
    assert span == ("8123", "8124")


def test_listening_reads_the_bound_address() -> None:
    import socket

    from serve import ingress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert ingress.listening(s.getsockname()[1]) == {"127.0.0.1"}
