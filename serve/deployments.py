"""What the Ray Serve deployments do, apart from HTTP (``serve.app`` puts the routes on top).
Each reuses the batch pipeline's own stages, so one photo gets the same numbers online as
in the prediction table:

* ``PipelineCore`` — the body of ``serve.app.FacePipeline``, the ingress: bytes → decode →
  detect → align (``pipeline.photos.analyse_photo``, in a thread) → the chips of concurrent
  requests batched (``ChipBatcher``: it waits for the photos still in detection) into one ``pipeline.predict.FaceModels`` pass →
  the bundle's heads.  ``user_config.model_uri`` picks the bundle; ``serve deploy`` with a new
  URI swaps it in place (``reconfigure``) without a restart.  On GPU clusters the batched
  call goes to ``Embeddings`` (the GPU) instead of a local ``FaceModels``.
* ``Embeddings``  — ``FaceModels`` behind ``@serve.batch`` on a GPU (GPU clusters only).
* ``Predictions`` — a batch prediction table held in memory (``serve.lookup``);
  ``user_config.table_uri`` picks it.

Settings arrive as a constructor argument (made once in ``build_app``), never read here.
"""
import asyncio
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from pipeline.contract import CLASSIFICATION
from pipeline.settings import Settings
from serve.http import Admission

#: Seconds a client is told to wait (Retry-After) when a replica is full.
RETRY_AFTER_S = 1


class ChipBatcher:
    """Batches the chips of concurrent requests into one network pass, waiting for the
    photos still being decoded/detected in this replica (``upstream``) rather than for a
    fixed timeout: a lone request runs at once; under load a batch holds every photo in
    flight, up to ``max_batch`` (the networks cost ~3× more per face at batch 1 than at
    batch 8+ on CPU, benchmarks/README precision).  One batch runs at a time; the next
    forms while it runs.  ``max_wait_s`` bounds the wait for upstream photos."""

    def __init__(self, run: Any, max_batch: int = 16, max_wait_s: float = 0.05) -> None:
        self.run, self.max_batch, self.max_wait_s = run, max(1, int(max_batch)), max_wait_s
        self._queue: list[tuple[np.ndarray, asyncio.Future]] = []
        self._upstream = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    @contextmanager
    def upstream(self) -> Iterator[None]:
        """Around a photo's decode/detect: a batch may wait for its chips."""
        self._upstream += 1
        try:
            yield
        finally:
            self._upstream -= 1
            self._poke()

    async def submit(self, chips: np.ndarray) -> Any:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        fut = loop.create_future()
        self._queue.append((chips, fut))
        self._poke()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            deadline = loop.time() + self.max_wait_s
            while len(self._queue) < self.max_batch and self._upstream > 0:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            try:
                results = await self.run([c for c, _ in batch])
            except Exception as exc:  # every request of the batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():  # a client that went away cancelled its future
                    fut.set_result(result)


class PipelineCore:
    """One replica's face pipeline: ``detect_threads`` decode/detect threads (a detector each),
    the networks (``FaceModels`` on ``net_threads`` torch threads, or a handle to GPU
    ``Embeddings``) and the bundle; photo requests are admitted up to ``max_ongoing`` (beyond:
    503 + Retry-After, ``serve.http.Admission``), their chips batched at the networks."""

    def __init__(self, settings: Settings, embeddings: Any = None, features: bool = False,
                 max_batch: int = 16, max_ongoing: int = 32, detect_threads: int = 1,
                 net_threads: int | None = None) -> None:
        from pipeline.faces import FaceDetector

        self.settings = settings
        # one detector per thread (a YuNet session is used by one thread at a time): a replica
        # holding several cores decodes/detects several photos at once, as the batch job's actors do
        n = max(1, int(detect_threads))
        self._detectors: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n):
            self._detectors.put(FaceDetector.from_settings(settings))
        self._detect = ThreadPoolExecutor(n, thread_name_prefix="detect")
        self.embeddings = embeddings            # GPU clusters: a handle; else the networks are here
        self.models = None
        if embeddings is None:
            from pipeline.predict import FaceModels

            self.models = FaceModels(settings, None, 32, features=features)  # faces per forward, as the batch job
            if net_threads:  # after FaceModels, which sets one thread per CPU of the replica
                import torch

                torch.set_num_threads(int(net_threads))
        self._state: tuple[str | None, Any] = (None, None)
        self.admission = Admission(max_ongoing, RETRY_AFTER_S)
        self._batcher = ChipBatcher(self._embed, max_batch)

    def configure(self, config: dict | None) -> None:
        """``model_uri`` (load the new bundle first, then swap: requests in flight keep the
        old one; a bad URI fails the deploy loudly), ``max_ongoing``, ``retry_after_s``."""
        config = config or {}
        if config.get("max_ongoing"):
            self.admission.limit = int(config["max_ongoing"])
        if config.get("retry_after_s"):
            self.admission.retry_after_s = int(config["retry_after_s"])
        uri = config.get("model_uri") or None
        if uri is None:
            self._state = (None, None)
            return
        from pipeline.heads import ModelBundle

        bundle = ModelBundle.load(uri)
        bundle.tuned_embedder(self.settings.precision)  # built here, before the swap, not by the first request
        self._state = (uri, bundle)

    async def analyse(self, data: bytes):
        """Decode → detect → align in a detector thread (the event loop stays free)."""
        loop = asyncio.get_running_loop()
        with self._batcher.upstream():  # its chips will follow: the batch waits for them
            return await loop.run_in_executor(self._detect, self._analyse, data)

    def _analyse(self, data: bytes):
        from pipeline.photos import analyse_photo

        detector = self._detectors.get()  # never empty: as many detectors as threads
        try:
            return analyse_photo(data, detector, self.settings.max_pixels, self.settings.max_bytes)
        finally:
            self._detectors.put(detector)

    async def predict(self, chips: np.ndarray) -> tuple[np.ndarray, list[dict[str, dict]], str | None]:
        """One photo's chips → (embeddings, per face {task: {label, score}}, bundle version)."""
        return await self._batcher.submit(chips)

    async def _embed(self, chips: list[np.ndarray]) -> list[tuple[np.ndarray, list[dict], str | None]]:
        _, bundle = self._state  # one snapshot per batch: labels and version from the same bundle
        if self.models is not None:
            return await asyncio.to_thread(self._run_local, chips, bundle)
        outs = await asyncio.gather(*(self.embeddings.remote(c) for c in chips))
        return [self._labelled(emb, builtin, feats, bundle, np.zeros(len(emb), np.int64), c)
                for (emb, builtin, feats), c in zip(outs, chips)]

    def _run_local(self, chips: list[np.ndarray], bundle: Any) -> list[tuple[np.ndarray, list[dict], str | None]]:
        """Every request's faces in one pass (photo i's faces have photo id i: a bundle's
        joint identities stay within a photo, as in the batch job), split back per request."""
        sizes = [len(c) for c in chips]
        ids = np.repeat(np.arange(len(chips)), sizes)
        every = np.concatenate(chips)
        emb, builtin, feats, _ = self.models.run(every, ids)
        out = self._labelled(emb, builtin, feats, bundle, ids, every)
        cuts = np.cumsum(sizes)[:-1]
        faces = np.split(np.arange(len(emb)), cuts)
        return [(emb[f], [out[1][i] for i in f], out[2]) for f in faces]

    def _labelled(self, emb: np.ndarray, builtin: dict, feats: dict, bundle: Any, ids: np.ndarray,
                  chips: np.ndarray) -> tuple[np.ndarray, list[dict], str | None]:
        from pipeline.predict import table_tasks

        n = len(emb)
        preds = dict(builtin or {})
        builtin_on = self.models.builtin_on if self.models is not None else bool(builtin)
        if bundle is not None and n:
            preds.update(bundle.predict(bundle.head_embeddings(chips, emb, self.settings.precision), ids, feats))
        out: list[dict[str, dict]] = [{} for _ in range(n)]
        for task, kind in table_tasks(builtin_on, bundle.tasks if bundle is not None else []):
            if task not in preds:
                continue
            labels, scores = preds[task]
            for i in range(n):
                label = str(labels[i]) if kind == CLASSIFICATION else float(labels[i])
                out[i][task] = {"label": label, "score": float(scores[i])}
        return emb, out, bundle.model_version if bundle is not None else None

    @property
    def model_version(self) -> str | None:
        bundle = self._state[1]
        return bundle.model_version if bundle is not None else None

    async def embedding_info(self) -> dict[str, Any]:
        if self.models is None:
            return await self.embeddings.info.remote()
        return embedding_info(self.models)

    def model_info(self) -> dict[str, Any]:
        uri, bundle = self._state
        if bundle is None:
            return {"model_uri": None, "model_version": None, "tasks": []}
        meta = bundle.meta
        tasks = [{k: v for k, v in s.to_json().items()
                  if k in ("name", "kind", "labels", "open_set", "exclusive", "features")}
                 for s in bundle.specs]
        return {"model_uri": uri, "model_version": bundle.model_version, "tasks": tasks,
                "created_at": meta.get("created_at"), "backbone": meta.get("backbone"),
                "metrics": meta.get("metrics")}


def embedding_info(models: Any) -> dict[str, Any]:
    embedder = models.embedder
    spec = embedder.spec
    return {"backbone": spec.id, "embedding_dim": spec.embedding_dim, "chip_size": spec.geometry.size,
            "model_id": getattr(embedder, "model_id", spec.id), "device": str(getattr(embedder, "device", "cpu")),
            "attributes": [name for name, _ in models.tasks]}


@serve.deployment(max_ongoing_requests=64)
class Embeddings:
    """GPU clusters: face chips → 128-d unit embeddings, the built-in attributes and the attribute networks'
    features (the batch stage's ``FaceModels``); concurrent requests share a forward pass.

    ``features``: run the attribute networks even with the built-in attributes off, because
    the bundle's heads read their features (``build_app`` decides from the bundle)."""

    def __init__(self, settings: Settings, batch_size: int = 32, features: bool = False) -> None:
        from pipeline.predict import FaceModels

        self.models = FaceModels(settings, None, batch_size, features=features)
        self.embedder = self.models.embedder

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def __call__(self, chips: list[np.ndarray]) -> list[tuple[np.ndarray, dict, dict]]:
        """Per request: (embeddings, {task: (labels, scores)}, {features: N×d}) of its faces."""
        sizes = [len(c) for c in chips]
        emb, preds, feats = await asyncio.to_thread(self.models.run, np.concatenate(chips),
                                                    np.zeros(sum(sizes), np.int64))
        cuts = np.cumsum(sizes)[:-1]
        per_task = {t: (np.split(v, cuts), np.split(s, cuts)) for t, (v, s) in preds.items()}
        per_set = {k: np.split(v, cuts) for k, v in feats.items()}
        return [(e, {t: (v[i], s[i]) for t, (v, s) in per_task.items()}, {k: v[i] for k, v in per_set.items()})
                for i, e in enumerate(np.split(emb, cuts))]

    def info(self) -> dict[str, Any]:
        return embedding_info(self.models)


@dataclass
class _Tables:
    """What one configuration loaded: swapped in whole, so a request sees one snapshot."""

    predictions: Any = None          # serve.lookup.PredictionIndex
    search: Any = None               # pipeline.people.FaceIndex (ANN over the table's embeddings)
    people: list[dict] | None = None  # pipeline.people.list_people, largest first
    people_uri: str | None = None
    search_error: str | None = None
    review: Any = None               # serve.review.Review (people + labels log), with table and people


@serve.deployment(max_ongoing_requests=32)
class Predictions:
    """A batch prediction table (``user_config.table_uri``) indexed in memory: row lookups,
    a kNN index of its faces for ``/v1/search`` (the people output's ``_index/``, or built when a
    small table loads), and the people
    of ``user_config.people_uri`` (a cluster_faces.py output) for ``/v1/people``; with both,
    the review page's state (``serve.review``) over ``user_config.labels_uri`` (the labels log)
    and its face thumbnails (``serve.thumbnails``)."""

    def __init__(self) -> None:
        from serve.thumbnails import Thumbnails

        self._tables = _Tables()
        self.thumbnails = Thumbnails()

    def reconfigure(self, config: dict | None) -> None:
        """Load everything first, then swap: requests in flight keep the old tables."""
        config = config or {}
        table_uri, people_uri = config.get("table_uri") or None, config.get("people_uri") or None
        new = _Tables(people_uri=people_uri)
        if table_uri:
            from pipeline.contract import UsageError
            from pipeline.people import FaceIndex
            from serve.lookup import PredictionIndex

            new.predictions = PredictionIndex.load(table_uri, embeddings=bool(config.get("embeddings", False)))
            try:   # the people job's _index/ when there is one, else built here for a small table
                new.search = FaceIndex.from_uris(table_uri, people_uri)
                print(f"[search] {len(new.search)} faces, index {new.search.source}", flush=True)
            except UsageError as exc:  # e.g. a table without faces, or too big to index here: lookups still work
                new.search_error = str(exc)
                print(f"[search] unavailable: {exc}", flush=True)
        if people_uri:
            from pipeline.people import list_people

            new.people = list_people(people_uri, limit=2**62)
        if table_uri and people_uri:
            from serve.review import Review

            new.review = Review.load(table_uri, people_uri, config.get("labels_uri") or None)
        self._tables = new

    async def review(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The review page's reads and acts (``serve.review.Review`` method ``op``), in a thread:
        a view rebuild or a log write does not hold up the replica's other requests."""
        from serve.review import ReviewError

        review = self._tables.review
        if review is None:
            return {"error": "the review page needs a prediction table and a people table "
                             "(serve_api.py --table T --people P [--labels L])", "status": 404}
        try:
            return await asyncio.to_thread(getattr(review, op), **kwargs)
        except ReviewError as exc:
            return {"error": exc.reason, "status": exc.status}

    async def thumbnail(self, image_uri: str, face_index: int, size: int) -> dict[str, Any]:
        """A face's JPEG thumbnail, cut by its bbox (cached; a grey square for an unreadable photo)."""
        from serve.review import ReviewError

        tables = self._tables
        try:
            if tables.review is not None:
                box = tables.review.box(image_uri, face_index)
            else:
                box = self._box(image_uri, face_index)
        except ReviewError as exc:
            return {"error": exc.reason, "status": exc.status}
        data, real = await asyncio.to_thread(self.thumbnails.get, image_uri, face_index, box, size)
        return {"jpeg": data, "real": real}

    def _box(self, image_uri: str, face_index: int) -> tuple[float, float, float, float] | None:
        from serve.review import ReviewError

        index = self._tables.predictions
        if index is None:
            raise ReviewError(404, "no prediction table configured (--table)")
        rows = [r for r in index.query(image_uri, {}, 1000, 0).rows if r.get("face_index") == face_index]
        if not rows or rows[0].get("bbox") is None:
            raise ReviewError(404, f"face not in the table: {image_uri} #{face_index}")
        b = rows[0]["bbox"]
        return (b["x"], b["y"], b["w"], b["h"])

    def search(self, embeddings: np.ndarray, k: int) -> dict[str, Any]:
        """Per face: up to k matches of the table, best first."""
        tables = self._tables
        if tables.search is None:
            reason = tables.search_error or "no prediction table configured (--table / user_config table_uri)"
            return {"error": f"search unavailable: {reason}", "status": 404}
        hits = tables.search.search(embeddings, k) if len(embeddings) else []
        return {"matches": [[{"image_uri": u, "face_index": int(i), "similarity": float(s), "person": p}
                             for u, i, s, p in row] for row in hits]}

    def people(self, limit: int, offset: int) -> dict[str, Any]:
        tables = self._tables
        if tables.people is None:
            return {"error": "no people table configured (--people / user_config people_uri)", "status": 404}
        page = tables.people[offset:offset + limit]
        total = len(tables.people)
        return {"people": page, "total": total, "offset": offset, "limit": limit,
                "next_offset": offset + limit if offset + limit < total else None,
                "people_uri": tables.people_uri}

    def query(self, image_uri: str | None, filters: dict[str, str], limit: int, offset: int,
              embeddings: bool) -> dict[str, Any]:
        from serve.lookup import TableError

        index = self._tables.predictions
        if index is None:
            return {"error": "no prediction table configured (Predictions user_config table_uri)", "status": 404}
        try:
            page = index.query(image_uri, filters, limit, offset, embeddings)
        except TableError as exc:
            return {"error": str(exc), "status": 400}
        return {"rows": page.rows, "total": page.total, "offset": page.offset, "limit": page.limit,
                "next_offset": page.next_offset, "table_uri": index.uri}

    def info(self) -> dict[str, Any] | None:
        tables = self._tables
        if tables.predictions is None:
            return None
        return {**tables.predictions.describe(), "search_faces": len(tables.search) if tables.search else 0,
                "people": len(tables.people) if tables.people is not None else None,
                "labels_uri": tables.review.log.uri if tables.review is not None else None,
                "thumbnails": self.thumbnails.stats()}
