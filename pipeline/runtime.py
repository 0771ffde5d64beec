"""Starting or joining Ray the same way in every job and the endpoint.

Import this module before ``ray`` in a driver: it loads torch first.  Measured on a
2-node cluster here, a driver that connected with ``ray.init()`` and only then loaded
torch's native library (``import torch``, or a bare ``dlopen`` of ``libtorch_cpu.so``)
died in about half the runs with "Intel oneMKL FATAL ERROR: Cannot load
libtorch_cpu.so"; torch first never did (tests/test_cluster.py's jobs load a model
bundle in the driver).
"""
from __future__ import annotations

import os

import torch  # noqa: F401  (see above: before ray)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to, or start a local one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A Ray we start listens on 127.0.0.1 only.  Ray reads this variable once, when it
        # is first imported (which has happened by now), so the constant is set as well;
        # child processes (GCS, raylet, workers) read the variable.  Never for a cluster
        # we join: its nodes must reach this driver on the node's own address.
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"address": address, "log_to_driver": True}
    if num_cpus is not None and not address:
        kwargs["num_cpus"] = num_cpus
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
