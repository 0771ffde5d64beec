"""The HTTP side of the endpoint, apart from the models: reading and checking the body,
format sniffing, the bearer token, errors rendered as ``{"error", "status"}``, and the
response models FastAPI documents at ``/docs``.
"""
# No `from __future__ import annotations`: FastAPI and pydantic must see real classes.
import hmac
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.contract import DECODE_ERROR, PHOTO_FORMAT_NAMES, PHOTO_MEDIA_TYPES, READ_ERROR, TOO_LARGE, sniff_photo

DEFAULT_MAX_BODY = 20 * 1024 * 1024
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
DEFAULT_K, MAX_K = 10, 100
#: A photo's status → the HTTP error it is for a single uploaded photo.
STATUS_HTTP = {DECODE_ERROR: 400, TOO_LARGE: 413, READ_ERROR: 400}


class ApiError(Exception):
    """An HTTP error with a reason; rendered as ``{"error": reason, "status": code}``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


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


class Match(BaseModel):
    image_uri: str
    face_index: int
    similarity: float = Field(description="cosine of the two faces' embeddings (1: identical)")
    person: str | None = Field(description="the face's person in the configured people table, else null")


class FaceMatches(BaseModel):
    bbox: BBox
    landmarks: list[float]
    det_score: float
    matches: list[Match] = Field(description="nearest faces of the table, best first")


class SearchOut(BaseModel):
    width: int
    height: int
    faces: list[FaceMatches]


class Person(BaseModel):
    person: str
    size: int = Field(description="faces of this person in the table")
    image_uri: str = Field(description="a representative face: the one nearest the person's centre")
    face_index: int


class PeopleOut(BaseModel):
    people: list[Person]
    total: int
    offset: int
    limit: int
    next_offset: int | None
    people_uri: str


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
IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PHOTO_OPENAPI = {"requestBody": {"required": True, "content": {
    **{t: IMAGE_BODY for t in PHOTO_MEDIA_TYPES},
    "application/octet-stream": IMAGE_BODY,
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}},
}}}


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or FastAPI's, as ``{"error": reason, "status": code}``."""

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


class Admission:
    """At most ``limit`` requests inside ``admit()`` at once (one event loop: a plain counter);
    the next one gets 503 + ``Retry-After`` at once instead of a place in a queue."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.retry_after_s, self.inside = int(limit), int(retry_after_s), 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.inside >= self.limit:
            raise ApiError(503, f"overloaded: {self.limit} photo requests in progress on this replica, "
                                f"retry in {self.retry_after_s} s", {"Retry-After": str(self.retry_after_s)})
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1


def authorize(request: Request, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (no token: open)."""
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "wrong bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def read_photo(request: Request, cap: int) -> bytes:
    """The photo's bytes (raw body or multipart field ``image``), within the size cap and
    in a format the decoder reads — decided by the bytes, not by Content-Type."""
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
    if sniff_photo(data) is None:
        raise ApiError(415, f"not a photo this service reads ({PHOTO_FORMAT_NAMES}), first bytes {data[:12]!r}")
    return data


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


def face_json(face: Any) -> dict[str, Any]:
    """A detected face (``pipeline.faces.Face``) as the API shows it."""
    x, y, w, h = (float(v) for v in face.bbox)
    return {"bbox": {"x": x, "y": y, "w": w, "h": h}, "landmarks": [float(v) for v in np.ravel(face.landmarks)],
            "det_score": float(face.score)}


_PROBE: bytes | None = None


def probe_png() -> bytes:
    """A small real PNG (grey gradient) for the health check's trip through the decoder."""
    global _PROBE
    if _PROBE is None:
        import cv2

        img = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1))
        _PROBE = cv2.imencode(".png", np.dstack([img] * 3))[1].tobytes()
    return _PROBE
