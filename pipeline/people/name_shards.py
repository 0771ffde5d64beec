"""The labels log's constraints (``names.constrain``) on the people job's shards.

Why: ``constrain`` only changes people that hold a face with a decision (a name or a
`not`); every other face keeps its number.  So only those people's faces come to the
driver — O(faces of decided people) + O(people), not the whole table — and the new
numbers go back to the shards as tasks.  A fresh run then renumbers people largest first
from per-shard (person, size, first row) counts, as ``ids.ranked_ids`` would on all faces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import labels
from pipeline.people.ids import person_strings
from pipeline.people.names import (KEYS, NameReport, _decisions, _keys, constrain, name_counts,
                                   person_name_table, with_names)
from pipeline.people.spread import Clustered, _centres, _max_number, _remote, _sums


@dataclass
class Named:
    report: NameReport
    by_person: pa.Table        # (person, name) of every named person: what the part writers stamp
    counts: dict               # ``_people.json``'s ``names``


def _decided_people(keys: pa.Table, nums: np.ndarray, decided: pa.Table) -> np.ndarray:
    """Person numbers of this shard's faces that carry a decision."""
    j = _keys(keys).join(decided, keys=KEYS, join_type="inner")
    return np.unique(nums[j.column("_row").to_numpy()])


def _take(keys: pa.Table, x: np.ndarray, nums: np.ndarray, people: np.ndarray) -> tuple:
    """(rows, keys, embeddings, numbers) of this shard's faces of ``people``."""
    rows = np.flatnonzero(np.isin(nums, people))
    return rows, keys.select(KEYS).take(pa.array(rows)), x[rows], nums[rows]


def _put(nums: np.ndarray, rows: np.ndarray, new: np.ndarray) -> np.ndarray:
    out = nums.copy()
    out[rows] = new
    return out


def _sizes(lo: int, nums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(person numbers, faces, first global row) of one shard."""
    uniq, first, counts = np.unique(nums, return_index=True, return_counts=True)
    return uniq, counts.astype(np.int64), first.astype(np.int64) + lo


def _map(nums: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return new[np.searchsorted(old, nums)]


def _ranked(parts: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(old numbers sorted, new numbers): 1… largest first, ties the earlier face (``ranked_ids``)."""
    nums = np.concatenate([p[0] for p in parts])
    uniq, inv = np.unique(nums, return_inverse=True)
    sizes = np.bincount(inv, weights=np.concatenate([p[1] for p in parts]), minlength=len(uniq))
    first = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(first, inv, np.concatenate([p[2] for p in parts]))
    new = np.empty(len(uniq), np.int64)
    new[np.lexsort((first, -sizes))] = np.arange(1, len(uniq) + 1)
    return uniq, new


def apply_labels(c: Clustered, state: labels.LabelState, threshold: float, renumber: bool) -> Named:
    """``constrain`` on the people holding a decided face; ``c.nums`` replaced by task refs.
    ``renumber``: a fresh run (ids 1… largest first again); a ``--resume`` keeps its ids."""
    import ray

    decided = pa.concat_tables([_decisions(state.named), _decisions(state.rejected)]).select(KEYS)
    decided = decided.group_by(KEYS).aggregate([])
    decided_ref = ray.put(decided)
    touched = np.unique(np.concatenate(
        [np.zeros(0, np.int64), *ray.get([_remote(_decided_people).remote(k, v, decided_ref)
                                          for k, v in zip(c.keys, c.nums)])]))
    touched_ref = ray.put(touched)
    take = _remote(_take, 4)
    parts = [take.remote(k, x, v, touched_ref) for k, x, v in zip(c.keys, c.xs, c.nums)]
    rows = ray.get([p[0] for p in parts])
    keys = pa.concat_tables(ray.get([p[1] for p in parts]))
    x = np.concatenate([np.zeros((0, 128), np.float32), *ray.get([p[2] for p in parts])])
    nums = np.concatenate([np.zeros(0, np.int64), *ray.get([p[3] for p in parts])])
    outside = None
    if len(state.rejected) and len(touched):   # a `not` face may move to any person: every centre
        uniq, cent, _ = ray.get(_remote(_centres).remote(*[_remote(_sums).remote(xs, v)
                                                           for xs, v in zip(c.xs, c.nums)]))
        keep = ~np.isin(uniq, touched)
        outside = (uniq[keep], cent[keep])
    start = int(max(ray.get([_remote(_max_number).remote(v) for v in c.nums]), default=0)) + 1
    new, report = constrain(nums, keys.column("image_uri"), keys.column("face_index").to_numpy(), x, state,
                            threshold, start=start, outside=outside)
    cuts = np.r_[0, np.cumsum([len(r) for r in rows])]
    put = _remote(_put)
    c.nums = [put.remote(v, r, new[cuts[i]:cuts[i + 1]]) for i, (v, r) in enumerate(zip(c.nums, rows))]
    if renumber:
        old, ranked = _ranked(ray.get([_remote(_sizes).remote(int(c.bounds[i]), v) for i, v in enumerate(c.nums)]))
        old_ref, ranked_ref = ray.put(old), ray.put(ranked)
        c.nums = [_remote(_map).remote(v, old_ref, ranked_ref) for v in c.nums]
        new = _map(new, old, ranked)
    people = with_names(keys.append_column("person", person_strings(new)), state)
    return Named(report, person_name_table(people, state), name_counts(people))
