"""Lookups in a batch prediction table (local folder or S3 prefix of Parquet files).

Why an in-memory index and not DuckDB over the Parquet files: DuckDB reads S3 only through
its ``httpfs`` extension, which it downloads at run time (no network here, and one more
moving part in production), and a query per request would re-scan the files.  Instead the
table is read once (pyarrow, any store ``pipeline.storage`` resolves) and indexed:

* rows sorted by (image_uri, face_index) → a lookup by URI is a binary search;
* every filterable string column (``status`` and each classification task) is dictionary
  encoded and its row numbers grouped by label → a lookup by label is a slice, several
  filters intersect sorted row sets, paging is ``offset``/``limit`` over that stable order.

The ``embedding`` column is left out unless asked for (``embeddings=True``): it is
128 float32 per row, 512 MB per 10^6 rows, against ~150 MB for everything else.
Measured in benchmarks/serve_lookup.py (10^6 rows): see benchmarks/README.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage

# String columns that identify or describe a row rather than a label: not filters.
NOT_FILTERS = frozenset({"image_uri", "error", "model_version"})


class TableError(ValueError):
    """A lookup the table cannot answer (unknown column, bad value): the client's mistake."""


@dataclass
class Page:
    rows: list[dict]
    total: int
    offset: int
    limit: int

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.rows)
        return end if end < self.total else None


class PredictionIndex:
    """A prediction table held in memory with indexes for URI and label lookups."""

    def __init__(self, table: pa.Table, uri: str = "", load_seconds: float = 0.0) -> None:
        t = table.sort_by([("image_uri", "ascending"), ("face_index", "ascending")]).combine_chunks()
        self.uri = uri
        self.table = t
        self.load_seconds = load_seconds
        self.has_embeddings = "embedding" in t.column_names
        self._uris = np.asarray(t.column("image_uri").to_numpy(zero_copy_only=False), dtype=object)
        self.filters: dict[str, _Groups] = {}
        for field in t.schema:
            if field.name in NOT_FILTERS or not pa.types.is_string(field.type):
                continue
            self.filters[field.name] = _group(t.column(field.name))

    @classmethod
    def load(cls, uri: str, embeddings: bool = False) -> "PredictionIndex":
        """Read the table's Parquet files (``storage.table_files``: side files ``_*`` and
        in-progress ones are not the table); fails loudly when there is none."""
        started = time.monotonic()
        try:
            fs, files = storage.table_files(uri)
        except storage.StorageError as exc:
            raise FileNotFoundError(f"prediction table not found at {uri}: {exc}") from None
        if not files:
            raise FileNotFoundError(f"prediction table not found at {uri} (no .parquet files there)")
        ds = pads.dataset(files, filesystem=fs, format="parquet")
        columns = [c for c in ds.schema.names if embeddings or c != "embedding"]
        index = cls(ds.to_table(columns=columns), uri)
        index.load_seconds = time.monotonic() - started  # read + sort + index build
        return index

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def describe(self) -> dict:
        return {"table_uri": self.uri, "rows": self.num_rows, "filters": sorted(self.filters),
                "embeddings": self.has_embeddings, "load_seconds": round(self.load_seconds, 3)}

    def query(self, image_uri: str | None = None, filters: dict[str, str] | None = None,
              limit: int = 100, offset: int = 0, embeddings: bool = False) -> Page:
        """Rows matching the URI and every ``column=value`` filter, in table order."""
        filters = filters or {}
        unknown = sorted(set(filters) - set(self.filters))
        if unknown:
            raise TableError(f"cannot filter on {', '.join(unknown)}: filterable columns are "
                             f"{', '.join(sorted(self.filters)) or 'none'}, or image_uri")
        if embeddings and not self.has_embeddings:
            raise TableError("this endpoint was started without the table's embeddings "
                             "(Predictions user_config embeddings: true loads them)")
        # Start from the smallest candidate set, then check the other filters by their codes:
        # the cost is that set's size, not the size of the biggest matching label.
        sets: list[tuple[int, str, np.ndarray]] = []
        if image_uri is not None:
            lo = int(np.searchsorted(self._uris, image_uri, side="left"))
            hi = int(np.searchsorted(self._uris, image_uri, side="right"))
            sets.append((hi - lo, "image_uri", np.arange(lo, hi, dtype=np.int64)))
        for name, value in filters.items():
            g = self.filters[name]
            lo, hi = g.spans.get(value, (0, 0))
            sets.append((hi - lo, name, g.rows[lo:hi]))
        if sets:
            _, first, rows = min(sets, key=lambda s: s[0])
            for name, value in filters.items():
                if name != first and len(rows):
                    g = self.filters[name]
                    rows = rows[g.codes[rows] == g.code(value)]
        else:
            rows = np.arange(self.num_rows, dtype=np.int64)
        page = rows[offset:offset + limit]
        t = self.table.take(pa.array(page, pa.int64()))
        if self.has_embeddings and not embeddings:
            t = t.drop_columns(["embedding"])
        return Page(t.to_pylist(), int(len(rows)), offset, limit)


@dataclass
class _Groups:
    """Row numbers of one string column grouped by value (rows ascending within a value)."""

    spans: dict[str, tuple[int, int]]   # value → (start, stop) in ``rows``
    rows: np.ndarray                    # int64 row numbers, grouped by value
    codes: np.ndarray                   # int32 value code per table row (-1 for null)
    values: dict[str, int]              # value → code

    def code(self, value: str) -> int:
        return self.values.get(value, -2)  # -2 matches no row (not even nulls)


def _group(column: pa.ChunkedArray) -> _Groups:
    enc = pc.dictionary_encode(column.combine_chunks())
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    order = np.argsort(codes, kind="stable")
    rows = order[codes[order] >= 0].astype(np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=len(enc.dictionary))
    stops = np.cumsum(counts)
    labels = enc.dictionary.to_pylist()
    spans = {v: (int(s - c), int(s)) for v, c, s in zip(labels, counts, stops)}
    return _Groups(spans, rows, codes, {v: i for i, v in enumerate(labels)})
