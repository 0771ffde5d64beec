"""Bounded load test of the HTTP endpoint against the batch job, loopback only, one run:

1. the batch job (``pipeline.scoring.score``, the same Ray, before the app takes the cores)
   on 2P and 4P photos (a pool of P portraits read over), 3 times: its **marginal photos/s**
   (fixed start-up cancelled out);
2. the endpoint as ``jobs/serve_api.py`` starts it on a Ray it starts (one node: the one
   FacePipeline replica answers the one URL itself, ``serve.ingress``; ``--proxy``: Serve's
   proxy in front, as on a multi-node cluster), and POST /v1/faces to that URL with those
   portraits only, at 1, 4, 16 and 64 concurrent clients (``--sweep``): photos/s, p50/p99,
   and the **ratio** to the batch job's photos/s;
3. the mixed run (``--clients``, ``--seconds``): real photos (portraits, group photos)
   plus bad requests (empty, text, truncated JPEG, a PNG header claiming 3.6 gigapixels,
   a body over the cap, a missing token) and, with a table, lookups.

503 with ``Retry-After`` is the designed answer of a full replica: the clients wait as told
and it is counted apart.  Exit 1 on any other 5xx or a transport error; the targets (ratio
≥ 0.6, p99 at 16 clients < 4× the single-request p50) are printed met / MISSED.

    .venv/bin/python benchmarks/serve_load.py                       # starts Ray + the app
    .venv/bin/python benchmarks/serve_load.py --proxy               # the same behind Serve's proxy
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


async def _send(http, case: Case, headers: dict[str, str]) -> tuple[int, dict]:
    """One request with either client library: (status, headers); raises its transport errors."""
    if hasattr(http, "aclose"):  # httpx.AsyncClient
        r = await http.request(case.method, case.path, content=case.body or None, headers=headers)
        return r.status_code, r.headers
    async with http.request(case.method, case.path, data=case.body or None, headers=headers) as r:
        await r.read()
        return r.status, r.headers


async def _client(http, cases: list[Case], weights: list[float], deadline: float, token: str | None,
                  result: LoadResult, rng: random.Random) -> None:
    import aiohttp
    import httpx

    while time.monotonic() < deadline:
        case = rng.choices(cases, weights)[0]
        headers = dict(case.headers)
        if token and case.auth:
            headers["authorization"] = f"Bearer {token}"
        t = time.perf_counter()
        try:
            status, rheaders = await _send(http, case, headers)
        except (httpx.HTTPError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result.transport_errors[f"{case.kind}:{type(exc).__name__}"] += 1
            continue
        ms = (time.perf_counter() - t) * 1000
        result.by_kind[case.kind].append(ms)
        result.statuses[status] += 1
        result.kind_status[case.kind][status] += 1
        if status == 200:
            result.photos_ok[case.kind] += 1
            result.ok_ms[case.kind].append(ms)
        retry = rheaders.get("retry-after", "")
        if status == 503 and retry.isdigit():
            result.designed_503 += 1   # full: the service said when to come back; wait as told
            if not rheaders.get("content-type", "").startswith("application/json"):
                result.native_503 += 1  # Serve's own queue limit (plain text), not our JSON shape
            await asyncio.sleep(min(float(retry), max(0.0, deadline - time.monotonic())))


async def _run(base_urls: list[str], cases: list[Case], seconds: float, clients: int,
               token: str | None, library: str = "aiohttp") -> LoadResult:
    result = LoadResult(seconds, clients)
    weights = [c.weight for c in cases]
    per = -(-clients // len(base_urls))
    if library == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        https = [httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for u in base_urls]
    else:  # about half httpx's CPU per request: the clients share the server's cores here
        import aiohttp

        https = [aiohttp.ClientSession(base_url=u, timeout=aiohttp.ClientTimeout(total=120),
                                       connector=aiohttp.TCPConnector(limit=per)) for u in base_urls]
    try:
        started = time.monotonic()
        # client i talks to address i mod n
        await asyncio.gather(*(_client(https[i % len(https)], cases, weights, started + seconds, token, result,
                                       random.Random(i)) for i in range(clients)))
        result.seconds = time.monotonic() - started
    finally:
        for http in https:
            await (http.aclose() if hasattr(http, "aclose") else http.close())
    return result


def run_load(base_url: str | list[str], cases: list[Case], seconds: float = 30, clients: int = 32,
             token: str | None = None, library: str = "aiohttp") -> LoadResult:
    """Drive the endpoint (one address, or several spread over the clients) for ``seconds``
    with ``clients`` concurrent connections (``library``: "aiohttp" or "httpx")."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    for u in urls:
        if not u.startswith(("http://127.", "http://localhost")):
            raise ValueError(f"loopback only: {u}")
    return asyncio.run(_run(urls, cases, seconds, clients, token, library))


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


def batch_marginal(files: list[Path], model: str | None, repeats: int = 3, scale: int = 4
                   ) -> tuple[float, float, list[str]]:
    """The batch job's marginal photos/s on ``files``: the job on ``scale`` × half of them and
    on ``scale`` × all of them (the pool repeated under other names: with 400 vs 800 photos the
    difference, ~1.6 s, drowned in the job's start-up noise, ~±1 s, and gave "marginal" rates
    above what its own CPU-seconds allow), after a small warm-up job (the first dataset of a
    process pays ~6 s once), each ``repeats`` times, fastest wall kept;
    (n_all - n_half) / (t_all - t_half); and the same per CPU-second (least CPU kept:
    ``tree_cpu_seconds``)."""
    import tempfile

    from pipeline.scoring import score

    lines, best, cpu = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        sizes = [scale * len(files) // 2, scale * len(files)]
        for k, n in enumerate([min(16, len(files))] + sizes * repeats):
            src = Path(tmp) / f"in{k}"
            src.mkdir()
            for i in range(n):
                f = files[i % len(files)]
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
    cores = os.cpu_count() or 1
    if marginal > 1.1 * per_cpu * cores:
        lines.append(f"  WARNING: {marginal:.0f} photos/s is more than {cores} cores at {per_cpu:.0f} photos per "
                     "CPU-second allow: start-up noise, the ratio below is not meaningful")
    return marginal, per_cpu, lines


def sweep(url: str | list[str], files: list[Path], levels: list[int], seconds: float, token: str | None,
          library: str = "aiohttp") -> tuple[dict[int, LoadResult], list[str]]:
    """POST /v1/faces with the pool's portraits at each client count (after a short warm-up);
    per level also the server's (local Ray's) and the clients' (this process's) CPU per second."""
    cases = portrait_cases(files)
    out, lines = {}, []
    run_load(url, cases, min(3.0, seconds), max(levels), token, library)  # warm-up: threads, batches, connections
    for n in levels:
        c, a = tree_cpu_seconds(self_too=False), tree_cpu_seconds()
        r = run_load(url, cases, seconds, n, token, library)
        r.cpu_seconds = tree_cpu_seconds(self_too=False) - c
        clients_cpu = tree_cpu_seconds() - a - r.cpu_seconds
        out[n] = r
        lat = r.ok_latencies("portrait")
        per_cpu = (f"  {r.photos_ok['portrait'] / r.cpu_seconds:6.1f} photos/CPU-s (server "
                   f"{r.cpu_seconds / r.seconds:.2f}, clients {clients_cpu / r.seconds:.2f} cores)"
                   if r.cpu_seconds > 0 else "")
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
    p.add_argument("--proxy", action="store_true",
                   help="Serve's proxy answers the URL (as on a multi-node cluster or a joined one); default: "
                        "as jobs/serve_api.py on a Ray it starts, the one replica answers it itself")
    p.add_argument("--replicas", type=int, help="FacePipeline replicas (default: serve_plan; > 1: the proxy)")
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                   help="the load generator's HTTP library (it shares the cores with the server)")
    p.add_argument("--batch-repeats", type=int, default=3, help="runs of the batch job per size (fastest kept)")
    p.add_argument("--batch-scale", type=int, default=4,
                   help="the batch job reads the pool this many times over (2 × 800 and 4 × 800 photos)")
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
    marginal, marginal_cpu, ok, targets = None, None, True, {}
    if started_here:
        from serve import ingress

        mode = ingress.choose(ingress.PROXY if args.proxy else "auto", True, args.replicas)
        port = ingress.free_port("127.0.0.1")
        for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
            os.environ.setdefault(k, v)   # before the first `import ray`, which reads them
        if mode == ingress.DIRECT:  # as jobs/serve_api.py: before Ray and ray.serve start
            os.environ.update(ingress.direct_ingress_env(port))
        import ray
        from ray import serve

        from pipeline.resources import serve_plan
        from serve.app import APP_NAME, build_app

        ray.init(num_cpus=args.num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
        if levels and not args.no_batch:  # first, alone on the cores: Serve's replicas would hold them
            marginal, marginal_cpu, lines = batch_marginal(pool, args.model, args.batch_repeats, args.batch_scale)
            print("\n".join(lines), flush=True)
        direct = mode == ingress.DIRECT
        print(f"endpoint plan: {serve_plan(ray.cluster_resources(), args.replicas, direct).describe()}")
        t = time.monotonic()
        ingress.start(serve, "127.0.0.1", port, mode)
        serve.run(build_app({"model": args.model, "table": args.table, "token": args.token,
                             "replicas": args.replicas, "direct_ingress": direct}), name=APP_NAME, route_prefix="/")
        if direct:
            ingress.check_direct(APP_NAME, "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}"
        who = "the FacePipeline replica itself (direct ingress)" if direct else "Serve's proxy"
        print(f"app ready in {time.monotonic() - t:.1f} s; one URL, {url}, answered by {who}; "
              f"listening there: {sorted(ingress.listening(port))}", flush=True)
    try:
        results, lines = sweep(url, pool, levels, args.sweep_seconds, args.token, args.client) if levels else ({}, [])
        print("\n".join(lines), flush=True)
        mixed = run_load(url, cases, args.seconds, args.clients, args.token, args.client) if args.seconds > 0 else None
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
            targets["ratio ≥ 0.6"] = ratio >= 0.6
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
            targets["p99 at 16 clients < 4× single"] = p99 < 4 * single
    if mixed is not None:
        print("mixed run:")
        for line in mixed.lines():
            print(line)
        ok &= mixed.server_errors == 0 and not mixed.transport_errors
    print("errors:", "none (no 5xx but the designed 503s, no transport errors)" if ok else "FAIL: see above")
    print("targets:", "; ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()) or "none measured")
    return 0 if ok else 1   # a missed speed target is a figure to report, not a broken run


if __name__ == "__main__":
    sys.exit(main())
