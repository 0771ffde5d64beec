"""The people job: read → (resume: join) → kNN + cluster → write table, json, html."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.people.clustering import centres, cluster
from pipeline.people.graph import DIFF_COS, EDGE_ODDS, K, SAME_COS, THRESHOLD
from pipeline.people.ids import person_strings, previous_numbers, ranked_ids
from pipeline.people.output import PEOPLE_SCHEMA, write_table, write_text
from pipeline.people.reading import read_faces, read_people
from pipeline.people.sheet import contact_sheet

# Faces whose box is smaller than this (shorter side, photo pixels) are not linked to any
# other: their embeddings are too unreliable.  Without it, tiny, blurred and half-cut faces
# (crowd backgrounds, faces cut by a photo's border) fell together into large false people
# at the top of the contact sheet (a 65-face one in the LFW set: median side 33 px,
# det_score 0.79).  Each such face is a person of its own.
MIN_LINK_PX = 40
BACKBONE = "dlib_resnet_v1 (128-d, L2-normalised)"


@dataclass
class PeopleSummary:
    faces: int = 0
    people: int = 0
    singletons: int = 0
    largest: int = 0
    joined: int = 0          # --resume: new faces that joined an existing person
    new_people: int = 0      # --resume: people founded by new faces
    kept: int = 0            # --resume: faces already in the output
    unlinked: int = 0        # faces under MIN_LINK_PX: each a person of its own
    threshold: float = THRESHOLD
    seconds: dict[str, float] = field(default_factory=dict)
    output: str = ""

    def lines(self) -> list[str]:
        out = [f"faces:         {self.faces}",
               f"people:        {self.people} ({self.people - self.singletons} with 2+ faces, "
               f"{self.singletons} single faces, {self.unlinked} of them under {MIN_LINK_PX} px and never "
               f"linked; largest {self.largest})"]
        if self.kept or self.joined or self.new_people:
            out.append(f"--resume:      {self.kept} faces kept their person, {self.joined} new faces joined "
                       f"existing people, {self.new_people} new people")
        out.append(f"threshold:     cos ≥ {self.threshold} (edge odds {EDGE_ODDS:g}:1 from LFW pairs)")
        out.append("seconds:       " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
                   + f", total {sum(self.seconds.values()):.1f}")
        out.append(f"output:        {self.output} (+ _people.json, _people.html)")
        return out


def cluster_table(table_uri: str, output_uri: str, resume: bool = False, threshold: float = THRESHOLD,
                  k: int = K, log: Callable[[str], None] = print, sheet_people: int = 40) -> PeopleSummary:
    """The whole job: read → (resume: join) → kNN + cluster → write table, json, html."""
    summary = PeopleSummary(threshold=threshold, output=output_uri)
    t0 = time.monotonic()
    storage.check_writable(output_uri)
    faces = read_faces(table_uri, with_bbox=True)
    summary.faces = len(faces)
    linkable = np.ones(len(faces), bool) if faces.bbox is None else faces.bbox[:, 2:].min(1) >= MIN_LINK_PX
    previous = read_people(output_uri) if resume else None
    summary.seconds["reading"] = time.monotonic() - t0
    log(f"[reading] {len(faces)} faces from {table_uri}"
        + (f", {previous.num_rows} faces in the existing people" if previous is not None else "")
        + f": {summary.seconds['reading']:.1f} s")

    x = faces.embedding
    nums = np.zeros(len(faces), np.int64)            # person number per face (0 = none yet)
    if previous is not None and previous.num_rows:
        nums = previous_numbers(faces, previous)
        summary.kept = int((nums > 0).sum())
    todo = np.flatnonzero((nums == 0) & linkable)
    if summary.kept and len(todo):
        t1 = time.monotonic()
        old = np.flatnonzero(nums > 0)
        uniq, lab = np.unique(nums[old], return_inverse=True)
        c = centres(x[old], lab, len(uniq))
        from pipeline.knn import build_index
        s, i = build_index(c).search(x[todo], 1)
        join = s[:, 0] >= threshold
        nums[todo[join]] = uniq[i[join, 0]]
        summary.joined = int(join.sum())
        todo = todo[~join]
        summary.seconds["joining"] = time.monotonic() - t1
        log(f"[joining] {summary.joined} new faces joined existing people (nearest centre cos ≥ {threshold}), "
            f"{len(todo)} left to cluster: {summary.seconds['joining']:.1f} s")
    if len(todo):
        t1 = time.monotonic()
        labels = cluster(x[todo], threshold, k, log=log)
        start = int(nums.max()) + 1 if summary.kept else 1
        nums[todo] = ranked_ids(labels, start)[labels]
        summary.new_people = int(labels.max()) + 1 if summary.kept else 0
        summary.seconds["kNN+clustering"] = time.monotonic() - t1
    small = np.flatnonzero((nums == 0) & ~linkable)   # each its own person, after the others
    if len(small):
        nums[small] = int(nums.max()) + 1 + np.arange(len(small))
        summary.new_people += len(small) if summary.kept else 0
    summary.unlinked = int((~linkable).sum())

    t1 = time.monotonic()
    uniq, lab = np.unique(nums, return_inverse=True)
    c = centres(x, lab, len(uniq))
    sim = np.einsum("ij,ij->i", x, c[lab]).astype(np.float32)
    sizes = np.bincount(lab)
    summary.people, summary.singletons, summary.largest = len(uniq), int((sizes == 1).sum()), int(sizes.max())
    table = pa.table({"image_uri": faces.image_uri, "face_index": pa.array(faces.face_index, pa.int32()),
                      "person": person_strings(nums), "person_size": pa.array(sizes[lab].astype(np.int32)),
                      "similarity": pa.array(np.clip(sim, -1, 1))}, schema=PEOPLE_SCHEMA)
    files = write_table(output_uri, table)
    meta = {"source_table": table_uri, "backbone": BACKBONE, "threshold": threshold, "edge_odds": EDGE_ODDS,
            "same_cos": SAME_COS, "different_cos": DIFF_COS, "k": k, "faces": summary.faces,
            "people": summary.people, "people_2plus": summary.people - summary.singletons,
            "single_faces": summary.singletons, "unlinked_small_faces": summary.unlinked, "min_link_px": MIN_LINK_PX,
            "largest": summary.largest, "resumed": bool(previous is not None),
            "joined": summary.joined, "new_people": summary.new_people, "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text(output_uri, "_people.json", json.dumps(meta, indent=2))
    write_text(output_uri, "_people.html", contact_sheet(table, table_uri, meta, sheet_people))
    summary.seconds["writing"] = time.monotonic() - t1
    log(f"[writing] {table.num_rows} rows, {summary.people} people → {output_uri}: {summary.seconds['writing']:.1f} s")
    return summary
