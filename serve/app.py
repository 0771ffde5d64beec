"""The faceray HTTP endpoint: a Ray Serve application whose FastAPI ingress ``FacePipeline``
is also the face pipeline (decode → detect → align → batched embed → heads, one replica, no
hop for the photo or its chips), next to ``Predictions`` (tables) and, on GPU clusters, GPU
``Embeddings``; the shape comes from the cluster (``pipeline.resources.serve_plan``), the HTTP
concerns live in ``serve.http``, the pipeline in ``serve.deployments.PipelineCore``.

Run: ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or from Python
``serve.run(build_app({...}))`` / ``python jobs/serve_api.py --model URI --table URI``.
"""
# No `from __future__ import annotations`: FastAPI must see real classes in the route
# signatures, and Serve ships the ingress class by value, with only the globals it names.
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from pipeline.contract import EMBEDDING_DIM, NO_FACE, OK
from pipeline.settings import Settings
from serve.deployments import RETRY_AFTER_S, Embeddings, PipelineCore, Predictions
from serve.http import (DEFAULT_K, DEFAULT_LIMIT, DEFAULT_MAX_BODY, ERRORS, MAX_K, MAX_LIMIT, PHOTO_OPENAPI,
                        STATUS_HTTP, ApiError, FacesOut, PeopleOut, PredictionsOut, SearchOut, authorize, face_json,
                        install_error_handlers, probe_png, read_photo)
from serve.review_http import (DEFAULT_FACES, DEFAULT_PEOPLE, MAX_FACES, MAX_PEOPLE, PAGE_FILES, ActOut, DecideIn,
                               ForgetIn, MergeIn, NameIn, NamesOut, ProgressOut, ReviewPeopleOut, ReviewPersonOut,
                               SuggestionsOut, check_page, page_file)

APP_NAME = "faceray"

app = FastAPI(
    title="faceray",
    version="1",
    description="Faces, boxes, landmarks, embeddings and labels for one photo; rows of a batch "
                "prediction table. With a token configured every /v1 route needs "
                "`Authorization: Bearer <token>`; /healthz and /docs stay open. A full replica "
                "answers 503 with `Retry-After`.",
)
install_error_handlers(app)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class FacePipeline(PipelineCore):
    """The ingress and the face pipeline in one replica: HTTP checks, then decode → detect →
    align → (batched) embed → heads, with no hop for the photo or its chips."""

    def __init__(self, predictions, settings: Settings, embeddings=None, features: bool = False,
                 max_batch: int = 16, max_ongoing: int = 32, detect_threads: int = 1,
                 net_threads: int | None = None) -> None:
        super().__init__(settings, embeddings, features=features, max_batch=max_batch, max_ongoing=max_ongoing,
                         detect_threads=detect_threads, net_threads=net_threads)
        self.predictions = predictions
        self.api_token = settings.api_token or None
        self.max_body_bytes = DEFAULT_MAX_BODY

    def reconfigure(self, config: dict | None) -> None:
        self.max_body_bytes = int((config or {}).get("max_body_bytes") or DEFAULT_MAX_BODY)
        self.configure(config)

    async def _photo_faces(self, request: Request):
        """The uploaded photo's faces, embeddings and labels (4xx for a bad photo, 503 when full)."""
        authorize(request, self.api_token)
        data = await read_photo(request, self.max_body_bytes)  # bad bodies never reach the models
        with self.admission.admit():  # full: 503 + Retry-After now, no queue
            photo = await self.analyse(data)
            if photo.status in STATUS_HTTP:
                raise ApiError(STATUS_HTTP[photo.status], f"{photo.status}: {photo.error}")
            emb, preds, version = np.zeros((0, EMBEDDING_DIM), np.float32), [], self.model_version
            if photo.faces:
                emb, preds, version = await self.predict(photo.chips)
        return photo, emb, preds, version

    @app.post("/v1/faces", response_model=FacesOut, response_model_exclude_unset=True,
              responses=ERRORS, openapi_extra=PHOTO_OPENAPI)
    async def faces_of_photo(self, request: Request, embedding: bool = False) -> dict[str, Any]:
        """Faces of one photo with boxes, landmarks and each task's label (same numbers as the batch job)."""
        photo, emb, preds, version = await self._photo_faces(request)
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
        info = self.model_info()
        info["embedding"] = await self.embedding_info()
        info["table"] = await self.predictions.info.remote()
        return info

    # ---- the review page (serve/review_page) and its JSON routes (serve.review, serve.review_http)

    async def _review(self, request: Request, op: str, **kwargs: Any) -> dict[str, Any]:
        authorize(request, self.api_token)
        result = await self.predictions.review.remote(op, kwargs)
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        return result

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    async def review_page(self) -> HTMLResponse:
        """The page (open: it asks for the token when /v1 answers 401)."""
        return HTMLResponse(page_file("index.html"))

    @app.get("/review/{name}", include_in_schema=False)
    async def review_file(self, name: str) -> Response:
        if name not in PAGE_FILES:
            raise ApiError(404, f"no such file: /review/{name}")
        return Response(page_file(name), media_type=PAGE_FILES[name])

    @app.get("/v1/review/people", response_model=ReviewPeopleOut, responses=ERRORS)
    async def review_people(self, request: Request, offset: int = 0, limit: int = DEFAULT_PEOPLE,
                            faces: int = 4, size: int = 96, which: str = "all") -> dict[str, Any]:
        """People to review: unnamed first (the work), then largest first, each with its most typical
        faces; `which=named` / `unnamed` lists those alone."""
        check_page(offset, limit, MAX_PEOPLE)
        return await self._review(request, "people", offset=offset, limit=limit, faces=min(max(faces, 0), 16),
                                  size=size, which=which)

    @app.get("/v1/review/person", response_model=ReviewPersonOut, responses=ERRORS)
    async def review_person(self, request: Request, person: str | None = None, name: str | None = None,
                            offset: int = 0, limit: int = DEFAULT_FACES, size: int = 128) -> dict[str, Any]:
        """One person (`?name=` when named, else `?person=` its cluster id): faces, most typical first, paged."""
        check_page(offset, limit, MAX_FACES)
        return await self._review(request, "person", person=person, name=name, offset=offset, limit=limit, size=size)

    @app.get("/v1/review/names", response_model=NamesOut, responses=ERRORS)
    async def review_names(self, request: Request) -> dict[str, Any]:
        """Names in use, sorted (the page offers them when naming)."""
        return await self._review(request, "names")

    @app.get("/v1/review/progress", response_model=ProgressOut, responses=ERRORS)
    async def review_progress(self, request: Request) -> dict[str, Any]:
        """How many faces and people are named, and how many are left."""
        return await self._review(request, "progress")

    @app.get("/v1/review/suggestions", response_model=SuggestionsOut, responses=ERRORS)
    async def review_suggestions(self, request: Request, name: str, limit: int = 24, people: int = 6,
                                 size: int = 128) -> dict[str, Any]:
        """For a named person: the unnamed faces and people nearest its centre, best first."""
        check_page(0, limit, MAX_FACES)
        return await self._review(request, "suggestions", name=name, limit=limit, people=min(max(people, 0), 50),
                                  size=size)

    @app.post("/v1/review/name", response_model=ActOut, response_model_exclude_none=True, responses=ERRORS)
    async def review_name(self, request: Request, body: NameIn) -> dict[str, Any]:
        """Name a person (`person` or its current `name`) `to`: `name` rows for its faces, except
        those marked `not` that name."""
        return await self._review(request, "name_person", name=body.to, person=body.person, current=body.name,
                                  author=body.author)

    @app.post("/v1/review/merge", response_model=ActOut, response_model_exclude_none=True, responses=ERRORS)
    async def review_merge(self, request: Request, body: MergeIn) -> dict[str, Any]:
        """Merge people under one name: `name` rows for all their faces (unnamed people need `name`)."""
        return await self._review(request, "merge", people=[p.model_dump() for p in body.people], name=body.name,
                                  author=body.author)

    @app.post("/v1/review/decide", response_model=ActOut, response_model_exclude_none=True, responses=ERRORS)
    async def review_decide(self, request: Request, body: DecideIn) -> dict[str, Any]:
        """Confirm faces as `name` and/or reject them (`not` rows: take faces out, reject suggestions)."""
        return await self._review(request, "decide", name=body.name,
                                  confirm=[(f.image_uri, f.face_index) for f in body.confirm],
                                  reject=[(f.image_uri, f.face_index) for f in body.reject], author=body.author)

    @app.post("/v1/review/forget", response_model=ActOut, response_model_exclude_none=True, responses=ERRORS)
    async def review_forget(self, request: Request, body: ForgetIn) -> dict[str, Any]:
        """Forget a name (a `forget` row): no face bears it until it is given again."""
        return await self._review(request, "forget", name=body.name, author=body.author)

    @app.get("/v1/faces/thumbnail", response_class=Response, responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}})
    async def face_thumbnail(self, request: Request, image_uri: str, face_index: int, size: int = 128) -> Response:
        """A face of the table cut from its photo by `bbox` (JPEG, `size` px square, cached; a grey
        square when the photo cannot be read)."""
        authorize(request, self.api_token)
        if not 16 <= size <= 512:
            raise ApiError(400, f"size must be 16..512, got {size}")
        result = await self.predictions.thumbnail.remote(image_uri, face_index, size)
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        return Response(result["jpeg"], media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600" if result["real"] else "no-store"})

    @app.get("/healthz", responses=ERRORS)
    async def healthz(self) -> JSONResponse:
        """Runs a tiny batch through every stage (decode/detect, embed, heads); 503 if one fails."""
        try:
            photo = await self.analyse(probe_png())
            if photo.status not in (OK, NO_FACE):
                raise RuntimeError(f"faces stage: probe photo got {photo.status}: {photo.error}")
            chip = np.full((1, 128, 128, 3), 127, np.uint8)
            emb, preds, version = await self.predict(chip)
            norm = float(np.linalg.norm(emb[0]))
            if not np.isfinite(emb).all() or abs(norm - 1.0) > 1e-3:
                raise RuntimeError(f"embeddings stage: probe embedding has norm {norm}")
            table = await self.predictions.info.remote()
        except Exception as exc:  # report, don't raise: the answer is "unhealthy", not a crash
            return JSONResponse({"status": "unhealthy", "error": f"{type(exc).__name__}: {exc}"}, 503)
        return JSONResponse({"status": "ok", "model_version": version, "tasks": sorted(preds[0]),
                             "table_rows": None if table is None else table["rows"]})


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application; ``args`` (all optional): ``model`` (bundle URI), ``table`` (prediction
    table URI: lookups and search), ``people`` (cluster_faces.py output), ``table_embeddings`` (bool),
    ``max_body_bytes``, ``token``, ``replicas`` (FacePipeline replicas; default from the cluster,
    ``pipeline.resources.serve_plan``), ``max_ongoing`` (photo requests admitted per replica before
    503), ``direct_ingress`` (bool; default: Serve runs direct ingress here and the cluster is
    one node, ``serve.ingress``: then one replica holds the cores and answers HTTP itself), and
    ``settings`` (a ``Settings`` or a dict of its fields, e.g. ``min_face``) on top of
    ``FACERAY_*``.  Settings are made here, once, and handed to every replica.
    ``serve/config.yaml``'s user_config overrides model/table/max_body_bytes/max_ongoing, and its
    ``autoscaling_config`` (if given) the replica count.
    """
    import ray

    from pipeline.resources import serve_actor_options, serve_plan

    args = dict(args or {})
    given = args.get("settings") or {}
    settings = given if isinstance(given, Settings) else Settings.from_env(**dict(given))
    if args.get("token"):
        settings = settings.model_copy(update={"api_token": args["token"]})
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    replicas = args.get("replicas") or args.get("faces_replicas")
    direct = args.get("direct_ingress")
    if direct is None:
        from serve import ingress

        direct = ingress.enabled() and ray.is_initialized() and sum(n["Alive"] for n in ray.nodes()) == 1
    plan = serve_plan(resources, replicas=int(replicas) if replicas else None, direct=bool(direct))
    opts = serve_actor_options(resources, plan)
    max_ongoing = int(args.get("max_ongoing") or plan.max_ongoing)
    # the attribute networks also run with --no-attributes when the bundle's heads read their features
    features = False
    if args.get("model") and not settings.attributes:
        from pipeline.heads import ModelBundle

        features = bool(ModelBundle.load(args["model"]).feature_sets)
    embeddings = None
    if not plan.fused:  # GPU cluster: the CPU replicas feed batched GPU replicas
        embeddings = Embeddings.options(ray_actor_options=opts["Embeddings"], num_replicas=plan.embed_replicas
                                        ).bind(settings, batch_size=256, features=features)
    predictions = Predictions.options(
        ray_actor_options=opts["Predictions"],
        user_config={"table_uri": args.get("table"), "people_uri": args.get("people"),
                     "labels_uri": args.get("labels"),
                     "embeddings": bool(args.get("table_embeddings"))}).bind()
    return FacePipeline.options(
        ray_actor_options=opts["FacePipeline"], autoscaling_config=plan.autoscaling_config(),
        # room for 4× the admitted photo requests, so that the rest reach the replica and get
        # our 503 (JSON, Retry-After) at once, and for cheap ones (4xx, lookups); Serve's own
        # queue (max_queued) is the backstop: its native 503 is plain text (with Retry-After)
        max_ongoing_requests=4 * max_ongoing, max_queued_requests=plan.max_queued,
        backpressure_config={"retry_after_s": RETRY_AFTER_S},
        user_config={"model_uri": args.get("model"), "max_ongoing": max_ongoing,
                     "max_body_bytes": int(args.get("max_body_bytes") or DEFAULT_MAX_BODY)},
    ).bind(predictions, settings, embeddings, features=features, max_batch=plan.max_batch, max_ongoing=max_ongoing,
           detect_threads=plan.detect_threads, net_threads=plan.net_threads)
