"""Reading a whole source into one canonical table, with the bad-row policy; the cheap pre-flight check.

Every input error surfaces here, before anything is written: unreadable or unknown files, values
that are not numbers, and malformed rows beyond ``data.max_bad_row_fraction``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from tuning_core.config import FlightsData
from tuning_core.data.flights import ordered
from tuning_core.data.flights.convert import convert_batch
from tuning_core.data.flights.detect import detect, read_header
from tuning_core.data.flights.sources import open_bytes, read_error, resolve_files, resolve_source, short_error, uri_of
from tuning_core.errors import DataError, StorageError

logger = logging.getLogger(__name__)


@dataclass
class ReadResult:
    """Everything read from a source: the canonical rows (in input order) and what happened."""

    table: pa.Table | None  # None once spilled
    schemas: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)
    bad_rows: int = 0  # rows that did not split into the file's columns, skipped
    bad_examples: list[dict[str, Any]] = field(default_factory=list)  # the first few, with file and line
    engine: str = "local"  # how the files were read: "local" or "ray" (engines)
    spill: ordered.Spill | None = None  # the rows, on disk, when there were more than ordered.SPILL_ROWS

    def in_order(self, limit: int | None) -> ordered.OrderedRows:
        """The rows in scheduled-departure order, the first ``limit`` kept; the unordered ones are let go."""
        rows = self.spill.ordered(limit) if self.spill is not None else ordered.in_memory(self.table, limit)
        self.table = None
        return rows

    @property
    def num_rows(self) -> int:
        return self.spill.rows if self.spill is not None else self.table.num_rows


@dataclass
class FileRead:
    """One file read: its canonical rows and what happened. Small and picklable: a Ray task returns it."""

    table: pa.Table | None  # None: no row kept
    schema: str
    file: dict[str, Any]
    rows: int
    dropped: Counter
    relabelled: Counter
    bad_rows: int
    bad_examples: list[dict[str, Any]]


# Bad rows shown in the data report and manifest.
_BAD_EXAMPLES = 5


class _BadRows:
    """pyarrow's invalid-row handler: counts rows whose column count is wrong (a truncated last line,
    ragged rows) and keeps the first few; skips them, or stops at the first when ``strict``.

    Line numbers are the parser's: counted from the file's first line, blank lines not counted.
    """

    def __init__(self, src: str, strict: bool) -> None:
        self.src, self.strict = src, strict
        self.count = 0
        self.examples: list[dict[str, Any]] = []

    def __call__(self, row: Any) -> str:
        if not row.text.strip():
            return "skip"  # a line of blanks carries no flight
        self.count += 1
        if len(self.examples) < _BAD_EXAMPLES:
            self.examples.append({"file": self.src, "line": row.number, "text": row.text[:120],
                                  "problem": f"expected {row.expected_columns} columns, got {row.actual_columns}"})
        return "error" if self.strict else "skip"


@contextlib.contextmanager
def _retried_as_latin1(handler: _BadRows, retry: bool) -> Iterator[None]:
    """pyarrow cannot give a bad row that is not UTF-8 to the handler: it reports the decoding failure
    as an "Exception ignored" traceback on stderr and fails the read, which is then retried as
    latin-1. While ``retry``, that report (and only it) is dropped."""
    if not retry:
        yield
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (unraisable.object is handler and isinstance(unraisable.exc_value, UnicodeDecodeError)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _bad_row_text(example: dict[str, Any]) -> str:
    return f"line {example['line']}: {example['problem']} ({example['text'][:60]!r})"


# "Row #N" (the line number) is there when the reader runs single-threaded, as ours does.
_CONVERSION = re.compile(r"CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to (\w+): invalid value '(.*)'")


def _arrow_error(err: pa.ArrowInvalid, src: str, names: list[str] | tuple[str, ...]) -> DataError:
    text = str(err)
    m = _CONVERSION.search(text)
    if m:
        idx, line, value = int(m.group(1)), m.group(2), m.group(4)
        name = names[idx] if idx < len(names) else f"#{idx}"
        what = "minutes" if "delay" in name.lower() else "numbers"
        where = f" at line {line}" if line else ""
        return DataError(f"{src}: column {name!r} is not numeric (example value {value[:40]!r}){where}; "
                         f"expected {what}")
    return DataError(f"{src}: malformed CSV ({short_error(err)})")


def read_file(fs: pafs.FileSystem, path: str, cfg: FlightsData | None) -> FileRead:
    """Read one file into canonical rows, streaming it in record batches of ``detect._BLOCK_SIZE`` bytes:
    memory holds one batch of raw text and the file's canonical rows, never the file's text.

    Raises:
        DataError, StorageError: the one-line error for this file (the same whichever engine calls it).
    """
    try:
        return _read_file(fs, path, cfg)
    except (DataError, StorageError):
        raise
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
        raise read_error(fs, path, err) from None


def _read_file(fs: pafs.FileSystem, path: str, cfg: FlightsData | None) -> FileRead:
    src = uri_of(fs, path)
    header = read_header(fs, path)
    plan = detect(header, src, need_label=cfg is not None, cfg=cfg)
    schema = plan.schema
    strict = cfg is not None and cfg.bad_rows == "error"
    encodings = [header.encoding] + (["latin-1"] if header.encoding == "utf8" else [])
    for attempt, encoding in enumerate(encodings):
        file_tables: list[pa.Table] = []
        dropped: Counter = Counter()
        relabelled: Counter = Counter()
        rows = 0
        bad = _BadRows(src, strict)
        try:
            with _retried_as_latin1(bad, attempt + 1 < len(encodings)), open_bytes(fs, path) as stream:
                reader = pacsv.open_csv(
                    stream,
                    read_options=plan.read_options(encoding),
                    parse_options=pacsv.ParseOptions(invalid_row_handler=bad),
                    convert_options=plan.convert_options(),
                )
                for batch in reader:
                    rows += batch.num_rows
                    table, rel = convert_batch(batch, plan, cfg, dropped)
                    relabelled.update(rel)
                    if table.num_rows:
                        file_tables.append(table)
        except pa.ArrowInvalid as err:
            # A parse error our handler did not ask for: pyarrow could not decode the bad row's text
            # for it (not UTF-8), so the handler never ran. Latin-1 decodes every byte.
            not_utf8 = "invalid UTF8" in str(err) or (str(err).startswith("CSV parse error") and not bad.count)
            if not_utf8 and attempt + 1 < len(encodings):
                logger.info("%s: not valid UTF-8, reading it as latin-1", src)
                continue
            if strict and bad.count:
                raise DataError(f"{src}: {_bad_row_text(bad.examples[0])}; data.bad_rows is 'error' "
                                "('skip' skips such rows up to data.max_bad_row_fraction)") from None
            raise _arrow_error(err, src, plan.column_names or header.names) from None
        break
    logger.info("%s: schema %s, header %s, %d rows, %d malformed, encoding %s", src, schema.name, plan.header, rows,
                bad.count, encoding)
    return FileRead(
        table=pa.concat_tables(file_tables) if file_tables else None,  # zero-copy: the batches stay chunks
        schema=schema.name,
        file={"path": src, "schema": schema.name, "encoding": encoding, "rows": rows, "header": plan.header,
              "bad_rows": bad.count},
        rows=rows, dropped=dropped, relabelled=relabelled, bad_rows=bad.count, bad_examples=bad.examples)


def _header_only(src: str) -> DataError:
    return DataError(f"{src}: no data rows (header only); expected at least one flight per split")


def read_source(fs: pafs.FileSystem, path: str, cfg: FlightsData | None,
                ray_fs: pafs.FileSystem | None = None, spill_to: Path | None = None,
                consume: Callable[[pa.Table], None] | None = None) -> ReadResult:
    """Read every file of a source into one canonical table; all input errors surface here.

    The files are read by the engine ``cfg.engine`` chooses (``engines``), each into its canonical rows,
    and combined in the order of ``resolve_files``: the result is the same whichever engine read them.
    ``ray_fs``: what Ray tasks read ``fs``'s files with (see ``engines.read_files``). ``spill_to``: a
    folder where more than ``ordered.SPILL_ROWS`` canonical rows go (``ordered.Spill``) instead of memory.
    ``consume``: takes each file's rows instead of the result (``combine``).
    """
    from tuning_core.data.flights.engines import read_files  # engines imports this module's read_file

    files = resolve_files(fs, path)
    engine, reads = read_files(fs, files, cfg, ray_fs)
    return combine(fs, path, reads, cfg, engine, spill_to, consume)


def combine(fs: pafs.FileSystem, path: str, reads: Iterable[FileRead], cfg: FlightsData | None,
            engine: str = "local", spill_to: Path | None = None,
            consume: Callable[[pa.Table], None] | None = None) -> ReadResult:
    """The files' reads, in file order, as one table (or spilled to ``spill_to`` once they hold more than
    ``ordered.SPILL_ROWS`` rows), with the source-wide bad-row check.

    ``consume``: handed each file's rows as they come instead (batch scoring: one file held at a time); the
    result then has no table, and the checks that need the whole source raise after the last file.
    """
    src = uri_of(fs, path)
    out = ReadResult(table=pa.table({}), engine=engine)
    tables: list[pa.Table] = []
    held = kept = 0
    for read in reads:
        if read.table is not None and consume is not None:
            kept += read.table.num_rows
            consume(read.table)
        elif read.table is not None:
            tables.append(read.table)
            held += read.table.num_rows
            kept += read.table.num_rows
            if spill_to is not None and (out.spill is not None or held > ordered.SPILL_ROWS):
                out.spill = out.spill or ordered.Spill(spill_to)
                for table in tables:
                    out.spill.add(table)
                tables, held = [], 0
        out.schemas.append(read.schema)
        out.rows_read += read.rows
        out.dropped.update(read.dropped)
        out.relabelled.update(read.relabelled)
        out.bad_rows += read.bad_rows
        out.bad_examples.extend(read.bad_examples[:_BAD_EXAMPLES - len(out.bad_examples)])
        out.files.append(read.file)
    _check_bad_rows(out, cfg or FlightsData())
    if out.bad_rows:
        first = out.bad_examples[0]
        logger.warning("%s: %d malformed row(s) skipped, the first in %s at %s", src, out.bad_rows, first["file"],
                       _bad_row_text(first))
    if out.rows_read == 0:
        raise _header_only(src)
    if not kept:
        reasons = ", ".join(f"{k}={v}" for k, v in out.dropped.items() if v)
        raise DataError(f"{src}: no rows left after filtering ({out.rows_read} read; dropped {reasons})")
    if consume is not None:
        out.table = None
    elif out.spill is not None:
        out.table = None
        logger.info("%s: %d canonical rows spilled to %s in buckets", src, out.spill.rows, spill_to)
    else:  # zero-copy concatenation: the chunks are only copied once, when prepare orders the rows
        out.table = pa.concat_tables(tables).unify_dictionaries()
    return out


def _check_bad_rows(out: ReadResult, cfg: FlightsData) -> None:
    """Skipped rows are fine up to ``data.max_bad_row_fraction`` of all rows; beyond that the file is
    not what it claims to be (or badly damaged), and guessing further would hide it."""
    total = out.rows_read + out.bad_rows
    if out.bad_rows and out.bad_rows > cfg.max_bad_row_fraction * total:
        first = out.bad_examples[0]
        raise DataError(f"{first['file']}: {out.bad_rows} of {total} rows are malformed ({out.bad_rows / total:.3%}), "
                        f"more than data.max_bad_row_fraction={cfg.max_bad_row_fraction:g}; "
                        f"first at {_bad_row_text(first)}")


def check_source(cfg: FlightsData, source_fs: pafs.FileSystem | None, source_path: str | None) -> None:
    """Cheap checks of a source before a pipeline starts, reading at most ~1 MiB of each file.

    Most bad inputs are a missing or unmatched path, an unreadable archive, an unknown header or a
    header without rows; this finds them in about a second, so a run fails before an orchestrator
    or a cluster starts. Values deep inside a file are still checked by ``prepare``.

    Raises:
        DataError, StorageError, ServiceUnavailable: the one-line error ``prepare`` raises for the same
            problem.
    """
    in_fs, in_path, _ = resolve_source(cfg, source_fs, source_path)
    any_rows = False
    for file in resolve_files(in_fs, in_path):
        try:
            header = read_header(in_fs, file)
        except (DataError, StorageError):
            raise
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise read_error(in_fs, file, err) from None
        plan = detect(header, uri_of(in_fs, file), need_label=True, cfg=cfg)
        any_rows = any_rows or header.has_rows or plan.column_names is not None  # headerless: line 1 is a row
    if not any_rows:
        raise _header_only(uri_of(in_fs, in_path))
