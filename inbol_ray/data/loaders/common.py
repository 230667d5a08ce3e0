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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inbol_ray.config import DatasetSpec
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


@dataclass
class Parsed:
    """A loader's output: item dicts (ITEMS columns) and quarantine dicts (QUARANTINE columns + dataset)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_input(self) -> int:
        return len(self.items) + len(self.quarantine)


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


def read_jsonl(uri: str, spec: DatasetSpec, out: Parsed) -> list[tuple[int, dict[str, Any]]]:
    """Parse a JSONL file line by line: a malformed line is quarantined, the other lines are kept.

    Returns (line number, object) pairs; blank lines are not rows. `limit` counts lines read.
    """
    text = dio.read_bytes(uri).decode("utf-8", errors="replace")
    rows: list[tuple[int, dict[str, Any]]] = []
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
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
        rows.append((number, obj))
    return rows


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


def check_fields(rows: Iterable[Mapping[str, Any]], required: Sequence[str], uri: str) -> None:
    """File-level schema check: a required field that *no* row has was renamed or never existed.

    One missing field in some rows is a row problem (quarantine); missing in every row is a format problem.
    """
    rows = list(rows)
    if not rows:
        return
    for name in required:
        if not any(isinstance(r, Mapping) and name in r for r in rows):
            raise DataFormatError(
                f"{uri}: missing field '{name}' (no row has it; expected fields {list(required)})"
            )


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


def image_location(base: str, *parts: str) -> str:
    """Where a file-per-image format keeps one image (absolute, so Ray workers can open it)."""
    return dio.join(dio.absolute(base), *parts)
