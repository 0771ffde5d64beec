"""The review page's JSON routes under load, loopback only, one run:

1. a synthetic archive of ``--faces`` faces (default 10^5): photos are links to real
   portraits (four faces each, boxes inside the photo), embeddings drawn around
   ``--faces / 5`` people's centres, a people table written as cluster_faces.py writes it
   (person, person_size, similarity), an empty labels log;
2. the endpoint as ``jobs/serve_api.py`` starts it on a Ray it starts (direct ingress),
   ``--table --people --labels`` and a token;
3. ``--clients`` (16) concurrent clients for ``--seconds``, each request drawn from the page's
   mix: people pages (random offset), a person's faces, names, progress, suggestions for a
   named person, thumbnails (the faces the pages listed, so the cache warms as a reviewer's
   scrolling does), and acts (confirm / reject a face, name a person): p50 / p99 per route,
   errors, the thumbnail cache's hit rate;
4. "a page of 60 faces": one person's faces (JSON) + their 60 thumbnails fetched 6 at a time
   as the browser does, on a warm cache (median of 5).

Exit 1 on any error (non-2xx or transport).

    .venv/bin/python benchmarks/review_load.py                 # 10^5 faces, 16 clients, 30 s
    .venv/bin/python benchmarks/review_load.py --faces 20000 --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header, portraits  # noqa: E402

TOKEN = "bench-token"
FACES_PER_PHOTO = 4
MIX = {"people": 3, "person": 3, "names": 1, "progress": 1, "suggestions": 1, "thumbnail": 12, "decide": 0.3,
       "name": 0.1}


def synthetic_archive(root: Path, n_faces: int, seed: int = 0) -> tuple[str, str, str]:
    """(table, people, labels) folders of a synthetic archive (module docstring, step 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.people import PEOPLE_SCHEMA

    rng = np.random.default_rng(seed)
    photos_dir = root / "photos"
    photos_dir.mkdir(parents=True)
    sources = portraits(500)
    n_photos = -(-n_faces // FACES_PER_PHOTO)
    uris = []
    for i in range(n_photos):
        link = photos_dir / f"{i // 1000:03d}" / f"img{i:07d}.jpg"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(sources[i % len(sources)])
        uris.append(str(link))
    photo = np.arange(n_faces) // FACES_PER_PHOTO
    face_index = (np.arange(n_faces) % FACES_PER_PHOTO).astype(np.int32)
    # LFW portraits are 250×250 with the face near the centre; boxes around it, a little apart
    x = (60 + 20 * face_index + rng.uniform(-5, 5, n_faces)).astype(np.float32)
    y = (70 + rng.uniform(-5, 5, n_faces)).astype(np.float32)
    side = rng.uniform(90, 120, n_faces).astype(np.float32)
    n_people = max(2, n_faces // 5)
    sizes = rng.zipf(1.6, n_people).clip(1, 2000)
    person = rng.choice(n_people, n_faces, p=sizes / sizes.sum())
    centres = rng.normal(size=(n_people, 128)).astype(np.float32)
    emb = centres[person] + 0.35 * rng.normal(size=(n_faces, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pa.table({
        "image_uri": pa.array([uris[p] for p in photo]), "status": pa.array(["ok"] * n_faces),
        "face_count": pa.array(np.full(n_faces, FACES_PER_PHOTO, np.int32)), "face_index": pa.array(face_index),
        "bbox": pa.StructArray.from_arrays([pa.array(x), pa.array(y), pa.array(side), pa.array(side)],
                                           names=list("xywh")),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 128),
    })
    (root / "table").mkdir()
    pq.write_table(table, root / "table" / "part-0.parquet")
    # people ids largest first, as cluster_faces.py numbers them
    counts = np.bincount(person, minlength=n_people)
    rank = np.empty(n_people, np.int64)
    rank[np.lexsort((np.arange(n_people), -counts))] = np.arange(1, n_people + 1)
    c = np.zeros((n_people, 128), np.float32)
    np.add.at(c, person, emb)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    people = pa.table({
        "image_uri": table.column("image_uri"), "face_index": table.column("face_index"),
        "person": pa.array([f"p{r:06d}" for r in rank[person]]),
        "person_size": pa.array(counts[person].astype(np.int32)),
        "similarity": pa.array(np.einsum("ij,ij->i", emb, c[person]).astype(np.float32)),
        "name": pa.nulls(n_faces, pa.string()),
    })
    people = people.select(PEOPLE_SCHEMA.names).cast(PEOPLE_SCHEMA)
    (root / "people").mkdir()
    pq.write_table(people, root / "people" / "part-0.parquet")
    return str(root / "table"), str(root / "people"), str(root / "labels")


class Clients:
    """The mix of the page's requests, with what earlier answers taught (people, faces, names)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.people: list[dict] = []
        self.thumbs: list[str] = []
        self.names: list[str] = []
        self.total = 1
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.transport: Counter = Counter()

    async def call(self, http, kind: str, method: str, path: str, **kw) -> dict | bytes | None:
        t = time.perf_counter()
        try:
            async with http.request(method, self.url + path, headers=self.headers, **kw) as r:
                body = await r.read()
                self.status[kind][r.status] += 1
                self.lat[kind].append((time.perf_counter() - t) * 1000)
                if r.status != 200:
                    return None
                return body if kind == "thumbnail" else __import__("json").loads(body)
        except Exception as exc:  # noqa: BLE001 — counted, reported, exit 1
            self.transport[f"{kind}: {type(exc).__name__}"] += 1
            return None

    async def one(self, http, rng: random.Random) -> None:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        unnamed = [p for p in self.people if p["name"] is None]
        if kind == "people" or not self.people:
            off = rng.choice([0, 0, 0, rng.randrange(0, max(1, self.total - 40))])
            out = await self.call(http, "people", "GET", f"/v1/review/people?offset={off}&limit=40&faces=4")
            if out:
                self.total = out["total"]
                self.people = (self.people + out["people"])[-400:]
                self.thumbs = (self.thumbs + [f["thumbnail"] for p in out["people"] for f in p["faces"]])[-3000:]
        elif kind == "person":
            p = rng.choice(self.people)
            params = {"name": p["name"]} if p["name"] else {"person": p["person"]}
            out = await self.call(http, "person", "GET", "/v1/review/person", params={**params, "limit": 60})
            if out:
                self.thumbs = (self.thumbs + [f["thumbnail"] for f in out["faces"]])[-3000:]
        elif kind == "names":
            out = await self.call(http, "names", "GET", "/v1/review/names")
            if out:
                self.names = out["names"]
        elif kind == "progress":
            await self.call(http, "progress", "GET", "/v1/review/progress")
        elif kind == "suggestions" and self.names:
            out = await self.call(http, "suggestions", "GET", "/v1/review/suggestions",
                                  params={"name": rng.choice(self.names), "limit": 30})
            if out:
                self.thumbs = (self.thumbs + [f["thumbnail"] for f in out["faces"]])[-3000:]
        elif kind == "thumbnail" and self.thumbs:
            await self.call(http, "thumbnail", "GET", rng.choice(self.thumbs[-600:]))
        elif kind == "decide" and self.names and self.people:
            p = rng.choice(self.people)
            f = rng.choice(p["faces"]) if p["faces"] else None
            if f:
                key = rng.choice(["confirm", "reject"])
                await self.call(http, "decide", "POST", "/v1/review/decide", json={
                    "name": rng.choice(self.names), key: [{"image_uri": f["image_uri"], "face_index": f["face_index"]}]})
        elif kind == "name" and unnamed:
            p = rng.choice(unnamed)
            await self.call(http, "name", "POST", "/v1/review/name",
                            json={"person": p["person"], "to": f"Person {rng.randrange(200)}", "author": "bench"})

    async def run(self, clients: int, seconds: float) -> float:
        import aiohttp

        async def client(i: int, deadline: float) -> None:
            rng = random.Random(i)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                while time.monotonic() < deadline:
                    await self.one(http, rng)

        async with aiohttp.ClientSession() as http:  # a first page and a named person, as a reviewer starts
            await self.one(http, random.Random(-1))
            p = next(p for p in self.people if p["name"] is None)
            await self.call(http, "name", "POST", "/v1/review/name", json={"person": p["person"], "to": "Person 0"})
            self.names = ["Person 0"]
        self.lat.clear()
        self.status.clear()
        t = time.monotonic()
        await asyncio.gather(*(client(i, t + seconds) for i in range(clients)))
        return time.monotonic() - t

    def errors(self) -> int:
        return sum(n for c in self.status.values() for s, n in c.items() if s != 200) + sum(self.transport.values())

    def lines(self, seconds: float) -> list[str]:
        out = [f"{'route':<12} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}  errors"]
        for kind in MIX:
            lat = np.asarray(self.lat.get(kind, []))
            if not len(lat):
                continue
            bad = {s: n for s, n in self.status[kind].items() if s != 200}
            out.append(f"{kind:<12} {len(lat):>8} {len(lat) / seconds:>7.1f} {np.percentile(lat, 50):>8.1f} "
                       f"{np.percentile(lat, 99):>8.1f}  {bad or 0}")
        if self.transport:
            out.append(f"transport errors: {dict(self.transport)}")
        return out


def in_process(table: str, people: str, labels: str) -> list[str]:
    """The state's own cost, with no HTTP and no clients: ``serve.review.Review`` methods at
    this scale (median of 5; the acts write a real log file and rebuild the view each)."""
    import statistics

    from serve.review import Review

    t = time.perf_counter()
    review = Review.load(table, people, labels)
    out = [f"in process (serve.review, no HTTP): load {time.perf_counter() - t:.2f} s; "
           f"{review.progress()['people_left']} people"]
    first = review.people(0, 40)
    page, total = first["people"], first["total"]
    review.name_person("Person 0", person=page[0]["person"])
    faces = review.person(name="Person 0", limit=60)["faces"]

    def timed(label: str, fn) -> None:  # noqa: ANN001
        runs = []
        for i in range(5):
            t0 = time.perf_counter()
            fn(i)
            runs.append(time.perf_counter() - t0)
        out.append(f"  {label:<44} {statistics.median(runs) * 1000:7.1f} ms")

    timed("people page (40, 4 faces each)", lambda i: review.people((total // 5) * i, 40))
    timed("person page (60 faces)", lambda i: review.person(person=page[1 + i]["person"], limit=60))
    timed("suggestions (30 faces, 6 people)", lambda i: review.suggestions("Person 0", 30))
    timed("progress", lambda i: review.progress())
    timed("act: decide 1 face (write + replay + view)", lambda i: review.decide(
        "Person 0", reject=[(faces[-1 - i]["image_uri"], faces[-1 - i]["face_index"])]))
    timed("act: name a person (write + replay + view)", lambda i: review.name_person(
        f"Person {i + 1}", person=page[10 + i]["person"]))
    return out


async def page_of_60(url: str, person: dict) -> float:
    """A person page as the browser loads it: the JSON, then 60 thumbnails 6 at a time."""
    import aiohttp

    headers = {"Authorization": f"Bearer {TOKEN}"}
    params = {"name": person["name"]} if person["name"] else {"person": person["person"]}
    t = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(url + "/v1/review/person", params={**params, "limit": 60}) as r:
            faces = (await r.json())["faces"]
        sem = asyncio.Semaphore(6)

        async def get(u: str) -> None:
            async with sem, http.get(url + u) as r:
                assert r.status == 200
                await r.read()

        await asyncio.gather(*(get(f["thumbnail"]) for f in faces))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args(argv)
    header(f"review page JSON routes: {args.faces} faces, {args.clients} clients, {args.seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="faceray-review-bench-") as tmp:
        t = time.monotonic()
        table, people, labels = synthetic_archive(Path(tmp), args.faces)
        print(f"synthetic archive: {args.faces} faces in {time.monotonic() - t:.1f} s")
        print("\n".join(in_process(table, people, str(Path(tmp) / "labels-in-process"))))
        from serve import ingress

        port = ingress.free_port("127.0.0.1")
        for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled"}.items():
            os.environ.setdefault(k, v)
        os.environ.update(ingress.direct_ingress_env(port))  # as jobs/serve_api.py on a Ray it starts
        import torch  # noqa: F401  (before ray: pipeline/runtime.py)
        import ray
        from ray import serve

        from serve.app import APP_NAME, build_app

        ray.init(num_cpus=args.num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
        try:
            t = time.monotonic()
            ingress.start(serve, "127.0.0.1", port, ingress.DIRECT)
            serve.run(build_app({"table": table, "people": people, "labels": labels, "token": TOKEN,
                                 "direct_ingress": True}), name=APP_NAME, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            print(f"app ready in {time.monotonic() - t:.1f} s at {url} (table + people + review state loaded)")
            clients = Clients(url)
            seconds = asyncio.run(clients.run(args.clients, args.seconds))
            print("\n".join(clients.lines(seconds)))
            print("machine load average (1 min) after the run: {:.1f} on {} cores (other processes count too)".format(
                os.getloadavg()[0], os.cpu_count()))
            import httpx

            info = httpx.get(url + "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()
            st = info["table"]["thumbnails"]
            print(f"thumbnail cache: hit rate {st['hit_rate']:.3f} ({st['hits']} hits, {st['misses']} misses, "
                  f"{st['failures']} unreadable), {st['entries']} thumbnails in {st['bytes'] / 2**20:.1f} MiB")
            person = next(p for p in clients.people if p["size"] >= 60)
            asyncio.run(page_of_60(url, person))  # cold, then warm
            warm = sorted(asyncio.run(page_of_60(url, person)) for _ in range(5))
            print(f"a page of 60 faces (JSON + 60 thumbnails, 6 at a time), warm cache: median "
                  f"{warm[2] * 1000:.0f} ms, max {warm[-1] * 1000:.0f} ms (target < 1000 ms)")
            errors = clients.errors()
            print(f"errors: {errors}")
        finally:
            serve.shutdown()
            ray.shutdown()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
