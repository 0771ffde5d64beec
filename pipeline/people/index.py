"""Serving helpers: the people list (``GET /v1/people``) and face search (``POST /v1/search``)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.people.ids import person_strings, previous_numbers
from pipeline.people.reading import Faces, PeopleError, parquet_files, read_faces, read_people


def list_people(people: pa.Table | str, limit: int = 50, offset: int = 0) -> list[dict]:
    """``GET /v1/people``: people largest first (ties by id), each with its size and the
    face nearest its centre as the representative."""
    if isinstance(people, str):
        fs, files = parquet_files(people)
        if not files:
            raise PeopleError(f"{people}: no people table")
        people = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    t = people.sort_by([("person", "ascending"), ("similarity", "descending")])
    person = t.column("person").combine_chunks()
    first = np.flatnonzero(np.r_[True, pc.not_equal(person[1:], person[:-1]).to_numpy(zero_copy_only=False)])
    reps = t.take(pa.array(first))
    order = np.lexsort((np.arange(reps.num_rows), -reps.column("person_size").to_numpy()))
    reps = reps.take(pa.array(order[offset:offset + limit]))
    return [{"person": p, "size": s, "image_uri": u, "face_index": i} for p, s, u, i in
            zip(reps.column("person").to_pylist(), reps.column("person_size").to_pylist(),
                reps.column("image_uri").to_pylist(), reps.column("face_index").to_pylist())]


class FaceIndex:
    """Search a table's faces by embedding (``POST /v1/search``): exact below
    ``knn.EXACT_MAX`` faces, IVF above; ``person`` from a people table when given."""

    def __init__(self, faces: Faces, person: pa.Array | None = None) -> None:
        from pipeline.knn import build_index

        self.image_uri = faces.image_uri
        self.face_index = faces.face_index
        self.person = person
        self.index = build_index(faces.embedding)

    @classmethod
    def from_uris(cls, table_uri: str, people_uri: str | None = None) -> "FaceIndex":
        faces = read_faces(table_uri)
        person = None
        if people_uri:
            prev = read_people(people_uri)
            if prev is None:
                raise PeopleError(f"{people_uri}: no people table")
            nums = previous_numbers(faces, prev)
            person = pc.if_else(pa.array(nums > 0), person_strings(nums), pa.scalar(None, pa.string()))
        return cls(faces, person)

    def __len__(self) -> int:
        return len(self.face_index)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, int, float, str | None]]]:
        """Per query (unit N×128): up to k (image_uri, face_index, similarity, person), best first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        s, i = self.index.search(q, min(k, len(self)))
        out = []
        for srow, irow in zip(s, i):
            ok = irow >= 0
            ids = pa.array(irow[ok])
            uris = self.image_uri.take(ids).to_pylist()
            people = self.person.take(ids).to_pylist() if self.person is not None else [None] * len(uris)
            out.append(list(zip(uris, self.face_index[irow[ok]].tolist(), srow[ok].astype(float).tolist(), people)))
        return out
