"""Starting or joining Ray the same way in every job and the endpoint.

A driver that uses torch loads it before connecting (``init_ray(torch_first=True)``, the
default): measured on a 2-node cluster here, a driver that connected with ``ray.init()``
and only then loaded torch's native library (``import torch``, or a bare ``dlopen`` of
``libtorch_cpu.so``) died in about half the runs with "Intel oneMKL FATAL ERROR: Cannot
load libtorch_cpu.so"; torch first never did (tests/test_cluster.py's jobs load a model
bundle in the driver).  A driver that never touches torch (the scoring job without
``--model``: its networks run in the actors) skips the import, 1 s of its start-up.
"""
from __future__ import annotations

import os
import signal
import time


_started_local = False  # this process started the Ray it is connected to


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             torch_first: bool = True) -> bool:
    """Join the cluster a job was submitted to, or start a local one bound to 127.0.0.1;
    True when this call started Ray (then :func:`stop_ray` stops it).  Ray's own INFO
    noise stays out of the job's output unless ``verbose`` (``progress.quiet_ray``).
    ``torch_first``: load torch before connecting (see above); False only for a driver
    that never imports it."""
    global _started_local
    if torch_first:
        import torch  # noqa: F401
    import ray

    from pipeline import stopping

    if ray.is_initialized():
        return False
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        # A Ray we start listens on 127.0.0.1 only.  Ray reads this variable once, when it
        # is first imported (which has happened by now), so the constant is set as well;
        # child processes (GCS, raylet, workers) read the variable.  Never for a cluster
        # we join: its nodes must reach this driver on the node's own address.
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipeline.progress import quiet_ray

    kwargs: dict = {"address": address, **quiet_ray(verbose)}
    if num_cpus is not None and not address:
        kwargs["num_cpus"] = num_cpus
    if local:
        from pipeline.settings import Settings

        kwargs["include_dashboard"] = Settings().local_dashboard  # benchmarks/score_speed.py --new-user
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    _started_local = local
    stopping.reinstall()  # ray.init replaced the SIGTERM handler of a job
    return local


def started_local() -> bool:
    return _started_local


def shutdown() -> None:
    """Disconnect from Ray (a local Ray this process started stops).  Such a Ray's
    autoscaler monitor sits out its SIGTERM for the whole second ``ray.shutdown`` waits on
    it (1.00 of 1.34 s measured) and autoscales nothing on one machine: it is killed first,
    by PID, among this process's own children."""
    import ray

    from pipeline import stopping

    if not ray.is_initialized():
        return
    if _started_local:
        for pid in stopping.descendants(os.getpid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"autoscaler/_private/monitor.py" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone already
    ray.shutdown()


def stop_ray(timeout: float = 5.0, log=print) -> None:
    """After a stop: disconnect from Ray; a local Ray this process started is stopped, with
    every process this one started (leftovers killed by PID).  A joined cluster keeps
    running: only this driver's own actors and tasks end with it."""
    global _started_local
    import ray

    from pipeline import stopping

    t0 = time.monotonic()
    ours = stopping.descendants(os.getpid())
    clean = stopping.bounded(shutdown, timeout) if ray.is_initialized() else True
    left = [p for p in ours if stopping.alive(p)]
    killed = stopping.kill_tree(left, grace=2.0) if left else []
    what = "local Ray stopped" if _started_local else "disconnected from the Ray cluster (left running)"
    if not clean:
        what += f" (ray.shutdown did not finish in {timeout:g} s)"
    if killed:
        what += f", {len(killed)} leftover process(es) killed"
    _started_local = False
    log(f"{what} in {time.monotonic() - t0:.1f} s")
