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


SMALL = 1_000_000   # faces a replica indexes itself when the people output has no _index/ (512 MB of floats)


class FaceIndex:
    """Search a table's faces by embedding (``POST /v1/search``).  The people job's index
    (``<people>/_index/``, ``search_index.py``) when there is one; else, for a table of at
    most ``SMALL`` faces, one built here (exact below ``knn.EXACT_MAX`` faces, IVF above)."""

    def __init__(self, index, image_uri: pa.Array, face_index: np.ndarray, person: pa.Array | None = None,
                 source: str = "") -> None:
        self.index = index
        self.image_uri = image_uri
        self.face_index = face_index
        self.person = person
        self.source = source           # where the index came from, for the replica's log

    @classmethod
    def build(cls, faces: Faces, person: pa.Array | None = None) -> "FaceIndex":
        from pipeline.knn import build_index

        return cls(build_index(faces.embedding), faces.image_uri, faces.face_index, person,
                   f"built from the table's {len(faces)} embeddings")

    @classmethod
    def from_uris(cls, table_uri: str, people_uri: str | None = None, small: int = SMALL) -> "FaceIndex":
        """The people output's index, else one built from a small table; a big table with no
        index is a ``PeopleError`` that says how to write one."""
        from pipeline.people.search_index import open_index

        why = "no people table configured (--people)"
        if people_uri:
            loaded, why = open_index(people_uri)
            if loaded is not None:
                k = loaded.keys
                return cls(loaded.index, k.column("image_uri").combine_chunks(),
                           k.column("face_index").to_numpy(zero_copy_only=False), k.column("person").combine_chunks(),
                           f"{people_uri.rstrip('/')}/_index ({loaded.manifest['kind']}, "
                           f"{loaded.manifest['faces']} faces)")
        fs, files = parquet_files(table_uri)
        rows = pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0
        if rows > small:
            raise PeopleError(f"{table_uri}: {rows} rows, more than the {small} a replica indexes itself, and {why}: "
                              f"run jobs/cluster_faces.py --table {table_uri} --output PEOPLE (it writes "
                              f"PEOPLE/_index) and serve with --people PEOPLE")
        faces = read_faces(table_uri)
        person = None
        if people_uri:
            prev = read_people(people_uri)
            if prev is None:
                raise PeopleError(f"{people_uri}: no people table")
            nums = previous_numbers(faces, prev)
            person = pc.if_else(pa.array(nums > 0), person_strings(nums), pa.scalar(None, pa.string()))
        return cls.build(faces, person)

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
