"""A data file read whole before anything runs: every row, not the first one.

`datasets` reads what it is given without a word: a JSON-lines file whose label is missing from most rows trains
on the rows without their label (None renders as ""), a label that is a list renders as "['Joy']", a JSON mapping
of columns of unequal length is one row. So every row is read here (JSON, JSON lines, CSV, text, gzip of those;
parquet/arrow from their metadata) and the file's problems are named in one line: the first bad row, how many
rows share the problem, and the fix. The file's row count comes back for the split and held-out checks.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestrator.core.errors import UserError
from orchestrator.engine.preflight_error import first_line

WHOLE_FILE_LIMIT = 1 << 30  # bytes of one file read row by row; beyond, the first GiB (datasets checks the rest)


class DataFileError(UserError):
    """A data file that would train on something else than the user meant: one line, the row and the fix."""


@dataclass
class Needed:
    """Columns the text is made of: `plain` render as text (a scalar in every row), `nested` are read through
    an attribute or index in the template ("{row.x}", "{a[0]}") and may hold objects or lists."""

    plain: list[str] = field(default_factory=list)
    nested: list[str] = field(default_factory=list)
    chat_col: str | None = None  # a chat_template renders the rows: chat messages in this column (or ShareGPT /
    # instruction columns) instead of text columns

    @property
    def all(self) -> list[str]:
        return list(dict.fromkeys(self.plain + self.nested))


def needed_columns(fields: list[str], text_cols: list[str]) -> Needed:
    """The columns a text_template's fields (or text_cols) need; "{Best Answer}" is the column "Best Answer"."""
    out = Needed(plain=list(text_cols))
    for f in fields:
        base = re.split(r"[.\[:!]", f, maxsplit=1)[0]
        if base == f:
            out.plain.append(f)
        else:
            out.nested.append(f)  # resolved against the row's columns below (a column may hold ':' or '.')
    return out


def scan_file(path: Path, label: str, needed: Needed) -> int | None:
    """Read the whole file; raise DataFileError for the first problem. Returns its row count (None: unknown)."""
    name = path.name.lower()
    inner = name.removesuffix(".gz")
    suffix = Path(inner).suffix
    if suffix in (".parquet", ".arrow"):
        return _binary_rows(path, label, needed, suffix)
    if suffix not in (".json", ".jsonl", ".csv", ".txt"):
        return None
    try:
        with _open(path) as fh:
            if suffix == ".txt":
                return _text_rows(fh, path, label)
            if suffix == ".csv":
                return _check_rows(_csv_rows(fh, path, label), path, label, needed)
            return _check_rows(_json_rows(fh, path, label, whole=suffix == ".json"), path, label, needed)
    except UnicodeDecodeError:
        raise DataFileError(f"{label}: {path} {_encoding_problem(path)}") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, PermissionError):
            raise DataFileError(f"{label}: {path} is not readable (permission denied)") from None
        raise DataFileError(f"{label}: {path} cannot be read ({exc.strerror or exc})") from None


def _open(path: Path) -> IO[str]:
    raw: IO[bytes] = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")  # noqa: SIM115
    limited = _Limited(raw, WHOLE_FILE_LIMIT)
    return io.TextIOWrapper(limited, encoding="utf-8-sig", newline="")  # type: ignore[arg-type]


class _Limited(io.RawIOBase):
    """At most `limit` bytes of a stream (a huge file is checked on its first GiB)."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.left <= 0:
            return 0
        data = self.inner.read(min(len(buf), self.left, 1 << 20))
        n = len(data)
        buf[:n] = data
        self.left -= n
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def _encoding_problem(path: Path) -> str:
    """Where the file stops being UTF-8 and what it looks like instead (schema.files' words)."""
    from orchestrator.schema.files import encoding_problem

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read(WHOLE_FILE_LIMIT)
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return encoding_problem(data, exc)
    return "is not UTF-8 text; save it as UTF-8"


# ---- readers: (row number, row) ---------------------------------------------------------------------------------
def _json_rows(fh: IO[str], path: Path, label: str, *, whole: bool = False) -> Iterator[tuple[int, Any]]:
    """Rows of JSON lines, or of one JSON document (a list of rows, a mapping of columns). `whole`: a .json
    file, read as one document first when it is one (a mapping of columns on one line is not a row)."""
    start = fh.read(4096)
    head = start.lstrip("\ufeff \t\r\n")
    if head.startswith("["):  # one JSON document: a list of rows
        yield from enumerate(_whole_json(start + fh.read(), path, label), 1)
        return
    if whole and head.startswith("{"):
        text = start + fh.read()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None  # JSON lines in a .json file
        if isinstance(doc, dict):
            yield from enumerate(_document_rows(doc, path, label), 1)
            return
        fh = io.StringIO(text)
        start = fh.read(4096)
    for lineno, line in enumerate(_chain_lines(start, fh), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except ValueError as exc:
            if lineno == 1 and head.startswith("{"):  # one (pretty-printed) JSON document: rows or columns
                with _open(path) as again:
                    doc = _whole_json(again.read(), path, label)
                yield from enumerate(_document_rows(doc, path, label), 1)
                return
            raise DataFileError(
                f"{label}: {path} line {lineno} is not valid JSON ({first_line(exc)}); fix or remove it"
            ) from None
    return


def _chain_lines(start: str, fh: IO[str]) -> Iterator[str]:
    """The lines of `start` followed by the rest of the stream."""
    pending = start
    while True:
        *complete, pending = pending.split("\n")
        yield from complete
        chunk = fh.read(1 << 20)
        if not chunk:
            break
        pending += chunk
    if pending:
        yield pending


def _whole_json(text: str, path: Path, label: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataFileError(f"{label}: {path} is not valid JSON ({first_line(exc)})") from None


def _document_rows(data: Any, path: Path, label: str) -> list[Any]:
    """A JSON document as rows: a list of rows, a mapping of equal-length columns, or one row."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
            raise DataFileError(
                f"{label}: {path} is a mapping of columns of unequal length ({shown} rows); every column needs one "
                "value per row"
            )
        n = next(iter(lengths.values()))
        return [{k: v[i] for k, v in data.items()} for i in range(n)]
    return [data]


def _csv_rows(fh: IO[str], path: Path, label: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:
                continue
            if len(row) > len(header):
                raise DataFileError(
                    f"{label}: {path} line {reader.line_num} has {len(row)} fields, the header {len(header)}; quote "
                    "values that hold commas"
                )
            yield reader.line_num, {k: (row[i] if i < len(row) else None) for i, k in enumerate(header)}
    except csv.Error as exc:
        raise DataFileError(f"{label}: {path} is not valid CSV ({exc})") from None


def _text_rows(fh: IO[str], path: Path, label: str) -> int:
    rows = sum(1 for line in fh if line.strip())
    if rows == 0:
        raise DataFileError(f"{label}: {path} has only blank lines; it needs at least one row")
    return rows


def _binary_rows(path: Path, label: str, needed: Needed, suffix: str) -> int | None:
    """Row count and columns of a parquet / arrow file from its metadata (no data is read); None on a client
    without pyarrow (a submit-only install: the pass reads the file where it runs)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            rows, columns = meta.metadata.num_rows, list(meta.schema_arrow.names)
        else:
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
            rows, columns = table.num_rows, list(table.column_names)
    except Exception as exc:  # pyarrow's many error types: the file is not what its name says
        raise DataFileError(f"{label}: {path} is not a readable {suffix[1:]} file ({first_line(exc)})") from None
    missing = [c for c in needed.plain if c not in columns]
    if missing:
        raise DataFileError(
            f"{label}: {path} has no column {missing[0]!r} that the text_template/text_cols names "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    if rows == 0:
        raise DataFileError(f"{label}: {path} has no rows")
    return rows


# ---- the rows ---------------------------------------------------------------------------------------------------
def _check_rows(rows: Iterator[tuple[int, Any]], path: Path, label: str, needed: Needed) -> int:
    """Every row an object holding every needed column with a usable value; returns the row count."""
    count = 0
    first_columns: list[str] | None = None
    lacking: dict[str, list[int]] = {}  # column -> [first row number, rows lacking it]
    wrong: dict[str, tuple[int, str]] = {}  # column -> (first row, what it holds)
    for number, row in rows:
        count += 1
        if not isinstance(row, dict):
            raise DataFileError(
                f"{label}: {path} rows must be JSON objects (one per line), got {type(row).__name__} "
                f"at row {count}"
            )
        if first_columns is None:
            first_columns = [str(k) for k in row]
            _check_template_columns(first_columns, needed, path, label)
            if needed.chat_col is not None:
                _check_chat_row(row, needed.chat_col, path, label)
        for col in needed.plain:
            value = row.get(col)
            if value is None:
                entry = lacking.setdefault(col, [number, 0])
                entry[1] += 1
            elif isinstance(value, dict | list) and col not in wrong:
                wrong[col] = (number, "a list" if isinstance(value, list) else "an object")
    if count == 0:
        raise DataFileError(f"{label}: {path} has no rows")
    if lacking:
        col, (first, n) = next(iter(lacking.items()))
        where = "line" if path.suffix.lower() in (".jsonl", ".csv") else "row"
        raise DataFileError(
            f"{label}: {path}: {n} of {count} rows have no value for {col!r} (first at {where} {first}), which "
            "the text_template/text_cols needs; fill it in or drop those rows (they would train without it)"
        )
    if wrong:
        col, (first, what) = next(iter(wrong.items()))
        raise DataFileError(
            f"{label}: {path}: column {col!r} holds {what} at row {first}; the text_template renders text, numbers "
            "or booleans (name a field inside it, e.g. {" + col + "[0]}, or flatten the column)"
        )
    return count


def _check_template_columns(columns: list[str], needed: Needed, path: Path, label: str) -> None:
    """Each needed column is in the data (a nested field needs the column before its '.', '[', ':' or '!')."""
    plain = [c for c in needed.plain if c not in columns]
    nested = [
        c for c in needed.nested if c not in columns and re.split(r"[.\[:!]", c, maxsplit=1)[0] not in columns
    ]
    missing = plain + nested
    if missing:
        raise DataFileError(
            f"{label}: {path} has no column {missing[0]!r} that the text_template/text_cols names "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    # a nested field that is itself a column ("{Best Answer}"-like names with '.' or ':') is plain after all
    needed.plain.extend(c for c in needed.nested if c in columns and c not in needed.plain)


def _check_chat_row(row: dict[str, Any], chat_col: str, path: Path, label: str) -> None:
    """A chat template renders messages: the rows hold them (or ShareGPT / instruction columns it can map)."""
    from orchestrator.passes.common.data import row_messages

    if row_messages(row, chat_col, list(row)) is None:
        raise DataFileError(
            f"{label}: {path}: chat_template (--use_chat_template) needs chat rows: a {chat_col!r} column of "
            "{role, content} messages, ShareGPT 'conversations', or instruction columns (instruction/input/"
            f"output, prompt/response, question/answer); its columns are {', '.join(map(str, row)) or 'none'}"
        )


# ---- splits -----------------------------------------------------------------------------------------------------
_PART = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d*)(%?)\s*:\s*(-?\d*)(%?)\s*\](?:\([\w]+\))?)?\s*$")


def split_rows(split: str, total: int) -> int | None:
    """How many rows a split expression ("train[:80%]", "train[10:20]+train[30:]") selects from `total` rows, as
    datasets counts them (percent bounds rounded to the closest row); None when it cannot be told."""
    count = 0
    for part in split.split("+"):
        m = _PART.match(part)
        if m is None:
            return None
        _, lo, lo_pct, hi, hi_pct = m.groups()
        start = _bound(lo, lo_pct, total, 0)
        stop = _bound(hi, hi_pct, total, total)
        count += len(range(total)[slice(start, stop)])
    return count


def _bound(value: str | None, pct: str, total: int, default: int) -> int:
    if not value:
        return default
    n = int(value)
    return round(total * n / 100) if pct else n
