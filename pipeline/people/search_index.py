"""The search index beside a people output, ``<output>/_index/`` (issue 23).

Why: ``POST /v1/search`` used to build its index from every embedding when a replica
loaded the table: 512 MB of floats per 10^6 faces in one process, and minutes of
building at 10^7.  The people job already holds every embedding in Ray's object store, so
it writes a compressed IVF index beside its output: ``IVF<lists>,SQfp16`` by default (256
bytes per face and an 8-byte id, half the floats, recall@10 ≈ exact search) or
``IVF<lists>,SQ8`` (128 bytes, a quarter, recall@10 ≈ 0.95): benchmarks/README.md,
"search at scale".  A replica loads it and builds an index itself
only when none exists and the table is small (``pipeline.people.index.FaceIndex``).

Layout (``_``-named, so readers of the people table never see it):

    _index/index.json               manifest: run, kind, nprobe, faces, shards in id order
    _index/<run>-NNNNN.faiss        one shard's faiss index (ids: global row numbers)
    _index/<run>-NNNNN.keys.parquet its rows' image_uri, face_index, person (row = id - first)

Built as Ray tasks: one task trains the lists on a sample drawn from every shard, then
one task per shard adds its faces and writes its two files (the same names on a retry).
The manifest is written last and older runs' files are removed after it, so a reader
finds one whole index, or the previous one, or none.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.people.names import face_rows
from pipeline.people.spread import _read_file, _remote   # the people job's reader and task options

INDEX_DIR = "_index"
MANIFEST = "index.json"
CODECS = {"fp16": "SQfp16", "sq8": "SQ8"}   # --search-index: how each face's vector is stored
EXACT_MAX = 50_000        # up to this many faces the index is flat (exact): small, and nothing to train
TRAIN_PER_LIST = 64       # training sample per inverted list
NPROBE_SHARE = 16         # lists probed per query: 1/16 of them, at least MIN_NPROBE (recall in the README)
MIN_NPROBE = 16


def lists_for(n: int) -> int:
    """Inverted lists for n faces: ~sqrt(n), a power of two in [16, 16384] (10^7 faces: 4096
    lists of ~2,400; adding them costs n × lists dot products, the build's main cost)."""
    return int(2 ** np.clip(np.round(np.log2(np.sqrt(max(n, 1)))), 4, 14))


def nprobe_for(lists: int) -> int:
    return int(min(lists, max(MIN_NPROBE, lists // NPROBE_SHARE)))


def kind_for(n: int, codec: str = "fp16", exact_max: int = EXACT_MAX) -> str:
    """The faiss factory string for n faces."""
    return "IDMap,Flat" if n <= exact_max else f"IVF{lists_for(n)},{CODECS[codec]}"


@dataclass
class IndexSummary:
    faces: int
    kind: str
    nprobe: int
    shards: int
    bytes: int
    seconds: float
    uri: str

    def line(self) -> str:
        return (f"[index] {self.kind} (nprobe {self.nprobe}) of {self.faces} faces in {self.shards} shard(s), "
                f"{self.bytes / 2**20:.1f} MiB → {self.uri}: {self.seconds:.1f} s")


def _sample(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), size=min(m, len(x)), replace=False))
    return np.ascontiguousarray(x[rows], np.float32)


def _train(kind: str, d: int, *samples: np.ndarray) -> np.ndarray:
    """The empty index of ``kind``, its lists and quantiser trained on the samples, serialised."""
    faiss.omp_set_num_threads(1)
    index = faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(np.concatenate(samples))
    return faiss.serialize_index(index)


def _add(trained: np.ndarray, lo: int, keys: pa.Table, x: np.ndarray, nums: np.ndarray | None,
         output_uri: str, stem: str) -> tuple[int, list[int]]:
    """One shard: its faces added (ids lo..lo+n-1) and written with its keys → (bytes
    written, faces per IVF list: the manifest's totals let a replica size each list once)."""
    from pipeline.people.ids import person_strings

    faiss.omp_set_num_threads(1)
    index = faiss.deserialize_index(np.asarray(trained))
    index.add_with_ids(np.ascontiguousarray(x, np.float32), np.arange(lo, lo + len(x), dtype=np.int64))
    data = faiss.serialize_index(index).tobytes()
    person = person_strings(nums) if nums is not None else pa.nulls(len(x), pa.string())
    fs, path = storage.resolve(output_uri)
    storage.put_parquet(fs, f"{path}/{INDEX_DIR}/{stem}.keys.parquet",
                        keys.select(["image_uri", "face_index"]).append_column("person", person))
    storage.put_atomic(fs, f"{path}/{INDEX_DIR}/{stem}.faiss", data)
    return len(data), _list_sizes(index).tolist()


def write_index(keys: list, xs: list, nums: list | None, bounds: np.ndarray, output_uri: str, run_id: str,
                people_files: list[str], source_table: str, codec: str = "fp16",
                exact_max: int = EXACT_MAX) -> IndexSummary:
    """Write ``<output_uri>/_index/`` from per-shard refs (keys table, N×d embeddings, person
    numbers or None) whose rows are global rows ``bounds[i]..bounds[i+1]-1``."""
    import ray

    t0 = time.monotonic()
    counts = np.diff(bounds).astype(np.int64)
    n = int(counts.sum())
    kind = kind_for(n, codec, exact_max)
    nprobe = nprobe_for(lists_for(n)) if kind.startswith("IVF") else 0
    want = lists_for(n) * TRAIN_PER_LIST
    samples = [_remote(_sample).remote(x, int(np.ceil(want * c / n)), i)
               for i, (x, c) in enumerate(zip(xs, counts)) if c] if kind.startswith("IVF") else []
    trained = _remote(_train).remote(kind, 128, *samples)
    stems = [f"{run_id}-{i:05d}" for i in range(len(xs))]
    fs, path = storage.resolve(output_uri)
    fs.create_dir(f"{path}/{INDEX_DIR}", recursive=True)
    added = ray.get([_remote(_add).remote(trained, int(bounds[i]), keys[i], xs[i], nums[i] if nums else None,
                                          output_uri, stems[i]) for i in range(len(xs))])
    sizes = [a[0] for a in added]
    list_sizes = np.sum([a[1] for a in added], axis=0).astype(int).tolist() if added and added[0][1] else []
    manifest = {"run": run_id, "kind": kind, "nprobe": nprobe, "faces": n, "dims": 128, "metric": "inner_product",
                "list_sizes": list_sizes,
                "source_table": source_table, "people_files": sorted(people_files),
                "shards": [{"index": f"{s}.faiss", "keys": f"{s}.keys.parquet", "first": int(bounds[i]),
                            "rows": int(counts[i])} for i, s in enumerate(stems)],
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _commit(output_uri, manifest)
    return IndexSummary(n, kind, nprobe, len(xs), int(sum(sizes)), time.monotonic() - t0,
                        f"{output_uri.rstrip('/')}/{INDEX_DIR}")


def _commit(output_uri: str, manifest: dict) -> None:
    """Write the manifest, then delete every file under ``_index/`` it does not name (an older
    run's shards, or shards a scrub replaced): a reader finds the old index or the new one."""
    fs, path = storage.resolve(output_uri)
    storage.put_atomic(fs, f"{path}/{INDEX_DIR}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    named = {MANIFEST} | {s[k] for s in manifest["shards"] for k in ("index", "keys")}
    for info in fs.get_file_info(pafs.FileSelector(f"{path}/{INDEX_DIR}", allow_not_found=True)):
        if info.path.rsplit("/", 1)[-1] not in named:
            fs.delete_file(info.path)


def _list_sizes(index: faiss.Index) -> np.ndarray:
    try:
        lists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:            # a flat index has no lists
        return np.zeros(0, np.int64)
    return np.asarray([lists.list_size(i) for i in range(lists.nlist)], np.int64)


def _scrub_shard(output_uri: str, shard: dict, stem: str, gone: pa.Table) -> tuple[dict, np.ndarray, int]:
    """A Ray task: one shard without the faces in ``gone`` (image_uri, face_index), written
    as new files ``stem``: their vectors removed from the faiss index, their keys rows left
    in place (row = id - first) with image_uri and person nulled → (the shard's manifest
    entry, its change in faces per IVF list, faces removed).  A shard without them is kept."""
    
    faiss.omp_set_num_threads(1)
    fs, path = storage.resolve(output_uri)
    root = f"{path}/{INDEX_DIR}"
    keys = pq.read_table(f"{root}/{shard['keys']}", filesystem=fs)
    mask = face_rows(keys, gone)
    if not mask.any():
        return shard, np.zeros(0, np.int64), 0
    with fs.open_input_file(f"{root}/{shard['index']}") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
    before = _list_sizes(index)
    removed = int(index.remove_ids(np.asarray(shard["first"] + np.flatnonzero(mask), np.int64)))
    drop = pa.array(mask)
    for col in ("image_uri", "person"):
        i = keys.column_names.index(col)
        keys = keys.set_column(i, keys.field(i), pc.if_else(drop, pa.scalar(None, keys.field(i).type), keys.column(i)))
    storage.put_parquet(fs, f"{root}/{stem}.keys.parquet", keys)
    storage.put_atomic(fs, f"{root}/{stem}.faiss", faiss.serialize_index(index).tobytes())
    return {**shard, "index": f"{stem}.faiss", "keys": f"{stem}.keys.parquet"}, _list_sizes(index) - before, removed


def scrub_index(output_uri: str, gone: pa.Table, people_files: list[str], stale_unless: list[str]) -> str:
    """``--forget``: the search index without the faces in ``gone``, shard by shard in Ray
    tasks, so search keeps working (and never finds them) without the people job running
    again.  An index written for other people files than ``stale_unless`` (the output before
    the forget) is removed instead.  ``people_files``: the output's files now.  A line saying
    what happened."""
    import ray

    fs, path = storage.resolve(output_uri)
    try:
        with fs.open_input_stream(f"{path}/{INDEX_DIR}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return "no search index"
    def names(files: list[str]) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in files)

    if manifest.get("people_files") and manifest["people_files"] != names(stale_unless):
        remove_index(output_uri)
        return "search index removed (it described older people files)"
    run = f"{time.strftime('%Y%m%dT%H%M%S')}-forget"
    task, ref = _remote(_scrub_shard, 3), ray.put(gone)
    done = [task.remote(output_uri, s, f"{run}-{i:05d}", ref) for i, s in enumerate(manifest["shards"])]
    shards, changes, removed = (ray.get([d[j] for d in done]) for j in range(3))
    sizes = np.asarray(manifest.get("list_sizes") or [], np.int64)
    for change in changes:
        if len(change) and len(sizes):
            sizes = sizes + change
    _commit(output_uri, {**manifest, "shards": shards, "faces": int(manifest["faces"]) - sum(removed),
                         "list_sizes": sizes.tolist(),
                         "people_files": names(people_files) if manifest.get("people_files") else [],
                         "forgotten_faces": int(manifest.get("forgotten_faces", 0)) + sum(removed)})
    return f"search index: {sum(removed)} faces removed, {int(manifest['faces']) - sum(removed)} kept"


def build_from_table(table_uri: str, output_uri: str, codec: str = "fp16", exact_max: int = EXACT_MAX) -> IndexSummary:
    """An index of every face of a prediction table (no people: ``person`` null), as Ray
    tasks: for a table no people job has run on (and the benchmark at 10^7 faces)."""
    import ray

    from pipeline.people.reading import PeopleError, parquet_files

    _, files = parquet_files(table_uri)
    if not files:
        raise PeopleError(f"{table_uri}: no Parquet files (is it a score_directory.py output?)")
    read = _remote(_read_file, 6)
    shards = [read.remote(table_uri, f, 0.0, None) for f in files]
    counts = np.asarray(ray.get([s[5] for s in shards]), np.int64)
    keep = [i for i, c in enumerate(counts) if c]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-table"
    return write_index([shards[i][0] for i in keep], [shards[i][1] for i in keep], None,
                       np.r_[0, np.cumsum(counts[keep])], output_uri, run_id, [], table_uri, codec, exact_max)


def remove_index(output_uri: str) -> None:
    """Delete ``<output_uri>/_index/`` if there is one (``--search-index none``, ``--forget``)."""
    fs, path = storage.resolve(output_uri)
    if fs.get_file_info(f"{path}/{INDEX_DIR}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{path}/{INDEX_DIR}")


class _Lists:
    """The replica's IVF lists, each allocated once at its final size (the manifest's
    ``list_sizes``) and filled shard by shard.  Why: ``merge_from`` appends to each list
    and the vectors' doubling left ~40 % of a 10^7-face index as slack in the replica."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = np.asarray(sizes, np.int64) if sizes else None
        self.lists = None
        self.filled = None

    def take(self, index: faiss.Index) -> None:
        src = faiss.extract_index_ivf(index).invlists
        if self.lists is None:
            self.lists = faiss.ArrayInvertedLists(len(self.sizes), src.code_size)
            for i in np.flatnonzero(self.sizes):
                self.lists.resize(int(i), int(self.sizes[i]))
            self.filled = np.zeros(len(self.sizes), np.int64)
        for i in range(src.nlist):
            n = src.list_size(i)
            if n:
                self.lists.update_entries(i, int(self.filled[i]), n, src.get_ids(i), src.get_codes(i))
                self.filled[i] += n

    def into(self, index: faiss.Index) -> None:
        if self.filled is None or not np.array_equal(self.filled, self.sizes):
            raise ValueError("the search index's shards do not hold the faces its manifest lists")
        ivf = faiss.extract_index_ivf(index)
        ivf.replace_invlists(self.lists, True)
        self.lists.this.disown()         # the index owns (and frees) them now
        ivf.ntotal = index.ntotal = int(self.sizes.sum())


@dataclass
class LoadedIndex:
    index: faiss.Index
    keys: pa.Table            # image_uri, face_index, person; row = id
    manifest: dict


def open_index(people_uri: str) -> tuple[LoadedIndex | None, str]:
    """The index under ``<people_uri>/_index/`` and why not when there is none to use
    (absent, or written for other people part files than the output holds now)."""
    from pipeline.people.reading import parquet_files

    fs, path = storage.resolve(people_uri)
    root = f"{path}/{INDEX_DIR}"
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return None, f"no search index under {people_uri.rstrip('/')}/{INDEX_DIR}"
    _, files = parquet_files(people_uri)
    now = sorted(p.rsplit("/", 1)[-1] for p in files)
    if manifest.get("people_files") and manifest["people_files"] != now:
        return None, (f"the search index under {people_uri.rstrip('/')}/{INDEX_DIR} was written for other people "
                      f"files than the output holds now (run cluster_faces.py --resume to write it again)")
    index, parts, merged = None, [], _Lists(manifest.get("list_sizes") or [])
    for shard in manifest["shards"]:
        with fs.open_input_file(f"{root}/{shard['index']}") as f:
            one = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        if merged.sizes is not None:
            merged.take(one)
            if index is None:
                index = one                 # the first shard's quantiser; its lists are replaced below
        elif index is None:
            index = one
        else:
            index.merge_from(one, 0)       # ids are global already
        del one
        parts.append(pq.read_table(f"{root}/{shard['keys']}", filesystem=fs, read_dictionary=["person"]))
    if index is not None and merged.sizes is not None:
        try:
            merged.into(index)
        except ValueError as exc:
            return None, f"the search index under {people_uri.rstrip('/')}/{INDEX_DIR} is damaged: {exc}"
    if index is None:
        return None, f"the search index under {people_uri.rstrip('/')}/{INDEX_DIR} has no shards"
    if manifest.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(manifest["nprobe"])
    keys = pa.concat_tables(parts).combine_chunks()
    return LoadedIndex(index, keys, manifest), ""
