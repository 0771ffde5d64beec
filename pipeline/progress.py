"""A long job you can watch: counts from what the actors finished, one progress line per
job, Ray's own noise kept out of the default output, the end summary beside the output.

- ``ProgressBoard``: a small named actor (``num_cpus=0``, namespace ``faceray``) the stages
  report each finished batch to (``board.add.remote(...)``, fire and forget).  It also
  exports the counts as Ray metrics (``faceray_photos``, ``faceray_faces``,
  ``faceray_photo_errors``, ``faceray_photos_planned``) for Ray's Prometheus / Grafana
  view, and keeps a short list of events (training epochs) for the driver to print.
- ``watch(label, total, ...)``: on the driver, a thread polls the board and draws a tqdm
  bar on a terminal, or prints one line every ``every`` seconds otherwise (``ray job
  submit``, CI, a log file): done / total, photos/s over the last minute and overall,
  ETA, faces, photos by status.
- ``quiet_ray(verbose)``: Ray's INFO lines, Ray Data's progress bars and logging, the C++
  "constructor arguments in the object store" error (ray-project/ray#57733, harmless for
  Ray Data's pools) and the token-auth-on-by-default notice stay out of the default
  output; warnings keep coming.  ``--verbose`` brings everything back.
- ``write_summary``: ``_summary.json`` beside the table (``_summary-<run>.json`` when one
  is there already: a ``--resume`` run never overwrites).  Readers of the table skip
  names starting with ``_``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

NAMESPACE = "faceray"
DEFAULT_EVERY_S = 10.0
WINDOW_S = 60.0
_defaults = {"every": DEFAULT_EVERY_S}


def configure(every: float | None = None) -> None:
    """A job's ``--progress-every``, for the watches deep inside it (training's embedding pass)."""
    if every:
        _defaults["every"] = float(every)

# ------------------------------------------------------------------ the counting actor


class ProgressBoard:
    """Counts what the stages finished (one call per batch) and exports them as metrics."""

    def __init__(self, job: str, run_id: str, total: int) -> None:
        from ray.util.metrics import Counter, Gauge

        self.job, self.run_id, self.total = job, run_id, int(total)
        self.photos = 0
        self.faces = 0
        self.by_status: dict[str, int] = {}
        self.batches = 0
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.events: list[dict] = []
        self._seen: set[int] = set()
        self._tags = {"job": job, "run": run_id}
        tag_keys = ("job", "run")
        self._m_photos = Counter("faceray_photos", "photos finished by the face stages, by status",
                                 tag_keys=(*tag_keys, "status"))
        self._m_faces = Counter("faceray_faces", "faces found", tag_keys=tag_keys)
        self._m_errors = Counter("faceray_photo_errors", "photos that could not be read or decoded, by status",
                                 tag_keys=(*tag_keys, "status"))
        self._m_total = Gauge("faceray_photos_planned", "photos this run will score", tag_keys=tag_keys)
        self._m_total.set(self.total, tags=self._tags)

    def add(self, key: int, photos: int, faces: int, by_status: dict[str, int]) -> None:
        """One finished batch.  ``key`` identifies the batch: a retried batch counts once."""
        from pipeline.contract import NO_FACE, OK

        if key in self._seen:
            self.duplicates += 1
            return
        self._seen.add(key)
        now = time.time()
        self.first_at = self.first_at or now
        self.last_at = now
        self.batches += 1
        self.photos += photos
        self.faces += faces
        for status, n in by_status.items():
            self.by_status[status] = self.by_status.get(status, 0) + n
            self._m_photos.inc(n, tags={**self._tags, "status": status})
            if status not in (OK, NO_FACE):
                self._m_errors.inc(n, tags={**self._tags, "status": status})
        if faces:
            self._m_faces.inc(faces, tags=self._tags)

    def event(self, data: dict) -> None:
        """Something for the driver to print (a training epoch)."""
        self.events.append(dict(data, at=time.time()))

    def snapshot(self, events_from: int = 0) -> dict[str, Any]:
        return {"job": self.job, "run_id": self.run_id, "total": self.total, "photos": self.photos,
                "faces": self.faces, "by_status": dict(self.by_status), "batches": self.batches,
                "duplicates": self.duplicates, "first_at": self.first_at, "last_at": self.last_at,
                "events": self.events[events_from:], "event_count": len(self.events)}

    def metric_names(self) -> list[str]:
        return ["faceray_photos", "faceray_faces", "faceray_photo_errors", "faceray_photos_planned"]


def create_board(job: str, run_id: str, total: int):
    """The run's board: a named actor in namespace ``faceray`` (``ray.get_actor(
    f"{job}-{run_id}", namespace="faceray")`` from another driver), gone with this driver."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard)
    return cls.options(name=f"{job}-{run_id}", namespace=NAMESPACE).remote(job, run_id, total)


def report_batch(board, photos) -> None:
    """Called by the stages for each finished batch of photo rows (``table.PHOTO_SCHEMA``):
    fire and forget, never fails the batch."""
    if board is None or photos.num_rows == 0:
        return
    try:
        import pyarrow.compute as pc

        uris = photos.column("image_uri")
        key = hash((uris[0].as_py(), uris[-1].as_py(), photos.num_rows))
        n = photos.num_rows
        if "segment" in photos.schema.names and photos.column("segment").null_count < n:
            # a video segment (a manifest row) is one item, however many frames it gave
            seg = photos.column("segment")
            items = {(u, s) for u, s in zip(uris.to_pylist(), seg.to_pylist()) if s is not None}
            n = seg.null_count + len(items)
        faces = int(pc.sum(photos.column("face_count")).as_py() or 0)
        counts = pc.value_counts(photos.column("status"))
        by_status = {v["values"].as_py(): v["counts"].as_py() for v in counts}
        board.add.remote(key, n, faces, by_status)
    except Exception:  # progress is never worth a lost batch
        pass


# ------------------------------------------------------------------ the driver's view


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}")


def fmt_status(by_status: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


class Rates:
    """photos/s over the last minute and since the start, and the ETA they give."""

    def __init__(self, started: float, window_s: float = WINDOW_S) -> None:
        self.started, self.window_s = started, window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()

    def recent(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 - t0 >= 1.0 else None

    def overall(self, now: float, done: int) -> float:
        return done / max(now - self.started, 1e-9)

    def eta(self, now: float, done: int, total: int) -> float | None:
        rate = self.recent() or self.overall(now, done)
        if done >= total:
            return 0.0
        return (total - done) / rate if rate > 0 else None


def progress_line(label: str, snap: dict, now: float, rates: Rates) -> str:
    """``scoring: 120/300 photos (40%) [0:00:42] | 3.1 photos/s last min, 2.9 overall | ETA 0:00:58 | 480 faces | ok 118, no_face 2``"""
    done, total = snap["photos"], snap["total"]
    pct = f"{100 * done / total:.0f}%" if total else "-"
    head = f"{label}: {done:,}/{total:,} photos ({pct}) [{fmt_duration(now - rates.started)}]"
    if done == 0:
        return f"{head} | starting (actors load their models) | 0 faces"
    recent = rates.recent()
    rate = (f"{recent:.1f} photos/s last min, " if recent is not None else "") + \
           f"{rates.overall(now, done):.1f} overall"
    return (f"{head} | {rate} | ETA {fmt_duration(rates.eta(now, done, total))} | "
            f"{snap['faces']:,} faces | {fmt_status(snap['by_status'])}")


def use_bar(stream: TextIO | None = None) -> bool:
    """A tqdm bar on a terminal; ``FACERAY_PROGRESS=log`` forces lines, ``=bar`` the bar."""
    forced = os.environ.get("FACERAY_PROGRESS", "").lower()
    if forced in ("log", "bar"):
        return forced == "bar"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Watch:
    """The driver's side: polls the board from a thread while the job's main work runs."""

    def __init__(self, board, label: str, total: int, every: float | None = None,
                 log: Callable[[str], None] | None = None, bar: bool | None = None,
                 on_event: Callable[[dict], str | None] | None = None, counts: bool = True) -> None:
        self.board, self.label, self.total = board, label, int(total)
        self.every = max(0.2, float(every or _defaults["every"]))
        self.counts = counts  # False: only the board's events are printed (training epochs)
        self.log = log or (lambda m: print(m, flush=True))
        self.bar_mode = use_bar() if bar is None else bar
        self.on_event = on_event
        self.started = time.monotonic()
        self.rates = Rates(self.started)
        self.last: dict = {"photos": 0, "faces": 0, "by_status": {}, "total": self.total}
        self._events = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    # one poll: the board's counts, plus any new events printed
    def poll(self, timeout: float = 10.0) -> dict:
        import ray

        try:
            snap = ray.get(self.board.snapshot.remote(self._events), timeout=timeout)
        except Exception:  # a slow or gone board: keep the last figures
            return self.last
        snap["total"] = self.total
        self._events = snap.get("event_count", self._events)
        for ev in snap.get("events", []):
            text = self.on_event(ev) if self.on_event else None
            if text:
                self._say(text)
        self.last = snap
        self.rates.add(time.monotonic(), snap["photos"])
        return snap

    def _say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            self.log(text)

    def _draw(self, snap: dict) -> None:
        if not self.counts:
            return
        now = time.monotonic()
        if self._bar is not None:
            b = self._bar
            b.n = min(snap["photos"], self.total) if self.total else snap["photos"]
            recent = self.rates.recent()
            done = snap["photos"]
            parts = []
            if done:
                if recent is not None:
                    parts.append(f"{recent:.1f}/s last min")
                parts.append(f"{self.rates.overall(now, done):.1f}/s overall")
                parts.append(f"ETA {fmt_duration(self.rates.eta(now, done, self.total))}")
                parts.append(f"{snap['faces']:,} faces")
                parts.append(fmt_status(snap["by_status"]))
            else:
                parts.append("starting (actors load their models)")
            b.set_postfix_str(", ".join(parts), refresh=False)
            b.refresh()
        else:
            self.log(progress_line(self.label, snap, now, self.rates))

    def _run(self) -> None:
        step = 1.0 if self._bar is not None or not self.counts else self.every
        while not self._stop.wait(step):
            self._draw(self.poll())

    def start(self) -> "Watch":
        if self.bar_mode and self.counts:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.label, unit="photo", dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                             file=sys.stderr, mininterval=0)
        self._draw(self.last)  # the first line: the total, known from the start
        self._thread = threading.Thread(target=self._run, name=f"faceray-progress-{self.label}", daemon=True)
        self._thread.start()
        return self

    def stop(self, final: bool = True) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        snap = self.poll()
        if final:
            self._draw(snap)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return snap


@contextmanager
def watch(job: str, run_id: str, label: str, total: int, every: float | None = None,
          log: Callable[[str], None] | None = None, bar: bool | None = None,
          on_event: Callable[[dict], str | None] | None = None, counts: bool = True,
          board=None) -> Iterator[Watch]:
    """Create the run's board (or take ``board``) and watch it while the body runs; ``w.board``
    goes to the stages, ``w.last`` holds the final counts afterwards; the board goes at the end."""
    import ray

    board = board or create_board(job, run_id, total)
    w = Watch(board, label, total, every, log, bar, on_event, counts).start()
    ok = False
    try:
        yield w
        ok = True
    finally:
        try:
            w.stop(final=ok)
        finally:
            try:
                ray.kill(board)
            except Exception:
                pass


def new_run_id() -> str:
    import uuid

    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------ Ray's noise


_NOISE = (
    re.compile(r"Token authentication is enabled for this Ray cluster"),  # on by default, nothing to do
    re.compile(r"^Progress bars disabled\. To enable"),  # we turned them off: our own line replaces them
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in _NOISE)


_quiet = {"verbose": None}


def quiet_ray(verbose: bool = False) -> dict[str, Any]:
    """Before ``ray.init`` in a job's driver: keep Ray's INFO chatter, Ray Data's progress
    bars and the C++ actor-argument error out of the output unless ``verbose``.  Returns
    the ``ray.init`` keyword arguments that go with it (``log_to_driver``,
    ``logging_level``).  Warnings (``WARNING`` and up) keep coming either way."""
    import ray  # noqa: F401
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(verbose)
    ctx.execution_options.verbose_progress = False
    _quiet["verbose"] = verbose
    if verbose:
        return {"log_to_driver": True, "logging_level": logging.INFO}
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    quiet_ray_data()
    drop = _DropNoise()
    for name in ("ray", "ray._private.authentication.authentication_token_setup"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in lg.filters):
            lg.addFilter(drop)
    for h in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _DropNoise) for f in h.filters):
            h.addFilter(drop)
    logging.getLogger("ray").setLevel(logging.WARNING)
    _quiet_driver_core_worker()
    # workers' stdout/stderr stay in the session's log files (and the dashboard), not here
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's console handler to WARNING (its ray-data.log file keeps everything)."""
    if _quiet["verbose"] is not False:
        return
    lg = logging.getLogger("ray.data")
    if not any(isinstance(f, _DropNoise) for f in lg.filters):
        lg.addFilter(_DropNoise())
    for h in lg.handlers:
        if not any(isinstance(f, _DropNoise) for f in h.filters):
            h.addFilter(_DropNoise())
        if type(h).__name__ == "PlainRayHandler" or isinstance(h, logging.StreamHandler) and \
                not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)


def _quiet_driver_core_worker() -> None:
    """The driver's C++ core worker logs ERROR lines to stderr that are not errors for a
    user (ray-project/ray#57733: Ray Data's own pool actors always trigger one).  Only this
    process's core worker gets ``RAY_BACKEND_LOG_LEVEL=fatal``: the variable is set just
    around ``connect`` (after a local Ray's GCS and raylet started, so they and the workers
    keep their levels), and the one line the C++ logger prints about the setting is dropped."""
    import ray._private.worker as rw

    if getattr(rw.connect, "_faceray_quiet", False) or "RAY_BACKEND_LOG_LEVEL" in os.environ:
        return
    original = rw.connect

    def connect(*args, **kwargs):
        import tempfile

        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                return original(*args, **kwargs)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
                tmp.seek(0)
                for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                    if "RAY_BACKEND_LOG_LEVEL" not in line:
                        sys.stderr.write(line)
                sys.stderr.flush()

    connect._faceray_quiet = True  # type: ignore[attr-defined]
    rw.connect = connect


# ------------------------------------------------------------------ the end summary


def faceray_version() -> str:
    try:
        from importlib.metadata import version

        return version("faceray")
    except Exception:
        try:
            import tomllib
            from pathlib import Path

            with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except Exception:
            return "unknown"


def command_line(argv: list[str] | None = None) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in (sys.argv if argv is None else argv))


def write_summary(output_uri: str, data: dict, run_id: str) -> str:
    """``_summary.json`` beside the table, or ``_summary-<run>.json`` when one is there
    (a ``--resume`` run adds its own).  Returns the name written."""
    import pyarrow.fs as pafs

    from pipeline import storage

    fs, path = storage.resolve(output_uri)
    name = "_summary.json"
    if fs.get_file_info(f"{path}/{name}").type != pafs.FileType.NotFound:
        name = f"_summary-{run_id}.json"
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
    return name


def epoch_line(ev: dict) -> str:
    """``epoch 3/60: train loss 0.412 | val identity@linear acc 0.931, identity@mlp acc 0.945 | 1.2 s``
    from the metrics a Train worker reports (``ddp.train_loop``)."""
    vals = []
    for k, v in ev.items():
        m = re.fullmatch(r"val_(.+)_(acc|mae)", k)
        if m and v == v:
            vals.append(f"{m[1]} {m[2]} {v:.3f}")
    tail = " (stopping: no validation gain)" if ev.get("stopped") and ev.get("epoch", 0) + 1 < ev.get("epochs", 0) else ""
    return (f"epoch {ev.get('epoch', 0) + 1}/{ev.get('epochs', '?')} (max): train loss {ev.get('train_loss', float('nan')):.4f}"
            f" | val {', '.join(vals) or '-'} | {ev.get('rows_per_s_per_worker', 0):,.0f} rows/s/worker"
            f" | {ev.get('epoch_seconds', 0):.2f} s{tail}")


class Heartbeat:
    """For jobs made of phases that log when each ends (cluster_faces): passes each line
    through and, after ``every`` seconds without one, says the job is still working, for
    how long, and what finished last."""

    def __init__(self, label: str, every: float | None = None, log: Callable[[str], None] | None = None) -> None:
        self.label, self.every = label, max(0.2, float(every or _defaults["every"]))
        self._log = log or (lambda m: print(m, flush=True))
        self.started = self._last_at = time.monotonic()
        self._last = "started"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"faceray-heartbeat-{label}", daemon=True)

    def log(self, msg: str) -> None:
        self._last, self._last_at = msg.split(":", 1)[0].split(" ", 1)[0] or msg, time.monotonic()
        self._log(msg)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            now = time.monotonic()
            if now - self._last_at >= self.every - 0.05:
                self._log(f"{self.label}: working [{fmt_duration(now - self.started)}]; last step {self._last} "
                          f"finished {fmt_duration(now - self._last_at)} ago")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
