"""The Ray Serve deployments behind the HTTP ingress.  Each reuses the batch pipeline's own
stage, so one photo gets the same numbers online as in the prediction table:

* ``Faces``       — CPU: bytes → decode → detect → align (``pipeline.photos.analyse_photo``).
* ``Embeddings``  — ``pipeline.embed.Embedder`` behind ``@serve.batch``: chips of concurrent
  requests share one forward pass.  Asks for a GPU only when the cluster has GPUs.
* ``Heads``       — ``pipeline.heads.ModelBundle``; ``user_config.model_uri`` picks the bundle,
  so ``serve deploy`` with a new URI swaps it in place (``reconfigure``) without a restart.
* ``Predictions`` — a batch prediction table held in memory (``serve.lookup``);
  ``user_config.table_uri`` picks it.

Settings arrive as a constructor argument (made once in ``build_app``), never read here.
"""
import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from pipeline.contract import CLASSIFICATION
from pipeline.settings import Settings


@serve.deployment(max_ongoing_requests=8)
class Faces:
    """Decode, detect and align one photo: the scoring job's CPU stage, unchanged."""

    def __init__(self, settings: Settings) -> None:
        from pipeline.faces import FaceDetector

        self.settings = settings
        self.detector = FaceDetector.from_settings(self.settings)
        self._lock = threading.Lock()  # one detector per replica; Serve runs sync calls in threads

    def analyse(self, data: bytes):
        from pipeline.photos import analyse_photo

        with self._lock:
            return analyse_photo(data, self.detector, self.settings.max_pixels, self.settings.max_bytes)

    def check_health(self) -> None:
        if self.detector is None:
            raise RuntimeError("no detector")


@serve.deployment(max_ongoing_requests=64)
class Embeddings:
    """Face chips → 128-d unit embeddings, the built-in attributes and the attribute networks'
    features (the batch stage's ``FaceModels``); concurrent requests share a forward pass.

    ``features``: run the attribute networks even with the built-in attributes off, because
    the bundle's heads read their features (``build_app`` decides from the bundle)."""

    def __init__(self, settings: Settings, batch_size: int = 32, features: bool = False) -> None:
        from pipeline.predict import FaceModels

        self.models = FaceModels(settings, None, batch_size, features=features)
        self.embedder = self.models.embedder

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
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
        spec = self.embedder.spec
        return {"backbone": spec.id, "embedding_dim": spec.embedding_dim, "chip_size": spec.geometry.size,
                "model_id": getattr(self.embedder, "model_id", spec.id),
                "device": str(getattr(self.embedder, "device", "cpu")),
                "attributes": [name for name, _ in self.models.tasks]}


@serve.deployment(max_ongoing_requests=64)
class Heads:
    """The model bundle named by ``user_config.model_uri`` (none: faces without labels)."""

    def __init__(self) -> None:
        self._state: tuple[str | None, Any] = (None, None)

    def reconfigure(self, config: dict | None) -> None:
        """Load the new bundle first, then swap it in: requests in flight keep the old one."""
        uri = (config or {}).get("model_uri") or None
        if uri is None:
            self._state = (None, None)
            return
        from pipeline.heads import ModelBundle

        self._state = (uri, ModelBundle.load(uri))  # raises: a bad URI fails the deploy loudly

    def predict(self, embeddings: np.ndarray, builtin: dict | None = None, features: dict | None = None
                ) -> tuple[list[dict[str, dict]], str | None]:
        """Per face {task: {label, score}} for the faces of ONE photo, and the bundle's version.

        ``builtin``: the attribute predictions made with the embeddings; a bundle task of
        the same name replaces one (``pipeline.predict.table_tasks``).  ``features``: the
        attribute networks' features of the same faces, for heads that read them.
        """
        from pipeline.predict import table_tasks

        _, bundle = self._state  # one snapshot: labels and version come from the same bundle
        n = len(embeddings)
        preds = dict(builtin or {})
        bundle_tasks = bundle.tasks if bundle is not None else []
        if bundle is not None and n:
            preds.update(bundle.predict(embeddings, np.zeros(n, np.int64), features))  # one photo: joint identities
        out: list[dict[str, dict]] = [{} for _ in range(n)]
        for task, kind in table_tasks(bool(builtin), bundle_tasks):
            if task not in preds:
                continue
            labels, scores = preds[task]
            for i in range(n):
                label = str(labels[i]) if kind == CLASSIFICATION else float(labels[i])
                out[i][task] = {"label": label, "score": float(scores[i])}
        return out, bundle.model_version if bundle is not None else None

    def info(self) -> dict[str, Any]:
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


@dataclass
class _Tables:
    """What one configuration loaded: swapped in whole, so a request sees one snapshot."""

    predictions: Any = None          # serve.lookup.PredictionIndex
    search: Any = None               # pipeline.people.FaceIndex (ANN over the table's embeddings)
    people: list[dict] | None = None  # pipeline.people.list_people, largest first
    people_uri: str | None = None
    search_error: str | None = None


@serve.deployment(max_ongoing_requests=32)
class Predictions:
    """A batch prediction table (``user_config.table_uri``) indexed in memory: row lookups,
    a kNN index of its faces for ``/v1/search`` (built when the table loads), and the people
    of ``user_config.people_uri`` (a cluster_faces.py output) for ``/v1/people``."""

    def __init__(self) -> None:
        self._tables = _Tables()

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
            try:
                new.search = FaceIndex.from_uris(table_uri, people_uri)
            except UsageError as exc:  # e.g. a table without faces: lookups still work
                new.search_error = str(exc)
        if people_uri:
            from pipeline.people import list_people

            new.people = list_people(people_uri, limit=2**62)
        self._tables = new

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
                "people": len(tables.people) if tables.people is not None else None}
