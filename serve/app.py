"""The faceray HTTP endpoint: a Ray Serve application with a FastAPI ingress.

Deployments (each reuses the batch pipeline's own stage, so one photo gets the same numbers
online as in the prediction table):

* ``Faces``       — CPU: bytes → decode → detect → align (``pipeline.photos.analyse_photo``).
* ``Embeddings``  — ``pipeline.embed.Embedder`` behind ``@serve.batch``: chips of concurrent
  requests share one forward pass.  Asks for a GPU only when the cluster has GPUs.
* ``Heads``       — ``pipeline.heads.ModelBundle``; ``user_config.model_uri`` picks the bundle,
  so ``serve deploy`` with a new URI swaps it in place (``reconfigure``) without a restart.
* ``Predictions`` — a batch prediction table held in memory (``serve.lookup``);
  ``user_config.table_uri`` picks it.
* ``Api``         — the FastAPI ingress: limits, errors, the optional bearer token.

Run: ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or from Python
``serve.run(build_app({...}))`` / ``python jobs/serve_api.py --model URI --table URI``.
"""
# No `from __future__ import annotations`: FastAPI must see real classes in the route
# signatures, and Serve ships the ingress class by value, with only the globals it names.
import asyncio
import hmac
import os
import threading
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

DEFAULT_MAX_BODY = 20 * 1024 * 1024
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
APP_NAME = "faceray"

# Magic bytes of the formats the decoder reads (DESIGN.md: JPEG, PNG, WebP, BMP, TIFF; GIF
# is listed by storage too).  Anything else is 415, whatever its Content-Type says.
MAGIC: tuple[tuple[str, bytes, int], ...] = (
    ("jpeg", b"\xff\xd8\xff", 0),
    ("png", b"\x89PNG\r\n\x1a\n", 0),
    ("gif", b"GIF87a", 0),
    ("gif", b"GIF89a", 0),
    ("bmp", b"BM", 0),
    ("tiff", b"II*\x00", 0),
    ("tiff", b"MM\x00*", 0),
    ("webp", b"WEBP", 8),      # RIFF....WEBP
)
IMAGE_MEDIA_TYPES = {k: f"image/{k}" for k in ("jpeg", "png", "gif", "bmp", "tiff", "webp")}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes, or None when it is none we decode."""
    for name, magic, at in MAGIC:
        if data[at:at + len(magic)] == magic and (name != "webp" or data[:4] == b"RIFF"):
            return name
    return None


class ApiError(Exception):
    """An HTTP error with a reason; rendered as ``{"error": reason, "status": code}``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


# ------------------------------------------------------------------------ response models


class BBox(BaseModel):
    x: float
    y: float
    w: float
    h: float


class Prediction(BaseModel):
    label: str | float = Field(description="class label (`unknown` when rejected) or regression value")
    score: float


class FaceOut(BaseModel):
    bbox: BBox
    landmarks: list[float] = Field(description="10 floats: eyes, nose tip, mouth corners as x, y")
    det_score: float
    predictions: dict[str, Prediction]
    embedding: list[float] | None = Field(None, description="128-d unit vector, only with ?embedding=1")


class FacesOut(BaseModel):
    width: int
    height: int
    faces: list[FaceOut]
    model_version: str | None


class PredictionsOut(BaseModel):
    rows: list[dict[str, Any]]
    total: int = Field(description="rows matching the query")
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page, null on the last one")
    table_uri: str


class ErrorOut(BaseModel):
    error: str
    status: int


ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 404, 413, 415, 422, 503)}


# ------------------------------------------------------------------------ deployments


def _settings():
    from pipeline.settings import Settings

    return Settings.from_env()


@serve.deployment(max_ongoing_requests=8)
class Faces:
    """Decode, detect and align one photo: the scoring job's CPU stage, unchanged."""

    def __init__(self) -> None:
        from pipeline.faces import FaceDetector

        self.settings = _settings()
        self.detector = FaceDetector.from_settings(self.settings)
        self._lock = threading.Lock()  # one detector per replica; Serve runs sync calls in threads

    def analyse(self, data: bytes):
        from pipeline.photos import analyse_photo

        with self._lock:
            return analyse_photo(data, self.detector, self.settings.max_pixels)

    def check_health(self) -> None:
        if self.detector is None:
            raise RuntimeError("no detector")


@serve.deployment(max_ongoing_requests=64)
class Embeddings:
    """Face chips → 128-d unit embeddings; concurrent requests share a forward pass."""

    def __init__(self, batch_size: int = 32) -> None:
        from pipeline.embed import Embedder

        self.embedder = Embedder(_settings().weights, flip_tta=False, batch_size=batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def __call__(self, chips: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(c) for c in chips]
        emb = await asyncio.to_thread(self.embedder, np.concatenate(chips))
        return np.split(emb, np.cumsum(sizes)[:-1])

    def info(self) -> dict[str, Any]:
        spec = self.embedder.spec
        return {"backbone": spec.id, "embedding_dim": spec.embedding_dim, "chip_size": spec.geometry.size,
                "model_id": getattr(self.embedder, "model_id", spec.id),
                "device": str(getattr(self.embedder, "device", "cpu"))}


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

    def predict(self, embeddings: np.ndarray) -> tuple[list[dict[str, dict]], str | None]:
        """Per face {task: {label, score}} for the faces of ONE photo, and the bundle's version."""
        _, bundle = self._state  # one snapshot: labels and version come from the same bundle
        n = len(embeddings)
        if bundle is None:
            return [{} for _ in range(n)], None
        if n == 0:
            return [], bundle.model_version
        preds = bundle.predict(embeddings, np.zeros(n, np.int64))  # one photo: joint identities
        out: list[dict[str, dict]] = [{} for _ in range(n)]
        for task, kind in bundle.tasks:
            labels, scores = preds[task]
            for i in range(n):
                label = str(labels[i]) if kind == "classification" else float(labels[i])
                out[i][task] = {"label": label, "score": float(scores[i])}
        return out, bundle.model_version

    def info(self) -> dict[str, Any]:
        uri, bundle = self._state
        if bundle is None:
            return {"model_uri": None, "model_version": None, "tasks": []}
        meta = bundle.meta
        tasks = [{k: v for k, v in s.to_json().items() if k in ("name", "kind", "labels", "open_set", "exclusive")}
                 for s in bundle.specs]
        return {"model_uri": uri, "model_version": bundle.model_version, "tasks": tasks,
                "created_at": meta.get("created_at"), "backbone": meta.get("backbone"),
                "metrics": meta.get("metrics")}


@serve.deployment(max_ongoing_requests=32)
class Predictions:
    """A batch prediction table (``user_config.table_uri``) indexed in memory."""

    def __init__(self) -> None:
        self._state: tuple[tuple[str | None, bool], Any] = ((None, False), None)

    def reconfigure(self, config: dict | None) -> None:
        config = config or {}
        key = (config.get("table_uri") or None, bool(config.get("embeddings", False)))
        if key[0] is None:
            self._state = (key, None)
            return
        from serve.lookup import PredictionIndex

        self._state = (key, PredictionIndex.load(key[0], embeddings=key[1]))

    def query(self, image_uri: str | None, filters: dict[str, str], limit: int, offset: int,
              embeddings: bool) -> dict[str, Any]:
        from serve.lookup import TableError

        index = self._state[1]
        if index is None:
            return {"error": "no prediction table configured (Predictions user_config table_uri)", "status": 404}
        try:
            page = index.query(image_uri, filters, limit, offset, embeddings)
        except TableError as exc:
            return {"error": str(exc), "status": 400}
        return {"rows": page.rows, "total": page.total, "offset": page.offset, "limit": page.limit,
                "next_offset": page.next_offset, "table_uri": index.uri}

    def info(self) -> dict[str, Any] | None:
        index = self._state[1]
        return None if index is None else index.describe()


# ------------------------------------------------------------------------ the ingress

app = FastAPI(
    title="faceray",
    version="1",
    description="Faces, boxes, landmarks, embeddings and labels for one photo; rows of a batch "
                "prediction table. With a token configured every /v1 route needs "
                "`Authorization: Bearer <token>`; /healthz and /docs stay open.",
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.reason, "status": exc.status}, exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail), "status": exc.status_code}, exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    parts = ["{}: {}".format(".".join(str(p) for p in e.get("loc", ())), e.get("msg")) for e in exc.errors()]
    return JSONResponse({"error": "; ".join(parts), "status": 422}, 422)


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
FACES_OPENAPI = {"requestBody": {"required": True, "content": {
    **{t: IMAGE_BODY for t in sorted(set(IMAGE_MEDIA_TYPES.values()))},
    "application/octet-stream": IMAGE_BODY,
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}},
}}}
STATUS_HTTP = {"decode_error": 400, "too_large": 413, "read_error": 400}


_PROBE: bytes | None = None


def _probe_png() -> bytes:
    """A small real PNG (gray gradient) for the health check's trip through the decoder."""
    global _PROBE
    if _PROBE is None:
        import cv2

        img = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1))
        _PROBE = cv2.imencode(".png", np.dstack([img] * 3))[1].tobytes()
    return _PROBE


async def _multipart_image(request: Request, body: bytes, cap: int) -> bytes:
    """Field ``image`` of a multipart body that was already read (and size-checked)."""
    from starlette.requests import Request as StarletteRequest

    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, receive).form(max_files=4, max_fields=16, max_part_size=cap)
    except Exception as exc:  # malformed multipart is the client's error
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    part = form.get("image")
    if part is None:
        raise ApiError(400, "multipart body has no `image` field")
    return await part.read() if hasattr(part, "read") else str(part).encode()


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Api:
    """HTTP in front of the stages: reads and checks the body, then faces → embeddings → heads."""

    def __init__(self, faces, embeddings, heads, predictions, api_token: str | None = None) -> None:
        self.faces, self.embeddings, self.heads, self.predictions = faces, embeddings, heads, predictions
        self.api_token = api_token or _settings().api_token or None
        self.max_body_bytes = DEFAULT_MAX_BODY

    def reconfigure(self, config: dict | None) -> None:
        self.max_body_bytes = int((config or {}).get("max_body_bytes") or DEFAULT_MAX_BODY)

    def _authorize(self, request: Request) -> None:
        if not self.api_token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.api_token.encode()):
            raise ApiError(401, "wrong bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def _read_image(self, request: Request) -> bytes:
        """The photo's bytes (raw body or multipart field ``image``), within the size cap."""
        cap = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"body is {int(declared)} bytes, limit {cap}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise ApiError(413, f"body exceeds the limit of {cap} bytes")
        data = bytes(body)
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            data = await _multipart_image(request, data, cap)
        if not data:
            raise ApiError(400, "empty body: send the image bytes, or a multipart field `image`")
        if sniff_format(data) is None:
            raise ApiError(415, "not an image this service reads (JPEG, PNG, WebP, BMP, TIFF, GIF), "
                                f"first bytes {data[:8]!r}")
        return data

    @app.post("/v1/faces", response_model=FacesOut, response_model_exclude_unset=True,
              responses=ERRORS, openapi_extra=FACES_OPENAPI)
    async def faces_of_photo(self, request: Request, embedding: bool = False) -> dict[str, Any]:
        """Faces of one photo with boxes, landmarks and each task's label (same numbers as the batch job)."""
        self._authorize(request)
        data = await self._read_image(request)
        photo = await self.faces.analyse.remote(data)
        if photo.status in STATUS_HTTP:
            raise ApiError(STATUS_HTTP[photo.status], f"{photo.status}: {photo.error}")
        emb = np.zeros((0, 128), np.float32)
        if photo.faces:
            emb = await self.embeddings.remote(photo.chips)
        preds, version = await self.heads.predict.remote(emb)
        faces = []
        for i, f in enumerate(photo.faces):
            x, y, w, h = (float(v) for v in f.bbox)
            face: dict[str, Any] = {"bbox": {"x": x, "y": y, "w": w, "h": h},
                                    "landmarks": [float(v) for v in np.ravel(f.landmarks)],
                                    "det_score": float(f.score), "predictions": preds[i]}
            if embedding:
                face["embedding"] = [float(v) for v in emb[i]]
            faces.append(face)
        return {"width": int(photo.width), "height": int(photo.height), "faces": faces,
                "model_version": version}

    @app.get("/v1/predictions", response_model=PredictionsOut, responses=ERRORS)
    async def prediction_rows(self, request: Request, image_uri: str | None = None,
                              limit: int = DEFAULT_LIMIT, offset: int = 0,
                              embedding: bool = False) -> dict[str, Any]:
        """Rows of the batch table: `?image_uri=…` and/or `?<column>=<label>` (a task or `status`).

        Paged by `offset`/`limit` (≤ 1000) in table order (image_uri, face_index); `next_offset`
        is the cursor.  `embedding=1` adds embeddings only when the table was loaded with them.
        """
        self._authorize(request)
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, f"limit must be 1..{MAX_LIMIT}, got {limit}")
        if offset < 0:
            raise ApiError(400, f"offset must be ≥ 0, got {offset}")
        reserved = {"image_uri", "limit", "offset", "embedding"}
        filters = {k: v for k, v in request.query_params.items() if k not in reserved}
        if image_uri is None and not filters:
            raise ApiError(400, "give image_uri=… or a <task>=<label> (or status=…) filter")
        result = await self.predictions.query.remote(image_uri, filters, limit, offset, embedding)
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        return result

    @app.get("/v1/model", responses=ERRORS)
    async def model(self, request: Request) -> dict[str, Any]:
        """The bundle in use (tasks, labels, version), the embedding backbone and the table."""
        self._authorize(request)
        info = await self.heads.info.remote()
        info["embedding"] = await self.embeddings.info.remote()
        info["table"] = await self.predictions.info.remote()
        return info

    @app.get("/healthz", responses=ERRORS)
    async def healthz(self) -> JSONResponse:
        """Runs a tiny batch through every stage (decode/detect, embed, heads); 503 if one fails."""
        try:
            photo = await self.faces.analyse.remote(_probe_png())
            if photo.status not in ("ok", "no_face"):
                raise RuntimeError(f"faces stage: probe photo got {photo.status}: {photo.error}")
            chip = np.full((1, 128, 128, 3), 127, np.uint8)
            emb = await self.embeddings.remote(chip)
            norm = float(np.linalg.norm(emb[0]))
            if not np.isfinite(emb).all() or abs(norm - 1.0) > 1e-3:
                raise RuntimeError(f"embeddings stage: probe embedding has norm {norm}")
            preds, version = await self.heads.predict.remote(emb)
            table = await self.predictions.info.remote()
        except Exception as exc:  # report, don't raise: the answer is "unhealthy", not a crash
            return JSONResponse({"status": "unhealthy", "error": f"{type(exc).__name__}: {exc}"}, 503)
        return JSONResponse({"status": "ok", "model_version": version, "tasks": sorted(preds[0]),
                             "table_rows": None if table is None else table["rows"]})


# ------------------------------------------------------------------------ building the app


def actor_options(resources: dict[str, float]) -> dict[str, dict[str, float]]:
    """CPU/GPU requests per deployment from what the cluster has.

    A GPU is requested (for Embeddings only) when the cluster has one: asking for a GPU
    that does not exist leaves the replica pending forever.  Small clusters (≤ 4 CPUs)
    get fractional CPUs so the whole app fits next to a scoring job.
    """
    cpus, gpus = float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))
    small = cpus <= 4
    embed = {"num_cpus": 1.0, "num_gpus": 1.0} if gpus >= 1 else {"num_cpus": 0.5 if small else 1.0}
    return {"Faces": {"num_cpus": 0.5 if small else 1.0}, "Embeddings": embed,
            "Heads": {"num_cpus": 0.1 if small else 0.25}, "Predictions": {"num_cpus": 0.1 if small else 0.5},
            "Api": {"num_cpus": 0.1 if small else 0.5}}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application; ``args`` (all optional): ``model`` (bundle URI), ``table`` (prediction
    table URI), ``table_embeddings`` (bool), ``max_body_bytes``, ``token`` (else the replica's
    FACERAY_API_TOKEN), ``faces_replicas``.  ``serve/config.yaml``'s user_config overrides
    model/table/max_body_bytes.
    """
    import ray

    args = dict(args or {})
    opts = actor_options(ray.cluster_resources() if ray.is_initialized() else {})
    token = args.get("token") or os.environ.get("FACERAY_API_TOKEN") or None
    faces = Faces.options(ray_actor_options=opts["Faces"],
                          num_replicas=int(args.get("faces_replicas") or 1)).bind()
    embeddings = Embeddings.options(ray_actor_options=opts["Embeddings"]).bind()
    heads = Heads.options(ray_actor_options=opts["Heads"],
                          user_config={"model_uri": args.get("model")}).bind()
    predictions = Predictions.options(
        ray_actor_options=opts["Predictions"],
        user_config={"table_uri": args.get("table"), "embeddings": bool(args.get("table_embeddings"))}).bind()
    return Api.options(ray_actor_options=opts["Api"],
                       user_config={"max_body_bytes": int(args.get("max_body_bytes") or DEFAULT_MAX_BODY)}
                       ).bind(faces, embeddings, heads, predictions, token)
