"""What the jobs' command lines share: argument types (bad values → argparse usage
errors) and the one rule for errors: misuse (``UsageError``) prints one line and exits 2,
anything else is a bug and keeps its traceback (non-zero exit); SIGINT or SIGTERM stops the
work (``pipeline/stopping.py``), prints what was done and how to resume, stops the local Ray
the job started and exits 130 / 143."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def add_ray_flags(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """The flags every job shares: where Ray is, and (``progress``) how it reports."""
    from pipeline.progress import DEFAULT_EVERY_S

    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, or start a local one)")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of a local Ray started by this job")
    if not progress:
        return
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own INFO logs, the workers' output and Ray Data's progress bars "
                        "(hidden by default; warnings show either way)")
    p.add_argument("--progress-every", type=positive_seconds, default=DEFAULT_EVERY_S, metavar="SECONDS",
                   help="a progress line every SECONDS when the output is not a terminal "
                        f"(default {DEFAULT_EVERY_S:g}; on a terminal a bar; FACERAY_PROGRESS=log|bar forces one)")


def run_job(prog: str, work: Callable[[], int], resume: str | None = None) -> int:
    """``work()``'s exit code; a ``UsageError`` becomes ``prog: error: <first line>`` and 2;
    a stop (SIGINT / SIGTERM) becomes 130 / 143 with ``resume`` (how to continue) printed."""
    from pipeline import stopping
    from pipeline.contract import UsageError

    stopping.install()
    try:
        return work()
    except UsageError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2
    except stopping.Stopped as stop:
        _stopped(prog, stop, resume)  # does not return
        raise
    except BaseException:
        if stopping.requested() is None:
            raise
        # a signal to the whole process group can fail Ray's side first (a worker died)
        _stopped(prog, stopping.Stopped(stopping.requested()), resume)
        raise
    finally:
        stopping.uninstall()


def exit_now(code: int) -> None:
    """End a finished job's process at once: disconnect from Ray (a local Ray it started
    stops), flush the output and logs, then ``os._exit``.  The interpreter's own teardown
    with torch and Ray loaded takes 1-2 s more here and does nothing a job needs
    (benchmarks/startup.py).  Only for a command-line entry point, after ``main()``."""
    import logging
    import os

    if "pipeline.runtime" in sys.modules:
        from pipeline import runtime

        runtime.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stopped(prog: str, stop, resume: str | None) -> None:  # noqa: ANN001
    """Report a stop, stop what this process started, exit 128 + signal (no Ray atexit
    hooks: they could wait on a Ray that is gone)."""
    import os

    from pipeline import runtime, stopping

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"\n{prog}: stopped by {stop.name} after {stopping.seconds():.1f} s")
    for line in stop.done:
        say(f"  {line}")
    say(f"  to resume: {resume}" if resume else "  nothing to resume: run the same command again")
    runtime.stop_ray(log=lambda m: say(f"  {m}"))
    say(f"{prog}: exit {stop.code}")
    sys.stdout.flush()
    os._exit(stop.code)
