"""The faceray HTTP endpoint: a Ray Serve application with a FastAPI ingress (``Api``) in
front of the deployments of ``serve.deployments``; the HTTP concerns live in ``serve.http``.

Run: ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or from Python
``serve.run(build_app({...}))`` / ``python jobs/serve_api.py --model URI --table URI``.
"""
# No `from __future__ import annotations`: FastAPI must see real classes in the route
# signatures, and Serve ships the ingress class by value, with only the globals it names.
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from pipeline.contract import EMBEDDING_DIM, NO_FACE, OK
from pipeline.settings import Settings
from serve.deployments import Embeddings, Faces, Heads, Predictions
from serve.http import (DEFAULT_K, DEFAULT_LIMIT, DEFAULT_MAX_BODY, ERRORS, MAX_K, MAX_LIMIT, PHOTO_OPENAPI,
                        STATUS_HTTP, ApiError, FacesOut, PeopleOut, PredictionsOut, SearchOut, authorize, face_json,
                        install_error_handlers, probe_png, read_photo)

APP_NAME = "faceray"

app = FastAPI(
    title="faceray",
    version="1",
    description="Faces, boxes, landmarks, embeddings and labels for one photo; rows of a batch "
                "prediction table. With a token configured every /v1 route needs "
                "`Authorization: Bearer <token>`; /healthz and /docs stay open.",
)
install_error_handlers(app)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Api:
    """HTTP in front of the stages: reads and checks the body, then faces → embeddings → heads."""

    def __init__(self, faces, embeddings, heads, predictions, settings: Settings) -> None:
        self.faces, self.embeddings, self.heads, self.predictions = faces, embeddings, heads, predictions
        self.api_token = settings.api_token or None
        self.max_body_bytes = DEFAULT_MAX_BODY

    def reconfigure(self, config: dict | None) -> None:
        self.max_body_bytes = int((config or {}).get("max_body_bytes") or DEFAULT_MAX_BODY)

    async def _photo_faces(self, request: Request):
        """The uploaded photo's faces, embeddings and built-in attributes (4xx for a bad photo)."""
        authorize(request, self.api_token)
        data = await read_photo(request, self.max_body_bytes)
        photo = await self.faces.analyse.remote(data)
        if photo.status in STATUS_HTTP:
            raise ApiError(STATUS_HTTP[photo.status], f"{photo.status}: {photo.error}")
        emb, builtin, features = np.zeros((0, EMBEDDING_DIM), np.float32), None, None
        if photo.faces:
            emb, builtin, features = await self.embeddings.remote(photo.chips)
        return photo, emb, builtin, features

    @app.post("/v1/faces", response_model=FacesOut, response_model_exclude_unset=True,
              responses=ERRORS, openapi_extra=PHOTO_OPENAPI)
    async def faces_of_photo(self, request: Request, embedding: bool = False) -> dict[str, Any]:
        """Faces of one photo with boxes, landmarks and each task's label (same numbers as the batch job)."""
        photo, emb, builtin, features = await self._photo_faces(request)
        preds, version = await self.heads.predict.remote(emb, builtin, features)
        faces = []
        for i, f in enumerate(photo.faces):
            face = {**face_json(f), "predictions": preds[i]}
            if embedding:
                face["embedding"] = [float(v) for v in emb[i]]
            faces.append(face)
        return {"width": int(photo.width), "height": int(photo.height), "faces": faces,
                "model_version": version}

    @app.post("/v1/search", response_model=SearchOut, responses=ERRORS, openapi_extra=PHOTO_OPENAPI)
    async def search(self, request: Request, k: int = DEFAULT_K) -> dict[str, Any]:
        """For every face of the photo, the `k` (1–100) nearest faces of the configured table."""
        authorize(request, self.api_token)
        if not 1 <= k <= MAX_K:
            raise ApiError(400, f"k must be 1..{MAX_K}, got {k}")
        photo, emb, _, _ = await self._photo_faces(request)
        result = await self.predictions.search.remote(emb, k)
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        faces = [{**face_json(f), "matches": m} for f, m in zip(photo.faces, result["matches"])]
        return {"width": int(photo.width), "height": int(photo.height), "faces": faces}

    @app.get("/v1/people", response_model=PeopleOut, responses=ERRORS)
    async def people(self, request: Request, limit: int = DEFAULT_LIMIT, offset: int = 0) -> dict[str, Any]:
        """The people of the configured people table, largest first, with a representative face."""
        authorize(request, self.api_token)
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, f"limit must be 1..{MAX_LIMIT}, got {limit}")
        if offset < 0:
            raise ApiError(400, f"offset must be ≥ 0, got {offset}")
        result = await self.predictions.people.remote(limit, offset)
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        return result

    @app.get("/v1/predictions", response_model=PredictionsOut, responses=ERRORS)
    async def prediction_rows(self, request: Request, image_uri: str | None = None,
                              limit: int = DEFAULT_LIMIT, offset: int = 0,
                              embedding: bool = False) -> dict[str, Any]:
        """Rows of the batch table: `?image_uri=…` and/or `?<column>=<label>` (a task or `status`).

        Paged by `offset`/`limit` (≤ 1000) in table order (image_uri, face_index); `next_offset`
        is the cursor.  `embedding=1` adds embeddings only when the table was loaded with them.
        """
        authorize(request, self.api_token)
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
        authorize(request, self.api_token)
        info = await self.heads.info.remote()
        info["embedding"] = await self.embeddings.info.remote()
        info["table"] = await self.predictions.info.remote()
        return info

    @app.get("/healthz", responses=ERRORS)
    async def healthz(self) -> JSONResponse:
        """Runs a tiny batch through every stage (decode/detect, embed, heads); 503 if one fails."""
        try:
            photo = await self.faces.analyse.remote(probe_png())
            if photo.status not in (OK, NO_FACE):
                raise RuntimeError(f"faces stage: probe photo got {photo.status}: {photo.error}")
            chip = np.full((1, 128, 128, 3), 127, np.uint8)
            emb, builtin, features = await self.embeddings.remote(chip)
            norm = float(np.linalg.norm(emb[0]))
            if not np.isfinite(emb).all() or abs(norm - 1.0) > 1e-3:
                raise RuntimeError(f"embeddings stage: probe embedding has norm {norm}")
            preds, version = await self.heads.predict.remote(emb, builtin, features)
            table = await self.predictions.info.remote()
        except Exception as exc:  # report, don't raise: the answer is "unhealthy", not a crash
            return JSONResponse({"status": "unhealthy", "error": f"{type(exc).__name__}: {exc}"}, 503)
        return JSONResponse({"status": "ok", "model_version": version, "tasks": sorted(preds[0]),
                             "table_rows": None if table is None else table["rows"]})


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application; ``args`` (all optional): ``model`` (bundle URI), ``table`` (prediction
    table URI: lookups and search), ``people`` (cluster_faces.py output), ``table_embeddings`` (bool), ``max_body_bytes``, ``token``, ``faces_replicas``,
    and ``settings`` (a ``Settings`` or a dict of its fields, e.g. ``min_face``) on top of
    ``FACERAY_*``.  Settings are made here, once, and handed to every replica.
    ``serve/config.yaml``'s user_config overrides model/table/max_body_bytes.
    """
    import ray

    from pipeline.resources import serve_actor_options

    args = dict(args or {})
    given = args.get("settings") or {}
    settings = given if isinstance(given, Settings) else Settings.from_env(**dict(given))
    if args.get("token"):
        settings = settings.model_copy(update={"api_token": args["token"]})
    opts = serve_actor_options(ray.cluster_resources() if ray.is_initialized() else {})
    faces = Faces.options(ray_actor_options=opts["Faces"],
                          num_replicas=int(args.get("faces_replicas") or 1)).bind(settings)
    # the attribute networks also run with --no-attributes when the bundle's heads read their features
    features = False
    if args.get("model") and not settings.attributes:
        from pipeline.heads import ModelBundle

        features = bool(ModelBundle.load(args["model"]).feature_sets)
    embeddings = Embeddings.options(ray_actor_options=opts["Embeddings"]).bind(settings, features=features)
    heads = Heads.options(ray_actor_options=opts["Heads"],
                          user_config={"model_uri": args.get("model")}).bind()
    predictions = Predictions.options(
        ray_actor_options=opts["Predictions"],
        user_config={"table_uri": args.get("table"), "people_uri": args.get("people"),
                     "embeddings": bool(args.get("table_embeddings"))}).bind()
    return Api.options(ray_actor_options=opts["Api"],
                       user_config={"max_body_bytes": int(args.get("max_body_bytes") or DEFAULT_MAX_BODY)}
                       ).bind(faces, embeddings, heads, predictions, settings)
