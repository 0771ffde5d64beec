"""Person ids: ``p000001``… given largest first, kept across ``--resume``."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.people.reading import Faces


def ranked_ids(labels: np.ndarray, first: int = 1) -> np.ndarray:
    """Label → id number, largest person first (ties: the earlier face), from ``first``."""
    sizes = np.bincount(labels)
    first_row = np.full(len(sizes), len(labels))
    np.minimum.at(first_row, labels, np.arange(len(labels)))
    order = np.lexsort((first_row, -sizes))
    num = np.empty(len(sizes), np.int64)
    num[order] = np.arange(first, first + len(sizes))
    return num


def person_strings(nums: np.ndarray) -> pa.Array:
    """1 → "p000001" (more digits past 999999)."""
    return pc.binary_join_element_wise("p", pc.utf8_lpad(pc.cast(pa.array(nums), pa.string()), 6, "0"), "")


def person_numbers(person: pa.Array | pa.ChunkedArray) -> np.ndarray:
    s = pc.utf8_slice_codeunits(person, 1)
    return np.asarray(pc.cast(s, pa.int64()).to_numpy(zero_copy_only=False))


def previous_numbers(faces: Faces, previous: pa.Table) -> np.ndarray:
    """Person number of each face that the previous output already holds, else 0 (a hash join)."""
    mine = pa.table({"image_uri": faces.image_uri, "face_index": pa.array(faces.face_index, pa.int32()),
                     "row": pa.array(np.arange(len(faces), dtype=np.int64))})
    prev = previous.select(["image_uri", "face_index"]).append_column("num", pa.array(person_numbers(previous.column("person"))))
    prev = prev.cast(pa.schema([("image_uri", pa.string()), ("face_index", pa.int32()), ("num", pa.int64())]))
    j = mine.join(prev, keys=["image_uri", "face_index"], join_type="inner")
    nums = np.zeros(len(faces), np.int64)
    nums[j.column("row").to_numpy()] = j.column("num").to_numpy()
    return nums
