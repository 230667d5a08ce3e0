"""What every loader shares: the parse result, row builders, file readers and the two levels of checking.

Two levels, because they call for different reactions:
- *file level*: the file is not the format we were told (unparseable JSON, a top-level key or a column that
  is absent, a field no row has, so it was renamed). Nothing in it can be trusted, so we stop with one
  `DataFormatError` naming the file and the field, instead of quarantining every row one by one.
- *row level*: a row lacks a field, has the wrong type, or points at an image that turns out to be bad. The
  rest of the file is fine, so the row goes to quarantine with a reason naming the field, and the good rows
  are kept.
Every input row ends up in exactly one of `items` or `quarantine` (the prepare stage checks the sum).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inbol_ray.config import DataConfig, DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CATEGORY,
    CHOICES,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    METRIC,
    QUESTION,
    REASON,
    ROW_KEY,
    SOURCE,
    SPLIT,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataFormatError(ValueError):
    """A data file is not in the format its loader reads: the message names the file and the field."""


MAX_LINE_BYTES: int = DataConfig.max_line_bytes
"""Longest JSONL line read when the caller sets no limit: the config's default (`data.max_line_bytes`)."""

CHUNK_ROWS = 50_000
"""Rows a streaming loader hands over at a time: the most a loader holds of a multi-million-row file."""

Sink = Callable[[list[dict[str, Any]]], None]


class Spool(list):
    """A loader's output rows. Without a sink it is a plain list (tests, `load`); with one, every
    `chunk_rows` appended rows are handed to the sink and dropped, so the prepare stage parses a file of
    millions of rows holding one chunk (`load_streaming`)."""

    def __init__(self, sink: Sink | None = None, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        self.sink, self.chunk_rows, self.handed = sink, chunk_rows, 0

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        if self.sink is not None and len(self) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.sink is not None and len(self):
            self.sink(list(self))
            self.handed += len(self)
            self.clear()

    @property
    def total(self) -> int:
        """Rows appended so far, handed over or not."""
        return self.handed + len(self)


@dataclass
class Parsed:
    """A loader's output: item dicts (ITEMS columns) and quarantine dicts (QUARANTINE columns + dataset).

    It also carries `max_line_bytes`, the one reading limit that comes from `data` rather than the spec:
    every loader is called as `(spec, out)`, so the object it writes into is how a run-wide setting reaches
    the line reader without a parameter on every loader.
    """

    items: Spool = field(default_factory=Spool)
    quarantine: Spool = field(default_factory=Spool)
    max_line_bytes: int = MAX_LINE_BYTES

    @property
    def n_input(self) -> int:
        return self.items.total + self.quarantine.total

    @classmethod
    def streaming(
        cls, on_items: Sink, on_bad: Sink, chunk_rows: int = CHUNK_ROWS, max_line_bytes: int = MAX_LINE_BYTES
    ) -> Parsed:
        return cls(Spool(on_items, chunk_rows), Spool(on_bad, chunk_rows), max_line_bytes)

    def flush(self) -> None:
        self.items.flush()
        self.quarantine.flush()


def item_id(spec: DatasetSpec, key: Any) -> str:
    """Ids are prefixed with the data set name so they stay unique when several sets share one table."""
    return f"{spec.name}:{key}"


def make_item(
    spec: DatasetSpec,
    key: Any,
    *,
    source: str,
    question: str,
    answers: Sequence[str],
    metric: str,
    category: str,
    answerable: bool = True,
    choices: Sequence[str] | None = None,
    image: bytes | None = None,
    image_path: str | None = None,
) -> dict[str, Any]:
    return {
        ID: item_id(spec, key),
        DATASET: spec.name,
        SPLIT: spec.split,
        IMAGE: image,
        IMAGE_PATH: image_path,
        QUESTION: question,
        ANSWERS: [str(a) for a in answers],
        CHOICES: None if choices is None else [str(c) for c in choices],
        METRIC: metric,
        ANSWERABLE: answerable,
        CATEGORY: category,
        SOURCE: source,
    }


def make_bad(spec: DatasetSpec, key: Any, source: str, reason: str, dataset: str = "") -> dict[str, Any]:
    """A quarantine row; `dataset` is kept beside the QUARANTINE columns for per-data-set counts."""
    return {SOURCE: source, ROW_KEY: item_id(spec, key), REASON: reason, DATASET: dataset or spec.name}


def add_limit(rows: list[Any], spec: DatasetSpec) -> list[Any]:
    return rows[: spec.limit] if spec.limit > 0 else rows


# --- readers --------------------------------------------------------------------------------------------


def read_json(uri: str) -> Any:
    """Parse a whole JSON file; malformed JSON is a file-level error (no row can be trusted)."""
    try:
        return json.loads(dio.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{uri}: malformed JSON ({exc})") from exc


def iter_lines(uri: str, max_line_bytes: int = MAX_LINE_BYTES, block_bytes: int = 1 << 18) -> Iterator[bytes]:
    """A file's lines (without the newline), read a block at a time: a JSONL of millions of rows is never
    held whole. Lines split on `\\n` only (a JSON string may hold U+2028, which `str.splitlines` would cut).

    Why a limit: a file without newlines (a JSON array saved as .jsonl, a truncated download, a binary file)
    would otherwise be buffered whole before the first row fails. The reader holds at most `max_line_bytes`
    of an unfinished line plus one block, and a longer line stops the file with a `DataFormatError`.
    """
    fs, path = dio.resolve(uri)
    number = 0  # lines handed over so far
    pending: list[bytes] = []  # pieces of a line that runs over block boundaries
    size = 0
    with fs.open_input_stream(path) as stream:
        while block := stream.read(block_bytes):
            lines = block.split(b"\n")
            tail = lines.pop()
            for line in lines:
                number += 1
                if size + len(line) > max_line_bytes:
                    raise line_too_long(uri, number, max_line_bytes)
                if pending:
                    line, pending, size = b"".join([*pending, line]), [], 0
                yield line
            if tail:
                size += len(tail)
                if size > max_line_bytes:
                    raise line_too_long(uri, number + 1, max_line_bytes)
                pending.append(tail)
    if pending:
        yield b"".join(pending)


def line_too_long(uri: str, number: int, limit: int) -> DataFormatError:
    """File level, not a row: past the limit the reader cannot find where the next row starts."""
    return DataFormatError(
        f"{uri}: line {number} is longer than data.max_line_bytes ({limit:,} bytes); a JSONL file holds one "
        f"object per line, so the file is likely not JSONL or is cut off. If its lines really are that "
        f"long, raise data.max_line_bytes"
    )


def read_jsonl(uri: str, spec: DatasetSpec, out: Parsed) -> Iterator[tuple[int, dict[str, Any]]]:
    """Parse a JSONL file line by line, as a stream: a malformed line is quarantined, the others yielded.

    Yields (line number, object) pairs; blank lines are not rows. `limit` counts lines read. A line longer
    than `out.max_line_bytes` stops the file (`iter_lines`).
    """
    seen = 0
    for number, raw in enumerate(iter_lines(uri, out.max_line_bytes), start=1):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not line.strip():
            continue
        if spec.limit and seen >= spec.limit:
            break
        seen += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.quarantine.append(
                make_bad(spec, f"line{number}", uri, f"malformed JSON on line {number} ({exc})")
            )
            continue
        if not isinstance(obj, dict):
            out.quarantine.append(make_bad(spec, f"line{number}", uri, f"line {number} is not a JSON object"))
            continue
        yield number, obj


def expect_key(obj: Any, key: str, uri: str, kind: type = list) -> Any:
    """Top-level structure check (e.g. VQAv2's `questions` list): absent or wrong type is file-level."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{uri}: missing field '{key}' at the top level")
    if not isinstance(obj[key], kind):
        raise DataFormatError(f"{uri}: field '{key}' must be a {kind.__name__}")
    return obj[key]


def expect_type(obj: Any, kind: type, uri: str, what: str) -> Any:
    if not isinstance(obj, kind):
        raise DataFormatError(f"{uri}: top level must be a JSON {what}, got {type(obj).__name__}")
    return obj


def _no_row_has(name: str, required: Sequence[str], uri: str) -> DataFormatError:
    return DataFormatError(f"{uri}: missing field '{name}' (no row has it; expected fields {list(required)})")


def check_fields(rows: Iterable[Mapping[str, Any]], required: Sequence[str], uri: str) -> None:
    """File-level schema check: a required field that *no* row has was renamed or never existed.

    One missing field in some rows is a row problem (quarantine); missing in every row is a format problem.
    """
    rows = list(rows)
    if not rows:
        return
    for name in required:
        if not any(isinstance(r, Mapping) and name in r for r in rows):
            raise _no_row_has(name, required, uri)


class FieldCheck:
    """`check_fields` for rows read as a stream: it cannot look ahead, so it watches every row and judges at
    the end of the file (`done`). The rows spooled meanwhile are thrown away with the failed stage."""

    def __init__(self, required: Sequence[str], uri: str) -> None:
        self.required, self.uri = tuple(required), uri
        self.unseen, self.rows = set(required), 0

    def see(self, row: Mapping[str, Any]) -> None:
        self.rows += 1
        if self.unseen:
            self.unseen.difference_update(row.keys())

    def done(self) -> None:
        if self.rows and self.unseen:
            raise _no_row_has(next(n for n in self.required if n in self.unseen), self.required, self.uri)


def check_columns(names: Sequence[str], required: Sequence[str], uri: str) -> None:
    """Columnar files (TSV, Parquet) have one header, so any missing column is file-level."""
    missing = [name for name in required if name not in names]
    if missing:
        raise DataFormatError(f"{uri}: missing field(s) {missing} (columns present: {list(names)})")


def missing_field(row: Mapping[str, Any], required: Sequence[str]) -> str:
    """Row-level check: the reason for the first required field that is absent, null or empty, else ''."""
    for name in required:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return f"missing field '{name}'"
    return ""


def string_list(value: Any, name: str) -> tuple[list[str], str]:
    """A list of non-empty strings, or a reason naming the field."""
    if not isinstance(value, list) or not value:
        return [], f"field '{name}' must be a non-empty list"
    if not all(isinstance(v, str) for v in value):
        return [], f"field '{name}' must hold strings"
    return list(value), ""


def answer_letter(index: Any, choices: Sequence[str], name: str) -> tuple[str, str]:
    """The option letter of a 0-based answer index, or a reason naming the field."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(choices):
        return "", f"field '{name}' ({index!r}) is not an index into {len(choices)} choices"
    return LETTERS[index], ""


_SEPARATORS = re.compile(r"[/\\]")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[/\\]")


def path_problem(value: str, *, inside_root: bool = True) -> str:
    """What makes a path taken from a data file unsafe to open, or '' when nothing does.

    Why: image paths are built from values in annotation files (`image`, `imageId`, a problem id), and a
    file that says `../../etc/passwd` must not make a worker read outside the images folder. With
    `inside_root` (a part joined under the spec's `images`) absolute paths and URIs are refused too; formats
    whose documented field may be a location of its own (`unanswerable_jsonl`'s `image`, `items`'
    `image_path`) pass `inside_root=False` and keep them. A `..` component or a NUL byte is refused either
    way: no published layout needs one. `\\` counts as a separator, as in a file written on Windows.
    """
    if "\x00" in value:
        return "holds a NUL byte"
    if inside_root and "://" in value:
        return "is a URI, not a path inside the images folder"
    if inside_root and (value.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(value)):
        return "is an absolute path, not a path inside the images folder"
    if ".." in _SEPARATORS.split(value):
        return "has a '..' component (a path may not climb out of its folder)"
    return ""


def path_reason(what: str, value: Any, *, inside_root: bool = True) -> str:
    """A quarantine reason naming the field and its value when `value` is not a safe path, else ''."""
    problem = path_problem(str(value), inside_root=inside_root)
    return f"{what} ({str(value)!r}) {problem}" if problem else ""


def image_location(base: str, *parts: str) -> str:
    """Where a file-per-image format keeps one image (absolute, so Ray workers can open it).

    Loaders quarantine a row whose parts fail `path_problem` before they get here; this check is the
    backstop that keeps a loader that forgot from opening a file outside `base`.
    """
    for part in parts:
        if problem := path_problem(part):
            raise ValueError(f"image path part {part!r} {problem}")
    return dio.join(dio.absolute(base), *parts)
