"""The people job's work as Ray tasks, the driver holding O(people) (issue 23).

Why: with the whole N×k graph and every embedding in the driver, 10^6 faces needed
15.8 GiB and 10^7 would need ~160 GiB.  Here every stage is a task over a shard, and the
driver only sees object refs and per-shard / per-person numbers:

1. read: one task per Parquet file → keys (image_uri, face_index), embeddings, what to
   cluster (big enough, no person yet); with ``--resume`` the previous person of its rows.
2. resume join: per-shard centre sums → one centres task → per-shard join tasks.
3. kNN (``pipeline.knn.topk_refs``): database-shard index tasks × query-shard search
   tasks; each query shard's merge task applies the edge rule and keeps only its edges.
4. connected components: each edge shard reduced to a forest (node → smallest node of
   its component), forests merged in a tree of tasks (fan-in ``FAN_IN``).
5. a plan task packs components into batches of ≤ ``BATCH_NODES`` faces; edge shards are
   split by batch (one return per batch) and each batch is clustered by one task:
   components over ``CAP`` faces are re-split by raising the threshold inside them
   (``graph.split_big``) before Infomap, so no Infomap run grows past the cap.
6. the driver numbers people largest first from per-person (size, first row) — O(people);
   batch assignments are scattered back to the read shards, per-shard centre sums are
   reduced to person centres, and one task per shard writes its part file (a
   deterministic name: a retried task rewrites the same file, no face lost or doubled).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.people.graph import gathered, shard_edges, split_big
from pipeline.people.ids import person_numbers, person_strings
from pipeline.people.output import PEOPLE_SCHEMA, publish
from pipeline.store_pages import releasing
from pipeline.table import embedding_matrix

BATCH_NODES = 50_000      # faces per clustering task (whole components): small enough to keep every CPU busy
CAP = 20_000              # a component over this many faces is re-split before Infomap
SPLIT_STEP = 0.005         # threshold step inside a component over the cap
TRIALS = 1                # Infomap trials per batch (igraph's default 10 cost 10× for no F here: README)
NPROBE = 16               # IVF lists probed per face for the graph: edges are near pairs, found early
FAN_IN = 8                # forests merged per components task
RETRIES = 3               # a task whose worker dies is run again (every task is idempotent)


def _remote(fn: Callable, returns: int = 1, spread: bool = False) -> Any:
    """``spread``: the heavy per-shard tasks (reading, clustering) go round the nodes (Ray's
    SPREAD) so each node holds a share of the faces, rather than filling the driver's first.
    Each task gives back the store pages it read when it ends (``store_pages``): a worker's
    RSS then stays its own memory however many shards it has read."""
    import ray

    return ray.remote(num_cpus=1, max_retries=RETRIES, num_returns=returns,
                      scheduling_strategy="SPREAD" if spread else "DEFAULT")(releasing(fn))


def _count_true(m: np.ndarray) -> int:
    return int(m.sum())


def _count_numbered(nums: np.ndarray) -> int:
    return int((nums > 0).sum())


def _max_number(nums: np.ndarray) -> int:
    return int(nums.max(initial=0))


def _count_edges(edges: tuple) -> int:
    return len(edges[0])


def check_table(table_uri: str) -> None:
    """Fail fast (``PeopleError``, exit 2) on a table with no files or no embedding column:
    its schema only, so the driver reads no faces."""
    from pipeline.people.reading import PeopleError, parquet_files

    fs, files = parquet_files(table_uri)
    if not files:
        raise PeopleError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    missing = {"image_uri", "face_index", "embedding"} - set(pads.dataset(files, filesystem=fs, format="parquet")
                                                             .schema.names)
    if missing:
        raise PeopleError(f"{table_uri}: not a prediction table with embeddings (no column "
                          f"{', '.join(sorted(missing))})")


# ---------------------------------------------------------------- 1. read
def _read_file(fs_uri: str, path: str, min_link_px: float, previous: list[str] | None) -> tuple:
    """(keys, embeddings, todo mask, small mask, previous numbers, n) of one Parquet file."""
    fs, _ = storage.resolve(fs_uri)
    ds = pads.dataset([path], filesystem=fs, format="parquet")
    names = set(ds.schema.names)
    cols = ["image_uri", "face_index", "embedding"] + (["bbox"] if "bbox" in names else [])
    flt = pc.is_valid(pc.field("embedding")) & pc.is_valid(pc.field("face_index"))
    if "status" in names:
        flt = flt & (pc.field("status") == "ok")
    t = ds.to_table(columns=cols, filter=flt).sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    keys = pa.table({"image_uri": t.column("image_uri").combine_chunks().cast(pa.string()),
                     "face_index": t.column("face_index").combine_chunks().cast(pa.int32())})
    x = embedding_matrix(t.column("embedding")) if t.num_rows else np.zeros((0, 128), np.float32)
    linkable = np.ones(t.num_rows, bool)
    if "bbox" in t.column_names and t.num_rows:
        b = t.column("bbox").combine_chunks()
        linkable = np.minimum(b.field("w").to_numpy(zero_copy_only=False),
                              b.field("h").to_numpy(zero_copy_only=False)) >= min_link_px
    nums = np.zeros(t.num_rows, np.int64)
    if previous and t.num_rows:
        pfs, _ = storage.resolve(previous[0])
        prev = pads.dataset(previous[1:], filesystem=pfs, format="parquet").to_table(
            columns=["image_uri", "face_index", "person"],
            filter=pc.field("image_uri").isin(pc.unique(keys.column("image_uri"))))
        if prev.num_rows:
            mine = keys.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
            prev = pa.table({"image_uri": prev.column("image_uri").cast(pa.string()),
                             "face_index": prev.column("face_index").cast(pa.int32()),
                             "num": pa.array(person_numbers(prev.column("person")))})
            j = mine.join(prev, keys=["image_uri", "face_index"], join_type="inner")
            nums[j.column("row").to_numpy()] = j.column("num").to_numpy()
    return keys, x, (nums == 0) & linkable, (nums == 0) & ~linkable, nums, t.num_rows


# ---------------------------------------------------------------- 2. centres
def _sums(x: np.ndarray, nums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(person numbers, embedding sums, face counts) of the rows with a number."""
    m = nums > 0
    uniq, inv = np.unique(nums[m], return_inverse=True)
    s = np.zeros((len(uniq), x.shape[1]), np.float64)
    np.add.at(s, inv, x[m])
    return uniq, s.astype(np.float32), np.bincount(inv, minlength=len(uniq)).astype(np.int64)


def _centres(*parts: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers sorted, unit centres, sizes) from every shard's sums."""
    nums = np.concatenate([p[0] for p in parts])
    uniq, inv = np.unique(nums, return_inverse=True)
    s = np.zeros((len(uniq), 128), np.float32)
    np.add.at(s, inv, np.concatenate([p[1] for p in parts]))
    sizes = np.bincount(inv, weights=np.concatenate([p[2] for p in parts]), minlength=len(uniq)).astype(np.int64)
    return uniq, s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12), sizes


def _join(x: np.ndarray, todo: np.ndarray, nums: np.ndarray, cents: tuple, threshold: float) -> tuple:
    """--resume: a new face joins the existing person whose centre is nearest, at cos ≥ threshold."""
    from pipeline.knn import build_index

    uniq, c, _ = cents
    rows = np.flatnonzero(todo)
    nums, todo = nums.copy(), todo.copy()
    if len(rows) and len(uniq):
        s, i = build_index(c).search(np.ascontiguousarray(x[rows]), 1)
        ok = s[:, 0] >= threshold
        nums[rows[ok]] = uniq[i[ok, 0]]
        todo[rows[ok]] = False
    return todo, nums


# ---------------------------------------------------------------- 4. components
def _forest(*edges: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(nodes sorted, root = smallest node of its component) of some edge lists."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate([e[0] for e in edges])
    b = np.concatenate([e[1] for e in edges])
    nodes, inv = np.unique(np.r_[a, b], return_inverse=True)
    m = len(nodes)
    if m == 0:
        return nodes, nodes
    g = coo_matrix((np.ones(len(a), np.int8), (inv[:len(a)], inv[len(a):])), shape=(m, m))
    comp = connected_components(g, directed=False)[1]
    root = np.full(comp.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(root, comp, nodes)
    return nodes, root[comp]


def _plan(forest: tuple, batch_nodes: int, bounds: np.ndarray, cap: int) -> tuple:
    """(nodes, batch of each node), small facts (batches, components, largest, linked per
    shard) and the nodes of components over ``cap`` (sorted)."""
    nodes, root = forest
    _, comp, sizes = np.unique(root, return_inverse=True, return_counts=True)
    big_nodes = nodes[(sizes > cap)[comp]] if len(sizes) else nodes
    batch_of = np.zeros(len(sizes), np.int64)
    if len(sizes):
        batch_of = np.unique((np.cumsum(sizes) - sizes) // batch_nodes, return_inverse=True)[1]
    linked = np.diff(np.searchsorted(nodes, bounds))
    facts = {"batches": int(batch_of.max()) + 1 if len(sizes) else 0, "components": len(sizes),
             "largest": int(sizes.max()) if len(sizes) else 0, "linked": linked}
    return (nodes, batch_of[comp]), facts, big_nodes


def _raise(edges: tuple, big_nodes: np.ndarray, threshold: float) -> tuple:
    """An edge shard without the edges under ``threshold`` inside the components over the cap
    (both ends of an edge are in one component: its first end tells)."""
    a, w = edges[0], edges[2]
    pos = np.searchsorted(big_nodes, a)
    inside = (pos < len(big_nodes)) & (big_nodes[np.minimum(pos, max(len(big_nodes) - 1, 0))] == a) \
        if len(big_nodes) else np.zeros(len(a), bool)
    keep = ~(inside & (w < threshold))
    return tuple(v[keep] for v in edges)


def _split_edges(edges: tuple, plan: tuple, n_batches: int) -> list[tuple]:
    """One edge list per batch (both ends are in the same component, so the same batch)."""
    nodes, batch = plan
    a = edges[0]
    eb = batch[np.searchsorted(nodes, a)] if len(a) else np.zeros(0, np.int64)
    out = [tuple(v[eb == i] for v in edges) for i in range(n_batches)]
    return out if n_batches > 1 else out[0]


# ---------------------------------------------------------------- 5. clustering
def _cluster_batch(cap: int, threshold: float, rule: str, trials: int, crash_marker: str | None,
                   *pieces: tuple) -> tuple:
    """(rows, local person) and (sizes, first rows) of one batch of whole components:
    big components re-split (``split_big``), then Infomap (igraph)."""
    if crash_marker and not os.path.exists(crash_marker):   # tests: a worker that dies mid-task
        open(crash_marker, "w").close()
        os._exit(1)
    a, b, w = gathered(list(pieces), rule)   # the same pair from both ends' shards: once
    rows, inv = np.unique(np.r_[a, b], return_inverse=True)
    la, lb = inv[:len(a)], inv[len(a):]
    keep = split_big(len(rows), la, lb, w, cap, threshold)
    labels = _infomap(len(rows), la[keep], lb[keep], w[keep], trials)
    sizes = np.bincount(labels)
    first_row = np.full(len(sizes), np.iinfo(np.int64).max)
    np.minimum.at(first_row, labels, rows)
    return (rows, labels), (sizes, first_row)


def _infomap(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, trials: int = TRIALS) -> np.ndarray:
    """Infomap communities (igraph), numbered 0..P-1; a node with no edge left is its own.
    Components of 1–2 nodes are people as they are (Infomap has nothing to cut there)."""
    import igraph as ig

    from pipeline.people.clustering import components

    comp = components(n, a, b)
    sizes = np.bincount(comp, minlength=n)
    big = sizes[comp] >= 3
    memb = comp.copy()
    if big.any():
        nodes = np.flatnonzero(big)
        local = np.full(n, -1, np.int64)
        local[nodes] = np.arange(len(nodes))
        e = big[a]
        random.seed(0)  # python-igraph draws from Python's random: same input, same people
        g = ig.Graph(n=len(nodes), edges=np.stack([local[a[e]], local[b[e]]], 1).tolist())
        m = np.asarray(g.community_infomap(edge_weights=list(map(float, w[e])), trials=trials).membership, np.int64)
        memb[nodes] = n + m
    return np.unique(memb, return_inverse=True)[1]


def _scatter(assign: tuple, numbers: np.ndarray, bounds: np.ndarray) -> list[tuple]:
    """A batch's (rows, person number) cut by read shard."""
    rows, labels = assign
    cut = np.searchsorted(rows, bounds)
    nums = numbers[labels]
    out = [(rows[cut[i]:cut[i + 1]], nums[cut[i]:cut[i + 1]]) for i in range(len(bounds) - 1)]
    return out if len(out) > 1 else out[0]


def _shard_numbers(lo: int, todo: np.ndarray, small: np.ndarray, nums: np.ndarray, single_start: int,
                   small_start: int, *pieces: tuple) -> np.ndarray:
    """Person number per row of one shard: kept/joined, clustered, then single faces in row order."""
    nums = nums.copy()
    for rows, n in pieces:
        nums[rows - lo] = n
    single = todo & (nums == 0)
    nums[single] = single_start + np.arange(int(single.sum()))
    nums[small] = small_start + np.arange(int(small.sum()))
    return nums


# ---------------------------------------------------------------- 6. writing
def _write(keys: pa.Table, x: np.ndarray, nums: np.ndarray, cents: tuple, output_uri: str, name: str,
           sheet: np.ndarray, per_person: int, names: pa.Table | None) -> tuple[str, pa.Table]:
    """Write this shard's part file (same name on a retry) and return the sheet people's best
    rows.  ``names``: (person, name) of the named people, else every name is null."""
    uniq, c, sizes = cents
    lab = np.searchsorted(uniq, nums)
    sim = np.einsum("ij,ij->i", x, c[lab]).astype(np.float32) if len(x) else np.zeros(0, np.float32)
    person = person_strings(nums)
    name_col = (pa.nulls(len(nums), pa.string()) if names is None or not names.num_rows else
                names.column("name").combine_chunks().take(pc.index_in(person, value_set=names.column("person"))))
    table = pa.table({"image_uri": keys.column("image_uri"), "face_index": keys.column("face_index"),
                      "person": person, "person_size": pa.array(sizes[lab].astype(np.int32)),
                      "similarity": pa.array(np.clip(sim, -1, 1)), "name": name_col}, schema=PEOPLE_SCHEMA)
    fs, path = storage.resolve(output_uri)
    storage.put_parquet(fs, f"{path}/{name}", table)   # the same name on a retry: written once
    pick = np.flatnonzero(np.isin(nums, sheet))
    pick = pick[np.lexsort((-sim[pick], nums[pick]))]
    first = np.r_[0, np.flatnonzero(np.diff(nums[pick])) + 1] if len(pick) else np.zeros(0, np.int64)
    rank = np.arange(len(pick)) - np.repeat(first, np.diff(np.r_[first, len(pick)]))
    return name, table.take(pa.array(pick[rank < per_person]))


@dataclass
class Clustered:
    """What the driver keeps between clustering and writing: refs per shard (keys,
    embeddings, person numbers) and counts — no faces, no edges."""
    keys: list
    xs: list
    nums: list
    bounds: np.ndarray
    faces: int
    kept: int
    joined: int
    new_people: int
    unlinked: int
    edges: int
    components: int
    largest_component: int
    seconds: dict[str, float]


@dataclass
class Written:
    files: list[str]
    sheet_rows: pa.Table      # the contact sheet's people, their best faces only
    people: int
    singletons: int
    largest: int
    seconds: float


def cluster_shards(table_uri: str, output_uri: str, resume: bool, threshold: float, k: int, min_link_px: float,
            rule: str = "fixed", cap: int = CAP, batch_nodes: int = BATCH_NODES, crash_marker: str | None = None,
            trials: int = TRIALS, nprobe: int | None = NPROBE, log: Callable[[str], None] = print) -> Clustered:
    """Person numbers of every face of a table, every step a Ray task (module docstring)."""
    import ray

    from pipeline.knn import topk_refs
    from pipeline.people.reading import PeopleError, parquet_files

    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    fs, files = parquet_files(table_uri)
    if not files:
        raise PeopleError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    previous = None
    if resume:
        pfs, old = parquet_files(output_uri)
        previous = [output_uri, *old] if old else None
    read = _remote(_read_file, 6, spread=True)
    shards = [read.remote(table_uri, f, min_link_px, previous) for f in files]
    counts = np.asarray(ray.get([s[5] for s in shards]), np.int64)
    keep = np.flatnonzero(counts > 0)
    shards, counts = [shards[i] for i in keep], counts[keep]
    n = int(counts.sum())
    if n == 0:
        raise PeopleError(f"{table_uri}: no faces with embeddings (every row lacks a face or an embedding)")
    bounds = np.r_[0, np.cumsum(counts)]
    keys, xs, todos, smalls, nums = ([s[i] for s in shards] for i in range(5))
    seconds["reading"] = time.monotonic() - t0
    log(f"[reading] {n} faces in {len(shards)} shard(s) from {table_uri}: {seconds['reading']:.1f} s")

    kept = joined = 0
    if previous:
        t1 = time.monotonic()
        kept = int(sum(ray.get([_remote(_count_numbered).remote(v) for v in nums])))
        if kept:
            cents = _remote(_centres).remote(*[_remote(_sums).remote(x, v) for x, v in zip(xs, nums)])
            out = [_remote(_join, 2).remote(x, t, v, cents, threshold) for x, t, v in zip(xs, todos, nums)]
            before = sum(ray.get([_remote(_count_true).remote(t) for t in todos]))
            todos, nums = [o[0] for o in out], [o[1] for o in out]
            joined = before - int(sum(ray.get([_remote(_count_true).remote(t) for t in todos])))
        seconds["joining"] = time.monotonic() - t1
        log(f"[joining] {kept} faces kept their person, {joined} new faces joined one: {seconds['joining']:.1f} s")

    t1 = time.monotonic()
    edge_refs, knn_note = topk_refs(xs, todos, bounds, k + 1,
                                    partial(shard_edges, threshold=threshold, rule=rule), nprobe=nprobe)
    n_edges = int(sum(ray.get([_remote(_count_edges).remote(e) for e in edge_refs])))
    seconds["kNN+edges"] = time.monotonic() - t1
    log(f"[kNN] {knn_note}; {n_edges} edges ({rule} rule, cos ≥ {threshold}): {seconds['kNN+edges']:.1f} s")

    t1 = time.monotonic()
    merge, plan_task, raise_task = _remote(_merge_forests), _remote(_plan, 3), _remote(_raise)
    th, rounds, first_largest = threshold, 0, None
    while True:   # components; over the cap: raise the threshold inside them, again (no task gets one whole)
        level = [_remote(_forest).remote(e) for e in edge_refs]
        while len(level) > 1:
            level = [merge.remote(*level[i:i + FAN_IN]) for i in range(0, len(level), FAN_IN)]
        plan, facts, big = plan_task.remote(level[0], batch_nodes, bounds, cap)
        facts = ray.get(facts)
        first_largest = facts["largest"] if first_largest is None else first_largest
        if facts["largest"] <= cap or th > 1.0:
            break
        th, rounds = th + SPLIT_STEP, rounds + 1
        edge_refs = [raise_task.remote(e, big, th) for e in edge_refs]
    facts["first_largest"], facts["rounds"], facts["split_threshold"] = first_largest, rounds, th
    n_batches = facts["batches"]
    seconds["components"] = time.monotonic() - t1
    log(f"[components] {facts['components']} components of 2+ faces (largest {first_largest}"
        + (f"; over the cap of {cap}: re-split in {rounds} round(s) up to cos {th:.3f}, now {facts['largest']}"
           if rounds else "") + "), "
        f"{n_batches} clustering batch(es): {seconds['components']:.1f} s")

    t1 = time.monotonic()
    results, summaries = [], []
    if n_batches:
        split = _remote(_split_edges, n_batches)
        pieces = [split.remote(e, plan, n_batches) for e in edge_refs]
        pieces = [p if n_batches > 1 else [p] for p in pieces]
        task = _remote(_cluster_batch, 2, spread=True)
        for bi in range(n_batches):
            assign, summ = task.remote(cap, threshold, rule, trials, crash_marker, *[p[bi] for p in pieces])
            results.append(assign)
            summaries.append(summ)
        summaries = ray.get(summaries)
    del edge_refs
    # person numbers, largest first (ties: the earlier face); new people after the kept ones
    sizes = np.concatenate([s[0] for s in summaries]) if summaries else np.zeros(0, np.int64)
    first = np.concatenate([s[1] for s in summaries]) if summaries else np.zeros(0, np.int64)
    max_kept = int(max(ray.get([_remote(_max_number).remote(v) for v in nums]))) if kept else 0
    start = max_kept + 1
    order = np.lexsort((first, -sizes))
    numbers = np.empty(len(sizes), np.int64)
    numbers[order] = np.arange(start, start + len(sizes))
    offsets = np.r_[0, np.cumsum([len(s[0]) for s in summaries])]
    todo_n = np.asarray(ray.get([_remote(_count_true).remote(t) for t in todos]), np.int64)
    small_n = np.asarray(ray.get([_remote(_count_true).remote(t) for t in smalls]), np.int64)
    single_n = todo_n - facts["linked"]
    single_start = start + len(sizes) + np.r_[0, np.cumsum(single_n)][:-1]
    small_start = start + len(sizes) + int(single_n.sum()) + np.r_[0, np.cumsum(small_n)][:-1]
    scattered = []
    if results:
        scat = _remote(_scatter, len(shards))
        scattered = [scat.remote(r, numbers[offsets[i]:offsets[i + 1]], bounds) for i, r in enumerate(results)]
        scattered = [s if len(shards) > 1 else [s] for s in scattered]
    number = _remote(_shard_numbers)
    nums = [number.remote(int(bounds[si]), todos[si], smalls[si], nums[si], int(single_start[si]),
                          int(small_start[si]), *[s[si] for s in scattered]) for si in range(len(shards))]
    seconds["clustering"] = time.monotonic() - t1
    new_people = len(sizes) + int(single_n.sum()) + int(small_n.sum())
    log(f"[clustering] {len(sizes)} people of 2+ faces from the components, {int(single_n.sum())} single faces: "
        f"{seconds['clustering']:.1f} s")

    return Clustered(keys, xs, nums, bounds, n, kept, joined, new_people if kept else 0, int(small_n.sum()),
                     n_edges, facts["components"], first_largest, seconds)


def write_shards(c: Clustered, output_uri: str, run_id: str, sheet_people: int = 40, per_person: int = 8,
          names: pa.Table | None = None) -> Written:
    """Centres, then one task per shard writing ``_work/<run_id>/_part-<shard>.parquet``, then
    (here, a first Ctrl-C deferred) those moved in as ``part-<run_id>-<shard>.parquet`` and the
    older parts removed: readers never see old and new people side by side, nor half of them.
    ``names``: the (person, name) table of ``names.person_name_table``."""
    from pipeline.people.reading import parquet_files

    import ray

    t1 = time.monotonic()
    cents = _remote(_centres).remote(*[_remote(_sums).remote(x, v) for x, v in zip(c.xs, c.nums)])
    sheet, stats = _remote(_top_people, 2).remote(cents, sheet_people)
    stats = ray.get(stats)
    task = _remote(_write, 2)
    work = f"_work/{run_id}"
    fs, path = storage.resolve(output_uri)
    fs.create_dir(f"{path}/{work}", recursive=True)
    written = [task.remote(c.keys[i], c.xs[i], c.nums[i], cents, output_uri, f"{work}/_part-{i:05d}.parquet",
                           sheet, per_person, names) for i in range(len(c.keys))]
    parts = ray.get([w[0] for w in written])
    sheet_rows = pa.concat_tables(ray.get([w[1] for w in written]))
    _, old = parquet_files(output_uri)
    files = [f"part-{run_id}-{i:05d}.parquet" for i in range(len(parts))]
    publish(output_uri, list(zip(parts, files)), old, work)
    return Written(files, sheet_rows, stats["people"], stats["singletons"], stats["largest"], time.monotonic() - t1)


def _merge_forests(*forests: tuple) -> tuple:
    """Forests (node → root pairs are edges too) merged into one."""
    return _forest(*[(f[0], f[1]) for f in forests])


def _top_people(cents: tuple, n: int) -> tuple[np.ndarray, dict]:
    """The contact sheet's people (largest first, ties the smaller number) and the counts."""
    uniq, _, sizes = cents
    order = np.lexsort((uniq, -sizes))
    return uniq[order[:n]], {"people": len(uniq), "singletons": int((sizes == 1).sum()),
                             "largest": int(sizes.max()) if len(sizes) else 0}
