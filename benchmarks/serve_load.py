"""Bounded load test of the HTTP endpoint: N concurrent clients for T seconds, loopback only.

The mix is mostly real photos (portraits and group photos from ../shared/data) plus bad
requests (empty, text, truncated JPEG, a PNG header claiming 3.6 gigapixels, a body over
the cap, a missing token) and, with a table, lookups.  It must end with **0 responses
5xx** (and 0 transport errors): the exit code is 1 otherwise.  Prints requests/s and
p50/p99 latency overall and per kind, with the machine and the command.

    .venv/bin/python benchmarks/serve_load.py                       # starts Ray + the app
    .venv/bin/python benchmarks/serve_load.py --seconds 30 --clients 32 --model DIR --table DIR
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000   # a running endpoint
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

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    def lines(self) -> list[str]:
        lat = np.concatenate([np.asarray(v) for v in self.by_kind.values()]) if self.by_kind else np.zeros(1)
        out = [f"{self.requests} requests in {self.seconds:.1f} s with {self.clients} clients: "
               f"{self.requests / self.seconds:.1f} req/s, p50 {np.percentile(lat, 50):.0f} ms, "
               f"p99 {np.percentile(lat, 99):.0f} ms",
               f"status codes: {dict(sorted(self.statuses.items()))}; 5xx: {self.server_errors}; "
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
        result.by_kind[case.kind].append((time.perf_counter() - t) * 1000)
        result.statuses[status] += 1
        result.kind_status[case.kind][status] += 1


async def _run(base_url: str, cases: list[Case], seconds: float, clients: int, token: str | None) -> LoadResult:
    import httpx

    result = LoadResult(seconds, clients)
    weights = [c.weight for c in cases]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(_client(http, cases, weights, started + seconds, token, result, random.Random(i))
                               for i in range(clients)))
        result.seconds = time.monotonic() - started
    return result


def run_load(base_url: str, cases: list[Case], seconds: float = 30, clients: int = 32,
             token: str | None = None) -> LoadResult:
    """Drive the endpoint for ``seconds`` with ``clients`` concurrent connections."""
    if not base_url.startswith(("http://127.", "http://localhost")):
        raise ValueError(f"loopback only: {base_url}")
    return asyncio.run(_run(base_url, cases, seconds, clients, token))


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
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--url", help="a running endpoint (loopback); default: start Ray + the app here")
    p.add_argument("--model", help="model bundle for the app started here")
    p.add_argument("--table", help="prediction table for the app started here (also adds lookups)")
    p.add_argument("--token", default=os.environ.get("FACERAY_API_TOKEN") or "load-test-token")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    header("serve_load: the HTTP endpoint under concurrent clients")
    uris, labels = _table_samples(args.table) if args.table else ([], {})
    cases = default_cases(data_dir(), image_uris=uris, labels=labels)
    started_here = args.url is None
    url = args.url
    if started_here:
        import socket

        for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled"}.items():
            os.environ.setdefault(k, v)   # before the first `import ray`, which reads them
        import ray
        from ray import serve

        from serve.app import APP_NAME, build_app

        ray.init(num_cpus=args.num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": args.model, "table": args.table, "token": args.token}),
                  name=APP_NAME, route_prefix="/")
        print(f"app ready in {time.monotonic() - t:.1f} s on 127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
    try:
        result = run_load(url, cases, args.seconds, args.clients, args.token)
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
    for line in result.lines():
        print(line)
    ok = result.server_errors == 0 and not result.transport_errors
    print("PASS: no 5xx, no transport errors" if ok else "FAIL: server or transport errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
