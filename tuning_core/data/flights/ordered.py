"""The canonical rows in scheduled-departure order, held in parts: one table in memory, or buckets on disk.

A source of more than ``SPILL_ROWS`` canonical rows is not held in memory: ``Spill`` writes each
file's rows (as the engines hand them over, one file at a time, in file order) to a temp folder in
buckets of ``BUCKET_DAYS`` days of scheduled departure; each bucket is then sorted on its own. Since
the sort key starts with the day, the buckets in order are the whole table in order, and since each
bucket's pieces are in file order and Arrow's sort is stable, flights departing in the same minute
keep the order the in-memory sort gives them. Peak memory is one file's canonical rows plus one
bucket, not every row twice (a sorted copy of the whole table).

Everything ``versioning.prepare`` derives from the ordered rows (the ``max_rows`` cut, the categories,
the content hash, the split, the manifest's figures, the split files) reads them part by part through
``OrderedRows``, whichever way they are held: one code path, so the two give the same version hash,
splits and manifest (tested on real multi-file sources in tests/unit/test_flights_engines.py).

Hand-written rather than Ray Data's sort: the hash and the split need the rows in one global order
with the in-memory path's tie order, and ``data.engine: local`` runs with no cluster at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tuning_core.errors import StorageError

logger = logging.getLogger(__name__)

SORT_KEYS = [("_day", "ascending"), ("dep_hour", "ascending"), ("dep_minute", "ascending")]
# Canonical rows held in memory before a source is spilled to disk (~35 bytes a row: ~140 MB).
SPILL_ROWS = 4_000_000
# Days of scheduled departure per bucket: ~240k rows of the ASA history's busiest years (~8 MB).
BUCKET_DAYS = 16
# Rows per row group of the split files written from parts (small buckets are gathered up to it).
ROW_GROUP_ROWS = 1 << 20


class Spill:
    """Canonical rows written to ``folder`` in buckets of scheduled departure, file after file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pieces: dict[int, list[Path]] = {}
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        """One file's canonical rows (call in file order): each bucket's rows, in their order, to a piece."""
        buckets = pc.divide(table.column("_day"), pa.scalar(BUCKET_DAYS, pa.int32())).combine_chunks()
        # A stable sort by bucket keeps each bucket's rows in the file's order.
        order = pc.sort_indices(buckets)
        table, buckets = table.take(order), buckets.take(order)
        ids, counts = np.unique(buckets.to_numpy(), return_counts=True)
        start = 0
        for bucket, count in zip(ids.tolist(), counts.tolist(), strict=True):
            pieces = self.pieces.setdefault(bucket, [])
            path = self.folder / f"b{bucket}-{len(pieces):06d}.arrow"
            _write_ipc(table.slice(start, count), path)
            pieces.append(path)
            start += count
        self.rows += table.num_rows

    def ordered(self, limit: int | None) -> OrderedRows:
        """Sort each bucket (pieces in file order), keep the first ``limit`` rows; the pieces are removed."""
        parts: list[Path] = []
        kept = 0
        for bucket in sorted(self.pieces):
            pieces = self.pieces.pop(bucket)
            if limit is not None and kept >= limit:
                for piece in pieces:
                    piece.unlink()
                continue
            table = pa.concat_tables([_mapped(p) for p in pieces]).unify_dictionaries()
            table = table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))
            if limit is not None and kept + table.num_rows > limit:
                table = table.slice(0, limit - kept)
            kept += table.num_rows
            path = self.folder / f"sorted-{bucket}.arrow"
            _write_ipc(table, path)
            parts.append(path)
            for piece in pieces:
                piece.unlink()
        logger.info("flights: %d rows sorted in %d buckets of %d days on disk", kept, len(parts), BUCKET_DAYS)
        return OrderedRows(parts)


def in_memory(table: pa.Table, limit: int | None) -> OrderedRows:
    """The rows of one table, sorted (stable) and cut to the first ``limit``, as a single part."""
    table = table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))
    if limit is not None and table.num_rows > limit:
        table = table.slice(0, limit)
    return OrderedRows([table])


class OrderedRows:
    """The kept canonical rows in order, as parts (tables, or Arrow files read memory-mapped)."""

    def __init__(self, parts: list[pa.Table | Path]) -> None:
        self._parts = parts
        self.lengths = [(_mapped(p) if isinstance(p, Path) else p).num_rows for p in parts]
        self.num_rows = sum(self.lengths)

    def tables(self, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
        """(offset of its first row, the part) for each part in order; only ``columns`` if given
        (of a part on disk, only those columns' pages are read)."""
        offset = 0
        for part, length in zip(self._parts, self.lengths, strict=True):
            table = _mapped(part) if isinstance(part, Path) else part
            yield offset, table.select(columns) if columns else table
            offset += length

    def column_names(self) -> list[str]:
        return next(self.tables())[1].column_names

    def categories(self, names: list[str]) -> dict[str, list[str]]:
        """Each dictionary column's values used by the kept rows, sorted (stable across inputs and splits)."""
        used: dict[str, set[str]] = {name: set() for name in names}
        for _, table in self.tables(names):
            for name in names:
                arr = _as_dictionary(table.column(name))
                present = pc.unique(arr.indices).drop_null()
                used[name].update(arr.dictionary.take(present).to_pylist())
        return {name: sorted(values) for name, values in used.items()}

    def content_hash(self, header: dict[str, Any], categories: dict[str, list[str]]) -> str:
        """Hash of the rows and of everything that shaped them (``header``): each column's values in order,
        column after column, the dictionary columns as their indices into ``categories``.

        Hashing the canonical rows, not the input bytes, makes the hash independent of how the input was
        compressed, chunked or laid out in files. Read part by part, the bytes are those of the whole
        column: an integer column with a null anywhere is hashed as float64 (NaN for null) in every part,
        as ``to_numpy`` converts a whole column with nulls.
        """
        h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        names = self.column_names()
        nulls = self.null_counts(names)
        dictionaries = {name: pa.array(values, pa.string()) for name, values in categories.items()}
        for name in names:
            h.update(name.encode())
            for _, table in self.tables([name]):
                arr = table.column(name).combine_chunks()
                if name in dictionaries:
                    data = pc.fill_null(recode(arr, dictionaries[name]).indices, -1)
                elif nulls[name] and pa.types.is_integer(arr.type):
                    data = arr.cast(pa.float64())
                else:
                    data = arr
                h.update(np.ascontiguousarray(data.to_numpy(zero_copy_only=False)).tobytes())
        return h.hexdigest()[:16]

    def null_counts(self, names: list[str], nan: bool = False) -> dict[str, int]:
        """Nulls per column (and NaNs of float columns with ``nan``), over all parts."""
        counts = dict.fromkeys(names, 0)
        for _, table in self.tables(names):
            for name in names:
                arr = table.column(name)
                counts[name] += arr.null_count
                if nan and pa.types.is_floating(arr.type):
                    counts[name] += int(pc.sum(pc.is_nan(arr)).as_py() or 0)
        return counts

    def day_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct days in order and the rows of each (a day never spans two parts)."""
        days, counts = [], []
        for _, table in self.tables(["_day"]):
            d, c = np.unique(table.column("_day").to_numpy(), return_counts=True)
            days.append(d)
            counts.append(c)
        return np.concatenate(days), np.concatenate(counts)

    def label_sums(self, splits: dict[str, np.ndarray | slice], label: str) -> dict[str, int]:
        """The label's sum over each split's rows."""
        sums = dict.fromkeys(splits, 0)
        for offset, table in self.tables([label]):
            column = table.column(label)
            for name, rows in splits.items():
                local = rows_in(rows, offset, table.num_rows)
                part = column.slice(local.start, local.stop - local.start) if isinstance(local, slice) \
                    else column.take(pa.array(local))
                sums[name] += int(pc.sum(part).as_py() or 0)
        return sums

    def parquet_writer(self, rows: np.ndarray | slice, columns: list[str], categories: dict[str, list[str]]) -> Any:
        """A writer (for ``write_version``) of the split with these ``rows``: ``columns``, the dictionary
        columns on ``categories``, zstd; streamed part by part in row groups of ``ROW_GROUP_ROWS``."""
        dictionaries = {name: pa.array(values, pa.string()) for name, values in categories.items()}

        def write(out: Any) -> None:
            writer, held, count = None, [], 0
            for offset, table in self.tables(columns):
                local = rows_in(rows, offset, table.num_rows)
                part = table.slice(local.start, local.stop - local.start) if isinstance(local, slice) \
                    else table.take(pa.array(local))
                if not part.num_rows:
                    continue
                for name, dictionary in dictionaries.items():
                    if name in columns:
                        index = part.schema.get_field_index(name)
                        part = part.set_column(index, name, recode(part.column(name).combine_chunks(), dictionary))
                held.append(part)
                count += part.num_rows
                if count >= ROW_GROUP_ROWS:
                    writer = _flush(writer, out, held)
                    held, count = [], 0
            if held or writer is None:
                writer = _flush(writer, out, held or [self._empty(columns, dictionaries)])
            writer.close()

        return write

    def _empty(self, columns: list[str], dictionaries: dict[str, pa.Array]) -> pa.Table:
        table = next(self.tables(columns))[1].slice(0, 0)
        for name, dictionary in dictionaries.items():
            if name in columns:
                index = table.schema.get_field_index(name)
                table = table.set_column(index, name, recode(table.column(name).combine_chunks(), dictionary))
        return table

    def remove(self) -> None:
        for part in self._parts:
            if isinstance(part, Path):
                part.unlink(missing_ok=True)


def day_at(days: np.ndarray, counts: np.ndarray, position: int) -> int:
    """The scheduled-departure day of the row at ``position``, from ``OrderedRows.day_counts``."""
    return int(days[int(np.searchsorted(np.cumsum(counts), position, "right"))])


def rows_in(rows: np.ndarray | slice, offset: int, length: int) -> slice | np.ndarray:
    """The rows of a split (a slice, or sorted positions) that fall in ``[offset, offset + length)``,
    as positions local to that part."""
    if isinstance(rows, slice):
        start = min(max(rows.start - offset, 0), length)
        stop = min(max(rows.stop - offset, 0), length)
        return slice(start, max(start, stop))
    lo, hi = np.searchsorted(rows, [offset, offset + length])
    return rows[lo:hi] - offset


def recode(arr: pa.Array, dictionary: pa.Array) -> pa.DictionaryArray:
    """A dictionary (or plain string) column re-encoded onto ``dictionary`` (the version's categories)."""
    arr = _as_dictionary(arr)
    mapping = pc.index_in(arr.dictionary, value_set=dictionary)
    indices = mapping.take(arr.indices).cast(pa.int32())
    return pa.DictionaryArray.from_arrays(indices, dictionary)


def _as_dictionary(arr: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return arr if pa.types.is_dictionary(arr.type) else arr.dictionary_encode()


def _flush(writer: Any, out: Any, held: list[pa.Table]) -> Any:
    table = pa.concat_tables(held)
    if writer is None:
        writer = pq.ParquetWriter(out, table.schema, compression="zstd")
    writer.write_table(table, row_group_size=max(ROW_GROUP_ROWS, table.num_rows))
    return writer


def _write_ipc(table: pa.Table, path: Path) -> None:
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    except OSError as err:  # typically a full disk: say which folder and what it needs
        raise StorageError(f"{path.parent}: cannot spill the flights' canonical rows there ({err}); "
                           "expected a temp folder with ~35 bytes free per flight: set TMPDIR to one") from None


def _mapped(path: Path) -> pa.Table:
    """An Arrow file as a table over a memory map (no copy). The map is not closed here: it stays
    valid while any array of the table is referenced, and goes with the last one."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
