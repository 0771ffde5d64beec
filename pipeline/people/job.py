"""The people job: read → (resume: join) → kNN + cluster → write table, json, html."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from pipeline import storage
from pipeline.labels import LabelState
from pipeline.people.spread import BATCH_NODES, CAP, cluster_shards, write_shards
from pipeline.people.graph import DIFF_COS, EDGE_ODDS, K, SAME_COS, THRESHOLD
from pipeline.people.name_shards import apply_labels
from pipeline.people.names import NameReport
from pipeline.people.output import write_text
from pipeline.people.search_index import remove_index, write_index
from pipeline.people.sheet import SHEET_DEADLINE_S, contact_sheet

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
    sheet_faces: int = 0     # faces on the contact sheet
    unreadable: int = 0      # of them placeholders: their photo could not be read in time
    names: NameReport | None = None   # --labels: what the labels log changed (pipeline/people/names.py)
    threshold: float = THRESHOLD
    seconds: dict[str, float] = field(default_factory=dict)
    output: str = ""
    index: str = ""          # the search index written beside the output (search_index.py)

    def lines(self) -> list[str]:
        out = [f"faces:         {self.faces}",
               f"people:        {self.people} ({self.people - self.singletons} with 2+ faces, "
               f"{self.singletons} single faces, {self.unlinked} of them under {MIN_LINK_PX} px and never "
               f"linked; largest {self.largest})"]
        if self.kept or self.joined or self.new_people:
            out.append(f"--resume:      {self.kept} faces kept their person, {self.joined} new faces joined "
                       f"existing people, {self.new_people} new people")
        if self.names is not None:
            out.append(self.names.line())
        out.append(f"threshold:     cos ≥ {self.threshold} (edge odds {EDGE_ODDS:g}:1 from LFW pairs)")
        out.append("seconds:       " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
                   + f", total {sum(self.seconds.values()):.1f}")
        if self.unreadable:
            out.append(f"thumbnails:    {self.unreadable} unreadable of {self.sheet_faces} on the contact sheet "
                       f"(grey placeholders: photo gone or its store unreachable)")
        out.append(f"output:        {self.output} (+ _people.json, _people.html)")
        if self.index:
            out.append(f"search index:  {self.index}")
        return out


def cluster_table(table_uri: str, output_uri: str, resume: bool = False, threshold: float = THRESHOLD,
                  k: int = K, log: Callable[[str], None] = print, sheet_people: int = 40,
                  label_state: LabelState | None = None, rule: str = "fixed", cap: int = CAP,
                  batch_faces: int = BATCH_NODES, search_index: str = "fp16",
                  crash_marker: str | None = None) -> PeopleSummary:
    """The whole job: read → (resume: join) → kNN + cluster → (``label_state``: the labels log's
    decisions, ``names.constrain``) → write table, json, html → the search index (``search_index``:
    ``fp16``, ``sq8`` or ``none``, ``search_index.py``).  ``crash_marker`` (tests only): the
    first clustering task to find no such file makes it and kills its worker (Ray runs it again)."""
    summary = PeopleSummary(threshold=threshold, output=output_uri)
    storage.check_writable(output_uri)
    # every step a Ray task over shards of the table; the driver keeps refs and O(people) numbers
    c = cluster_shards(table_uri, output_uri, resume, threshold, k, MIN_LINK_PX, rule=rule, cap=cap,
                       batch_nodes=batch_faces, crash_marker=crash_marker, log=log)
    summary.faces, summary.kept, summary.joined, summary.unlinked = c.faces, c.kept, c.joined, c.unlinked
    summary.new_people = c.new_people
    summary.seconds.update(c.seconds)
    # Here every face has its person number (per shard, ``c.nums``), before anything is written.
    named = name_counts_ = None
    if label_state is not None:  # names (issue 24): the labels log binds the person numbers, fresh run or --resume
        done = apply_labels(c, label_state, threshold, renumber=not summary.kept)   # name_shards.py
        summary.names, named, name_counts_ = done.report, done.by_person, done.counts
        log(summary.names.line().replace("names:        ", "[names]"))

    t1 = time.monotonic()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    w = write_shards(c, output_uri, run_id, sheet_people, names=named)
    files, table = w.files, w.sheet_rows
    summary.people, summary.singletons, summary.largest = w.people, w.singletons, w.largest
    meta = {"source_table": table_uri, "backbone": BACKBONE, "threshold": threshold, "edge_odds": EDGE_ODDS,
            "same_cos": SAME_COS, "different_cos": DIFF_COS, "k": k, "faces": summary.faces,
            "people": summary.people, "people_2plus": summary.people - summary.singletons,
            "single_faces": summary.singletons, "unlinked_small_faces": summary.unlinked, "min_link_px": MIN_LINK_PX,
            "largest": summary.largest, "resumed": bool(resume),
            "edge_rule": rule, "component_cap": cap, "edges": c.edges, "components": c.components,
            "largest_component": c.largest_component,
            "joined": summary.joined, "new_people": summary.new_people, "files": files,
            "names": name_counts_ or {},
            **({"labels": vars(summary.names)} if summary.names is not None else {}),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    log(f"[sheet] thumbnails of the {min(sheet_people, summary.people)} largest people "
        f"(placeholders for what is not read in {SHEET_DEADLINE_S:g} s)")
    sheet = contact_sheet(table, table_uri, meta, sheet_people)
    summary.sheet_faces, summary.unreadable = sheet.faces, sheet.unreadable
    meta.update(sheet_faces=sheet.faces, sheet_unreadable=sheet.unreadable)
    write_text(output_uri, "_people.json", json.dumps(meta, indent=2))
    write_text(output_uri, "_people.html", sheet.html)
    summary.seconds["writing"] = time.monotonic() - t1
    log(f"[writing] {summary.faces} rows, {summary.people} people → {output_uri}: {summary.seconds['writing']:.1f} s")
    # the search index beside the output, from the embeddings the tasks still hold (search_index.py)
    if search_index == "none":
        remove_index(output_uri)     # an older run's index would describe other people files
    else:
        ix = write_index(c.keys, c.xs, c.nums, c.bounds, output_uri, run_id, files, table_uri, search_index)
        summary.seconds["index"] = ix.seconds
        summary.index = ix.line().replace("[index] ", "")
        log(ix.line())
    return summary
