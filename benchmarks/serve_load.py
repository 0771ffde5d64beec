"""Bounded load test of the HTTP endpoint against the batch job, loopback only, one run:

1. the batch job (``pipeline.scoring.score``, the same Ray, before the app takes the cores)
   on P/2 and P of a pool of portraits, twice: its **marginal photos/s** (fixed start-up
   cancelled out);
2. POST /v1/faces with those portraits only, at 1, 4, 16 and 64 concurrent clients
   (``--sweep``): photos/s, p50/p99, and the **ratio** to the batch job's photos/s;
3. the mixed run (``--clients``, ``--seconds``): real photos (portraits, group photos)
   plus bad requests (empty, text, truncated JPEG, a PNG header claiming 3.6 gigapixels,
   a body over the cap, a missing token) and, with a table, lookups.

503 with ``Retry-After`` is the designed answer of a full replica: the clients wait as told
and it is counted apart.  Exit 1 on any other 5xx or a transport error, and (sweep) when
the ratio is under 0.6 or p99 at 16 clients is ≥ 4× the single-request p50.

    .venv/bin/python benchmarks/serve_load.py                       # starts Ray + the app
    .venv/bin/python benchmarks/serve_load.py --seconds 30 --clients 32 --model DIR --table DIR
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --sweep ''   # a running endpoint
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import struct
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Case:
    """One kind of request: method, path, body and headers, and how often it is sent."""

    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    auth: bool = True


@dataclass
class LoadResult:
    seconds: float
    clients: int
    statuses: Counter = field(default_factory=Counter)
    by_kind: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    kind_status: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    transport_errors: Counter = field(default_factory=Counter)
    designed_503: int = 0          # 503 + Retry-After: a full replica, by design
    native_503: int = 0            # of those, Serve's own (plain text) rather than our JSON
    photos_ok: Counter = field(default_factory=Counter)  # 200s per kind
    cpu_seconds: float = 0.0       # the server side's (local Ray's) CPU time during the run

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        """5xx other than the designed 503s."""
        return sum(n for s, n in self.statuses.items() if s >= 500) - self.designed_503

    def ok_latencies(self, kind: str) -> np.ndarray:
        return np.asarray(self.ok_ms.get(kind) or [np.nan])

    ok_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def lines(self) -> list[str]:
        lat = np.concatenate([np.asarray(v) for v in self.by_kind.values()]) if self.by_kind else np.zeros(1)
        out = [f"{self.requests} requests in {self.seconds:.1f} s with {self.clients} clients: "
               f"{self.requests / self.seconds:.1f} req/s, p50 {np.percentile(lat, 50):.0f} ms, "
               f"p99 {np.percentile(lat, 99):.0f} ms",
               f"status codes: {dict(sorted(self.statuses.items()))}; 503 + Retry-After (designed): "
               f"{self.designed_503} ({self.native_503} Serve's plain-text); other 5xx: {self.server_errors}; "
               f"transport errors: {dict(self.transport_errors) or 0}"]
        for kind in sorted(self.by_kind):
            v = np.asarray(self.by_kind[kind])
            out.append(f"  {kind:16s} n={len(v):5d}  p50 {np.percentile(v, 50):6.0f} ms  "
                       f"p99 {np.percentile(v, 99):6.0f} ms  {dict(self.kind_status[kind])}")
        return out


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF))


def default_cases(data_dir: Path, max_body: int = 20 * 1024 * 1024, image_uris: list[str] | None = None,
                  labels: dict[str, str] | None = None, portraits: int = 24) -> list[Case]:
    """Mostly good photos, ~15 % bad requests, and lookups when a table is given."""
    rng = random.Random(0)
    people = sorted((data_dir / "identities").rglob("*.jpg"))
    groups = sorted((data_dir / "groups" / "images").rglob("*.jpg"))[:4]
    cases = [Case("portrait", "POST", "/v1/faces", p.read_bytes(), {"content-type": "image/jpeg"}, 6.0 / portraits)
             for p in rng.sample(people, min(portraits, len(people)))]
    cases += [Case("group", "POST", "/v1/faces", p.read_bytes(), {"content-type": "image/jpeg"}, 1.0 / len(groups))
              for p in groups]
    jpeg = cases[0].body
    cases += [
        Case("bad:empty", "POST", "/v1/faces", b"", {}, 0.3),
        Case("bad:text", "POST", "/v1/faces", b"this is not a photo\n", {"content-type": "text/plain"}, 0.3),
        Case("bad:truncated", "POST", "/v1/faces", jpeg[: len(jpeg) // 3], {"content-type": "image/jpeg"}, 0.3),
        Case("bad:pixels", "POST", "/v1/faces", png_header_only(60000, 60000), {"content-type": "image/png"}, 0.3),
        Case("bad:too_big", "POST", "/v1/faces", b"\xff\xd8\xff" + b"\0" * max_body, {"content-type": "image/jpeg"}, 0.05),
        Case("bad:no_token", "POST", "/v1/faces", jpeg, {"content-type": "image/jpeg"}, 0.2, auth=False),
        Case("health", "GET", "/healthz", weight=0.1, auth=False),
    ]
    from urllib.parse import urlencode

    for uri in (image_uris or [])[:20]:
        cases.append(Case("lookup:uri", "GET", "/v1/predictions?" + urlencode({"image_uri": uri}), weight=0.5 / 20))
    for col, value in (labels or {}).items():
        cases.append(Case("lookup:label", "GET", "/v1/predictions?" + urlencode({col: value, "limit": 50}),
                          weight=0.5 / max(1, len(labels or {}))))
    return cases


async def _client(http, cases: list[Case], weights: list[float], deadline: float, token: str | None,
                  result: LoadResult, rng: random.Random) -> None:
    import httpx

    while time.monotonic() < deadline:
        case = rng.choices(cases, weights)[0]
        headers = dict(case.headers)
        if token and case.auth:
            headers["authorization"] = f"Bearer {token}"
        t = time.perf_counter()
        try:
            r = await http.request(case.method, case.path, content=case.body or None, headers=headers)
            status = r.status_code
        except httpx.HTTPError as exc:
            result.transport_errors[f"{case.kind}:{type(exc).__name__}"] += 1
            continue
        ms = (time.perf_counter() - t) * 1000
        result.by_kind[case.kind].append(ms)
        result.statuses[status] += 1
        result.kind_status[case.kind][status] += 1
        if status == 200:
            result.photos_ok[case.kind] += 1
            result.ok_ms[case.kind].append(ms)
        retry = r.headers.get("retry-after", "")
        if status == 503 and retry.isdigit():
            result.designed_503 += 1   # full: the service said when to come back; wait as told
            if not r.headers.get("content-type", "").startswith("application/json"):
                result.native_503 += 1  # Serve's own queue limit (plain text), not our JSON shape
            await asyncio.sleep(min(float(retry), max(0.0, deadline - time.monotonic())))


async def _run(base_urls: list[str], cases: list[Case], seconds: float, clients: int,
               token: str | None) -> LoadResult:
    import httpx

    result = LoadResult(seconds, clients)
    weights = [c.weight for c in cases]
    per = -(-clients // len(base_urls))
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    https = [httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for u in base_urls]
    try:
        started = time.monotonic()
        # client i talks to address i mod n (direct ingress: one per replica, no balancer)
        await asyncio.gather(*(_client(https[i % len(https)], cases, weights, started + seconds, token, result,
                                       random.Random(i)) for i in range(clients)))
        result.seconds = time.monotonic() - started
    finally:
        for http in https:
            await http.aclose()
    return result


def run_load(base_url: str | list[str], cases: list[Case], seconds: float = 30, clients: int = 32,
             token: str | None = None) -> LoadResult:
    """Drive the endpoint (one address, or several spread over the clients) for ``seconds``
    with ``clients`` concurrent connections."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    for u in urls:
        if not u.startswith(("http://127.", "http://localhost")):
            raise ValueError(f"loopback only: {u}")
    return asyncio.run(_run(urls, cases, seconds, clients, token))


def direct_ingress_urls(app_name: str) -> list[str]:
    """Direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): each ingress replica serves
    HTTP on its own port; their addresses, from the Serve controller, each checked to be
    listening on 127.0.0.1 only (``ss -ltn``; nothing bound to a wildcard or another address)."""
    import subprocess

    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    targets = [t for g in groups if g.app_name == app_name for t in g.targets]
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout.split("\n")
    urls = []
    for t in targets:
        binds = {line.split()[3].rsplit(":", 1)[0] for line in listening
                 if len(line.split()) > 3 and line.split()[3].rsplit(":", 1)[1] == str(t.port)}
        if t.ip != "127.0.0.1" or binds != {"127.0.0.1"}:
            raise RuntimeError(f"direct ingress replica {t.name} listens on {sorted(binds) or t.ip}:{t.port}, "
                               "not on 127.0.0.1 only")
        urls.append(f"http://127.0.0.1:{t.port}")
    if not urls:
        raise RuntimeError(f"direct ingress: no replica address for {app_name} ({groups})")
    return urls


class CpuMeter:
    """CPU seconds (user + system) of this process's descendants — the local Ray: GCS,
    raylet, workers, Serve's proxy and replicas, the batch job's actors — and of this
    process (the batch job's driver; left out for the endpoint, where it runs the clients).
    Sampled every ``every`` s and kept after a process ends (Ray Data's actors end with each
    job), so at most the last ``every`` s of a process that ends is missed.  Photos per
    CPU-second hardly move with other people's load on the machine; photos/s do."""

    def __init__(self, every: float = 0.25) -> None:
        import threading

        self.every, self.me, self.tick = every, os.getpid(), os.sysconf("SC_CLK_TCK")
        self.seen: dict[tuple[int, str], float] = {}
        self._lock = threading.Lock()
        self.sample()
        threading.Thread(target=self._loop, daemon=True, name="cpu-meter").start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.every)
            self.sample()

    def sample(self) -> None:
        stats: dict[int, tuple[int, str, float]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d.name)] = (int(f[1]), f[19], (int(f[11]) + int(f[12])) / self.tick)
        kids: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _, _) in stats.items():
            kids[ppid].append(pid)
        todo, tree = [self.me], []
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += kids[pid]
        with self._lock:
            for pid in tree:
                key = (pid, stats[pid][1])   # pid and start time: a reused pid is another process
                self.seen[key] = max(self.seen.get(key, 0.0), stats[pid][2])

    def total(self, self_too: bool = True) -> float:
        self.sample()
        with self._lock:
            return sum(v for (pid, _), v in self.seen.items() if self_too or pid != self.me)


_METER: CpuMeter | None = None


def tree_cpu_seconds(self_too: bool = True) -> float:
    """``CpuMeter.total`` of the one meter of this process (started on the first call)."""
    global _METER
    if _METER is None:
        _METER = CpuMeter()
    return _METER.total(self_too)


def portrait_pool(data_dir: Path, n: int) -> list[Path]:
    """The portraits both the batch job and the endpoint get (every k-th LFW photo)."""
    files = sorted((data_dir / "identities").rglob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def portrait_cases(files: list[Path]) -> list[Case]:
    return [Case("portrait", "POST", "/v1/faces", f.read_bytes(), {"content-type": "image/jpeg"}) for f in files]


def batch_marginal(files: list[Path], model: str | None, repeats: int = 2) -> tuple[float, float, list[str]]:
    """The batch job's marginal photos/s on ``files``: the job on the first half and on all of
    them (after a small warm-up job: the first dataset of a process pays ~6 s once), each
    ``repeats`` times, fastest wall kept; (n_all - n_half) / (t_all - t_half); and the same
    per CPU-second (least CPU kept: ``tree_cpu_seconds``)."""
    import tempfile

    from pipeline.scoring import score

    lines, best, cpu = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        for k, n in enumerate([min(16, len(files))] + [len(files) // 2, len(files)] * repeats):
            src = Path(tmp) / f"in{k}"
            src.mkdir()
            for i, f in enumerate(files[:n]):
                (src / f"{i:05d}_{f.name}").symlink_to(f)
            t, c = time.perf_counter(), tree_cpu_seconds()
            summary = score(str(src), str(Path(tmp) / f"out{k}"), model_uri=model, log=lambda *_: None)
            wall, used = time.perf_counter() - t, tree_cpu_seconds() - c
            if k:
                best[n] = min(best.get(n, wall), wall)
                cpu[n] = min(cpu.get(n, used), used)
            lines.append(f"batch job{' (warm-up)' if not k else ''}: {n} portraits in {wall:.1f} s, "
                         f"{used:.1f} CPU-s ({getattr(summary, 'faces', '?')} faces)")
    (n1, t1), (n2, t2) = sorted(best.items())
    marginal = (n2 - n1) / max(1e-9, t2 - t1)
    per_cpu = (n2 - n1) / max(1e-9, cpu[n2] - cpu[n1])
    lines.append(f"batch job marginal: {marginal:.1f} photos/s ((n {n2} - {n1}) / ({t2:.1f} - {t1:.1f} s), "
                 f"fastest of {repeats}); {per_cpu:.1f} photos per CPU-second "
                 f"({n2 - n1} / ({cpu[n2]:.1f} - {cpu[n1]:.1f}), least of {repeats})")
    return marginal, per_cpu, lines


def sweep(url: str | list[str], files: list[Path], levels: list[int], seconds: float, token: str | None
          ) -> tuple[dict[int, LoadResult], list[str]]:
    """POST /v1/faces with the pool's portraits at each client count."""
    cases = portrait_cases(files)
    out, lines = {}, []
    run_load(url, cases, min(3.0, seconds), max(levels), token)  # warm-up: threads, batches, connections
    for n in levels:
        c = tree_cpu_seconds(self_too=False)
        r = run_load(url, cases, seconds, n, token)
        r.cpu_seconds = tree_cpu_seconds(self_too=False) - c
        out[n] = r
        lat = r.ok_latencies("portrait")
        per_cpu = f"  {r.photos_ok['portrait'] / r.cpu_seconds:6.1f} photos/CPU-s" if r.cpu_seconds > 0 else ""
        lines.append(f"{n:3d} clients: {r.photos_ok['portrait'] / r.seconds:6.1f} photos/s{per_cpu}  p50 "
                     f"{np.nanpercentile(lat, 50):5.0f} ms  p99 {np.nanpercentile(lat, 99):5.0f} ms  "
                     f"503+Retry-After {r.designed_503} (Serve's {r.native_503})  other 5xx {r.server_errors}  "
                     f"transport errors {sum(r.transport_errors.values())}  codes {dict(sorted(r.statuses.items()))}")
    return out, lines


def _table_samples(table_uri: str) -> tuple[list[str], dict[str, str]]:
    """Some URIs and one (task, label) of a prediction table, for lookup requests."""
    from serve.lookup import PredictionIndex

    index = PredictionIndex.load(table_uri)
    uris = sorted(set(index.table.column("image_uri").to_pylist()))[:20]
    labels = {}
    for name, g in index.filters.items():
        if g.spans:
            labels[name] = max(g.spans, key=lambda v: g.spans[v][1] - g.spans[v][0])
    return uris, labels


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import data_dir, header

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="the mixed run (0: skip it)")
    p.add_argument("--clients", type=int, default=16, help="clients of the mixed run")
    p.add_argument("--sweep", default="1,4,16,64", help="client counts of the portraits sweep ('' : skip)")
    p.add_argument("--sweep-seconds", type=float, default=12.0)
    p.add_argument("--portraits", type=int, default=800, help="pool of portraits (batch job: half, then all)")
    p.add_argument("--no-batch", action="store_true", help="skip the batch job (no ratio)")
    p.add_argument("--url", help="a running endpoint (loopback); default: start Ray + the app here")
    p.add_argument("--model", help="model bundle for the app started here")
    p.add_argument("--table", help="prediction table for the app started here (also adds lookups)")
    p.add_argument("--token", default=os.environ.get("FACERAY_API_TOKEN") or "load-test-token")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--direct", action="store_true",
                   help="Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1 for the Ray started here): "
                        "the clients talk to the FacePipeline replicas' own 127.0.0.1 ports, no proxy hop")
    p.add_argument("--replicas", type=int, help="FacePipeline replicas (default: serve_plan)")
    args = p.parse_args(argv)
    header("serve_load: the HTTP endpoint under concurrent clients, next to the batch job")
    try:
        print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    except OSError:
        pass
    uris, labels = _table_samples(args.table) if args.table else ([], {})
    cases = default_cases(data_dir(), image_uris=uris, labels=labels)
    pool = portrait_pool(data_dir(), args.portraits)
    levels = [int(x) for x in args.sweep.split(",") if x.strip()]
    started_here = args.url is None
    url = args.url
    marginal, marginal_cpu, ok, targets = None, None, True, True
    if started_here:
        import socket

        for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
            os.environ.setdefault(k, v)   # before the first `import ray`, which reads them
        if args.direct:
            os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # read by Serve's processes at start
        import ray
        from ray import serve

        from pipeline.resources import serve_plan
        from serve.app import APP_NAME, build_app

        ray.init(num_cpus=args.num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
        if levels and not args.no_batch:  # first, alone on the cores: Serve's replicas would hold them
            marginal, marginal_cpu, lines = batch_marginal(pool, args.model)
            print("\n".join(lines), flush=True)
        print(f"endpoint plan: {serve_plan(ray.cluster_resources(), replicas=args.replicas).describe()}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": args.model, "table": args.table, "token": args.token,
                             "replicas": args.replicas}), name=APP_NAME, route_prefix="/")
        print(f"app ready in {time.monotonic() - t:.1f} s on 127.0.0.1:{port}", flush=True)
        url = f"http://127.0.0.1:{port}"
        if args.direct:
            url = direct_ingress_urls(APP_NAME)
            print(f"direct ingress: clients spread over {', '.join(url)} (each bound to 127.0.0.1 only)", flush=True)
    try:
        results, lines = sweep(url, pool, levels, args.sweep_seconds, args.token) if levels else ({}, [])
        print("\n".join(lines), flush=True)
        mixed = run_load(url, cases, args.seconds, args.clients, args.token) if args.seconds > 0 else None
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
    for r in results.values():
        ok &= r.server_errors == 0 and not r.transport_errors
    if results:
        rates = {n: r.photos_ok["portrait"] / r.seconds for n, r in results.items()}
        best = max(rates, key=rates.get)
        if marginal:
            ratio = rates[best] / marginal
            per_level = "".join(f"; {n} clients {v / marginal:.2f}" for n, v in rates.items())
            print(f"ratio endpoint / batch job: {rates[best]:.1f} / {marginal:.1f} = {ratio:.2f} "
                  f"(best, {best} clients; target ≥ 0.6){per_level}")
            targets &= ratio >= 0.6
        if marginal_cpu and started_here:
            cpu_rates = {n: r.photos_ok["portrait"] / r.cpu_seconds for n, r in results.items() if r.cpu_seconds > 0}
            if cpu_rates:
                top = max(cpu_rates, key=cpu_rates.get)
                print(f"per CPU-second (load-independent; the clients' CPU not counted): endpoint / batch job "
                      f"{cpu_rates[top]:.1f} / {marginal_cpu:.1f} = {cpu_rates[top] / marginal_cpu:.2f} "
                      f"(best, {top} clients)" + "".join(f"; {n} clients {v / marginal_cpu:.2f}"
                                                          for n, v in cpu_rates.items()))
        if 1 in results and 16 in results:
            single = float(np.nanpercentile(results[1].ok_latencies("portrait"), 50))
            p99 = float(np.nanpercentile(results[16].ok_latencies("portrait"), 99))
            print(f"p99 at 16 clients / single-request p50: {p99:.0f} / {single:.0f} ms = {p99 / single:.1f}× "
                  f"(target < 4×)")
            targets &= p99 < 4 * single
    if mixed is not None:
        print("mixed run:")
        for line in mixed.lines():
            print(line)
        ok &= mixed.server_errors == 0 and not mixed.transport_errors
    print("errors:", "none (no 5xx but the designed 503s, no transport errors)" if ok else "FAIL: see above")
    print("targets:", "met" if targets else "MISSED (ratio ≥ 0.6, p99 at 16 clients < 4× single)")
    return 0 if ok else 1   # a missed speed target is a figure to report, not a broken run


if __name__ == "__main__":
    sys.exit(main())
