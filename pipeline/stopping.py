"""Stop means stop: what every job and the endpoint do on SIGINT or SIGTERM.

``jobs/cli.run_job`` installs the handlers.  The first signal raises :class:`Stopped`
(a ``KeyboardInterrupt``) in the main thread, or right after a :func:`deferred` block
such as a file being committed; the job then prints what it did and how to resume,
stops the local Ray it started and every process it started (never a cluster it
joined), and exits 130 (SIGINT) or 143 (SIGTERM).  A second signal kills this
process's own children and exits at once.

Ray installs its own handlers (``ray.init`` a SIGTERM one, Ray Train's ``fit`` a SIGINT
one that only asks the run to abort): :func:`install` is called again after those.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal; ``code`` is the exit status (128 + signal)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.code = 128 + signum
        self.done: list[str] = []  # what was finished, added by the layers it passes through
        super().__init__(f"stopped by {self.name}")


class _State:
    installed = False
    signum: int | None = None   # the first signal seen
    deferred = 0                # depth of deferred() blocks
    pending = False             # a signal arrived inside a deferred() block
    started = time.monotonic()


_state = _State()


def install() -> None:
    """Take SIGINT and SIGTERM (again, after a library replaced the handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    if not _state.installed:
        _state.started = time.monotonic()
    _state.installed = True


def reinstall() -> None:
    """:func:`install` again, only where a job installed the handlers."""
    if _state.installed:
        install()


def uninstall() -> None:
    if _state.installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _state.installed, _state.signum, _state.deferred, _state.pending = False, None, 0, False


def requested() -> int | None:
    """The signal that asked for a stop, or None."""
    return _state.signum


def seconds() -> float:
    return time.monotonic() - _state.started


def _handler(signum: int, frame) -> None:  # noqa: ANN001
    if _state.signum is not None:
        _exit_now(signum)
    _state.signum = signum
    if _state.deferred:
        _state.pending = True
        return
    raise Stopped(signum)


def _exit_now(signum: int) -> None:
    """The second signal: no more cleaning up."""
    try:
        os.write(2, f"\n{signal.Signals(signum).name} again: exiting now\n".encode())
    except OSError:
        pass
    kill_tree(descendants(os.getpid()), grace=0.0)
    os._exit(128 + (_state.signum or signum))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a first signal must not cut in half (committing a file): the stop is
    raised when it ends."""
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if _state.deferred == 0 and _state.pending:
        _state.pending = False
        raise Stopped(_state.signum or signal.SIGINT)


def wait_forever() -> None:
    """Sleep in the main thread until a signal raises :class:`Stopped`."""
    while True:
        time.sleep(3600)


def resume_command(extra: str | None = None, argv: list[str] | None = None) -> str:
    """This process's own command line, plus ``extra`` (e.g. ``--resume``) if absent."""
    argv = list(sys.argv if argv is None else argv)
    if extra and extra not in argv:
        argv.append(extra)
    return "python " + " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------- processes


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            out[int(name)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, …)."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for p, pp in _ppids().items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rfind(")") + 2:].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pids: list[int], grace: float = 2.0) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those still alive after ``grace`` s; returns those killed."""
    sent = []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        if sig == signal.SIGTERM and grace <= 0:
            continue
        for p in pids:
            if alive(p):
                with contextlib.suppress(OSError):
                    os.kill(p, sig)
                    sent.append(p)
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and any(alive(p) for p in pids):
            _reap(pids)
            time.sleep(0.05)
    _reap(pids)
    return sent


def _reap(pids: list[int]) -> None:
    """Collect the exit status of our own children (no zombies left behind)."""
    for p in pids:
        with contextlib.suppress(OSError):
            os.waitpid(p, os.WNOHANG)


def bounded(fn: Callable[[], object], timeout: float) -> bool:
    """Run ``fn`` in a daemon thread; True when it finished within ``timeout`` s."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except BaseException:  # noqa: BLE001 (cleanup: a failure is reported by the caller)
            pass
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="faceray-stop").start()
    return done.wait(timeout)
