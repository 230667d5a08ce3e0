"""Loaders of columnar files that carry their images inside: MMMU (Parquet), MMBench (TSV), `items` Parquet."""

from __future__ import annotations

import ast
import base64
import binascii
import io
import re
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import (
    LETTERS,
    DataFormatError,
    Parsed,
    add_limit,
    check_columns,
    make_bad,
    make_item,
    missing_field,
    path_reason,
    string_list,
)
from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CATEGORY,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    ITEMS,
    METRIC,
    METRICS,
    QUESTION,
    REASON,
    ROW_KEY,
    SOURCE,
    SPLIT,
)


def _parquet_files(uri: str, prefix: str = "") -> list[str]:
    """A file as given, or the Parquet files below a folder (optionally only names starting with prefix)."""
    if dio.file_type(uri) == pafs.FileType.File:
        return [uri]
    files = dio.list_files(uri, suffix=".parquet", prefix=prefix)
    if not files:
        raise DataFormatError(f"{uri}: no {prefix}*.parquet files in this folder")
    return files


# --- MMMU -----------------------------------------------------------------------------------------------

MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
_IMAGE_TAG = re.compile(r"<image (\d+)>")


def _mmmu_subject(row_id: str) -> str:
    """`validation_Art_Theory_12` -> `Art_Theory`: MMMU ids carry the subject, the rows do not."""
    parts = row_id.split("_")
    return "_".join(parts[1:-1]) or "mmmu"


def _mmmu_row(spec: DatasetSpec, row: dict[str, Any], source: str) -> tuple[dict[str, Any] | None, str]:
    reason = missing_field(row, ("id", "question", "options", "answer", "question_type"))
    if reason:
        return None, reason
    if row["question_type"] != "multiple-choice":
        return None, f"skipped: question_type '{row['question_type']}' (only multiple-choice is loaded)"
    try:
        options = ast.literal_eval(row["options"])
    except (ValueError, SyntaxError):
        return None, "field 'options' is not a Python list literal"
    choices, reason = string_list(options, "options")
    if reason:
        return None, reason
    refs = sorted(set(_IMAGE_TAG.findall(" ".join([row["question"], *choices]))))
    image = None
    if refs or not spec.text_only:  # no reference at all + text_only: a text-only item
        if len(refs) != 1:
            return (
                None,
                f"skipped: {len(refs)} images referenced in question/options (only single-image questions)",
            )
        column = f"image_{refs[0]}"
        image = row.get(column)
        if not isinstance(image, dict) or not image.get("bytes"):
            return None, f"missing field '{column}' (referenced by the question)"
    answer = str(row["answer"]).strip()
    if answer not in LETTERS[: len(choices)]:
        return None, f"field 'answer' ({answer!r}) is not one of the {len(choices)} option letters"
    item = make_item(
        spec,
        row["id"],
        source=source,
        question=row["question"],
        answers=[answer],
        choices=choices,
        metric="mc_letter",
        category=_mmmu_subject(str(row["id"])),
        image=None if image is None else bytes(image["bytes"]),
    )
    return item, ""


def parse_mmmu(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """MMMU Parquet (a file, or a folder: its `validation-*.parquet` files, one per subject).

    Loaded: multiple-choice questions whose question and options reference exactly one image (`<image k>`),
    with that image embedded. Quarantined as `skipped:` open questions and multi-image (or image-less, unless
    the spec keeps them as text-only items: `text_only`) questions; the question text keeps its `<image k>` tag. metric mc_letter; category = subject.
    """
    out = Parsed() if out is None else out
    for uri in _parquet_files(spec.path, prefix="validation"):
        table = dio.read_table(uri)
        check_columns(table.column_names, MMMU_COLUMNS, uri)
        for number, row in enumerate(table.to_pylist()):
            if spec.limit and out.n_input >= spec.limit:
                return out
            item, reason = _mmmu_row(spec, row, uri)
            if item is None:
                out.quarantine.append(make_bad(spec, row.get("id") or f"row{number}", uri, reason))
            else:
                out.items.append(item)
    return out


# --- MMBench --------------------------------------------------------------------------------------------

MMBENCH_COLUMNS = ("index", "question", "answer", "image", "A", "B")


def read_tsv(uri: str) -> pd.DataFrame:
    """All cells as strings, empty for missing (no NaN guessing: an option "None" must stay "None")."""
    try:
        return pd.read_csv(io.BytesIO(dio.read_bytes(uri)), sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{uri}: malformed TSV ({exc})") from exc


def parse_mmbench(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """MMBench TSV (e.g. MMBench_DEV_EN.tsv): options in columns A, B, C, D, base64 image; metric mc_letter.

    choices = the non-empty option columns in letter order; question = "<hint>\\n<question>" when a hint
    is given, the hint bare as LLaVA-1.5's evaluation writes it (llava/eval/model_vqa_mmbench.py:
    `question = hint + '\\n' + question`); category = category. An `image` cell shorter than 64
    characters that names another row's `index` reuses that row's image (how the published TSVs store
    repeated images).
    """
    out = Parsed() if out is None else out
    frame = read_tsv(spec.path)
    check_columns(list(frame.columns), MMBENCH_COLUMNS, spec.path)
    rows = frame.to_dict("records")
    images = {r["index"]: r["image"] for r in rows}
    option_columns = [c for c in LETTERS if c in frame.columns]
    for r in add_limit(rows, spec):
        key = r["index"] or "row?"
        reason = missing_field(r, ("index", "question", "answer", "image"))
        choices: list[str] = []
        for letter in option_columns:
            if not r[letter].strip():
                break
            choices.append(r[letter])
        if not reason and len(choices) < 2:
            reason = "fields 'A' and 'B' must both hold options"
        answer = r["answer"].strip()
        if not reason and answer not in LETTERS[: len(choices)]:
            reason = f"field 'answer' ({answer!r}) is not one of the {len(choices)} option letters"
        data = b""
        if not reason:
            cell = r["image"]
            if len(cell) < 64 and cell in images and cell != r["index"]:
                cell = images[cell]
            try:
                data = base64.b64decode(cell, validate=True)
            except (binascii.Error, ValueError):
                reason = "field 'image' is not valid base64"
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason))
            continue
        hint = r.get("hint", "").strip()
        out.items.append(
            make_item(
                spec,
                key,
                source=spec.path,
                question=f"{hint}\n{r['question']}" if hint else r["question"],
                answers=[answer],
                choices=choices,
                metric="mc_letter",
                category=r.get("category") or "mmbench",
                image=data,
            )
        )
    return out


# --- items Parquet (ShapesWorld exports, or a previous prepare) -----------------------------------------

_ITEMS_REQUIRED = (ID, DATASET, SPLIT, QUESTION, METRIC, CATEGORY, SOURCE)


def _items_row_reason(row: dict[str, Any], text_only: bool) -> str:
    reason = missing_field(row, _ITEMS_REQUIRED)
    if reason:
        return reason
    if not isinstance(row[ANSWERS], list):
        return f"missing field '{ANSWERS}'"
    if row[ANSWERABLE] is None:
        return f"missing field '{ANSWERABLE}'"
    if row[METRIC] not in METRICS:
        return f"field '{METRIC}' ({row[METRIC]!r}) is not one of {list(METRICS)}"
    if row[IMAGE] is None and not row[IMAGE_PATH] and not text_only:
        return f"missing field '{IMAGE}' (and '{IMAGE_PATH}'; set text_only: true for text-only items)"
    if row[IMAGE_PATH]:  # absolute paths and URIs are how a previous prepare stored them: kept
        return path_reason(f"field '{IMAGE_PATH}'", row[IMAGE_PATH], inside_root=False)
    return ""


def parse_items(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """Parquet already in the `items` schema (a file or a folder of shards): rows are kept as they are.

    Their own `dataset`/`split` columns win over the spec (one ShapesWorld file holds several data sets);
    relative `image_path`s are made absolute (against the working directory, as always) so Ray workers can
    open them. An `image_path` is the location itself, not a part under a root, so absolute paths and URIs
    (what a previous prepare writes) are kept; one with a `..` component or a NUL byte is quarantined.
    """
    out = Parsed() if out is None else out
    for uri in _parquet_files(spec.path):
        table = dio.read_table(uri)
        check_columns(table.column_names, ITEMS.names, uri)
        for number, row in enumerate(table.select(ITEMS.names).to_pylist()):
            if spec.limit and out.n_input >= spec.limit:
                return out
            reason = _items_row_reason(row, spec.text_only)
            if reason:
                key = row.get(ID) or f"{spec.name}:row{number}"
                dataset = row.get(DATASET) or spec.name
                out.quarantine.append({SOURCE: uri, ROW_KEY: key, REASON: reason, DATASET: dataset})
                continue
            if row[IMAGE_PATH]:
                row[IMAGE_PATH] = dio.absolute(row[IMAGE_PATH])
            out.items.append(row)
    return out


def items_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Item dicts from any loader as one Arrow table in the ITEMS schema."""
    return pa.Table.from_pylist(rows, schema=ITEMS)
