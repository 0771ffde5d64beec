"""The review page over HTTP: request bodies and response models of the ``/v1/review/…``
routes (documented at ``/docs``; a script can drive them as the page does), and the page's
own files (``serve/review_page/``: plain HTML, CSS and JavaScript, no build step).

A person is referred to by ``name`` when it has one, else by its cluster id ``person``
(``p000042``); see ``serve.review`` for how the people table and the labels log combine.
"""
# No `from __future__ import annotations`: FastAPI and pydantic must see real classes.
from pathlib import Path

from pydantic import BaseModel, Field

from serve.http import ApiError

PAGE_DIR = Path(__file__).resolve().parent / "review_page"
PAGE_FILES = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
DEFAULT_PEOPLE, MAX_PEOPLE = 40, 200
DEFAULT_FACES, MAX_FACES = 60, 500
MAX_ACT_FACES = 10_000


def page_file(name: str) -> bytes:
    return (PAGE_DIR / name).read_bytes()


def check_page(offset: int, limit: int, most: int) -> None:
    """400 for a page out of bounds (as /v1/predictions answers)."""

    if not 1 <= limit <= most:
        raise ApiError(400, f"limit must be 1..{most}, got {limit}")
    if offset < 0:
        raise ApiError(400, f"offset must be ≥ 0, got {offset}")


class FaceRef(BaseModel):
    image_uri: str
    face_index: int


class ReviewFace(BaseModel):
    image_uri: str
    face_index: int
    similarity: float = Field(description="cosine to the centre of the person listed (suggestions: of the named person)")
    person: str | None = Field(description="the face's cluster in the people table")
    name: str | None = Field(description="the face's current name (null: unnamed)")
    thumbnail: str = Field(description="URL of the face's thumbnail (GET, bearer token as for the rest)")


class ReviewPerson(BaseModel):
    person: str | None = Field(description="cluster id (p000042); for a named person, its largest cluster")
    name: str | None = Field(description="null for an unnamed person (refer to it by `person`)")
    size: int = Field(description="faces of this person now")
    people: list[str] = Field(description="clusters its faces come from, largest share first (20 at most)")
    faces: list[ReviewFace] = Field(description="its most typical faces (highest similarity first)")
    similarity: float | None = Field(None, description="suggestions only: cosine of its centre to the named person's")


class ReviewPeopleOut(BaseModel):
    people: list[ReviewPerson] = Field(description="unnamed people first (the work), then largest first")
    total: int
    offset: int
    limit: int
    next_offset: int | None


class ReviewPersonOut(ReviewPerson):
    offset: int
    limit: int
    next_offset: int | None


class NamesOut(BaseModel):
    names: list[str]


class ProgressOut(BaseModel):
    faces: int = Field(description="faces in the table")
    faces_named: int
    faces_left: int = Field(description="faces of the people table without a name")
    people_named: int
    people_left: int = Field(description="unnamed people (1 face or more)")
    people_left_2plus: int = Field(description="unnamed people of 2 faces or more")
    labels_rows: int = Field(description="rows of the labels log replayed")


class SuggestionsOut(BaseModel):
    name: str
    faces: list[ReviewFace] = Field(description="unnamed faces nearest the person's centre, best first")
    people: list[ReviewPerson] = Field(description="unnamed people (2+ faces) nearest it, best first")


class PersonRef(BaseModel):
    person: str | None = Field(None, description="an unnamed person's cluster id")
    name: str | None = Field(None, description="a named person's name")


class NameIn(PersonRef):
    to: str = Field(description="the name to give (names in use: GET /v1/review/names)")
    author: str | None = None


class MergeIn(BaseModel):
    people: list[PersonRef] = Field(min_length=2, description="two or more people")
    name: str | None = Field(None, description="the name of the merged person; needed when none is named "
                                               "or when they bear different names")
    author: str | None = None


class DecideIn(BaseModel):
    name: str = Field(description="the named person decided about")
    confirm: list[FaceRef] = Field(default_factory=list, max_length=MAX_ACT_FACES,
                                   description="faces that are this person (`name` rows)")
    reject: list[FaceRef] = Field(default_factory=list, max_length=MAX_ACT_FACES,
                                  description="faces that are not (`not` rows): take out / reject")
    author: str | None = None


class ForgetIn(BaseModel):
    name: str
    author: str | None = None


class ActOut(BaseModel):
    written: int = Field(description="labels-log rows written")
    labels_file: str | None = Field(description="the log file this act wrote")
    name: str
    confirmed: int | None = None
    rejected: int | None = None
