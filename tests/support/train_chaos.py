"""Kill a Ray Train worker mid-run: the fit must resume from a checkpoint."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable


def kill_a_worker_during(run: Callable[[], Any], checkpoints: Path, pattern: str,
                         wait_s: float = 240) -> tuple[Any, int]:
    """Run ``run`` (a training call) in a thread; once two checkpoint directories match
    ``pattern`` under ``checkpoints``, SIGKILL one live Ray Train worker.  Returns what ``run``
    returned and the killed PID; fails if no worker was killed or the run did not finish."""
    import ray._private.state as ray_state

    result: dict = {}

    def target() -> None:
        try:
            result["outcome"] = run()
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    killed = None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and t.is_alive() and killed is None:
        # a checkpoint is committed once every rank has reported: with two directories on
        # storage the first one is certainly registered, so the run must resume from it
        if len(list(checkpoints.glob(pattern))) >= 2:
            workers = [a for a in ray_state.actors().values()
                       if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]]
            if workers:
                killed = workers[-1]["Pid"]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert killed, f"never saw a checkpoint ({pattern}) and a live Train worker to kill"
    t.join(timeout=300)
    assert not t.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in result, result.get("error")
    return result["outcome"], killed
