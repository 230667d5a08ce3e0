"""What a generation stage grades its responses into: `samples` rows (K graded samples, conf) or
`predictions` rows (one greedy answer, correct, refused). Pure functions of a pyarrow batch."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray import schema as S
from inbol_ray.boundary import as_frame, as_list, grade_samples_batch
from inbol_ray.config import GradingConfig
from inbol_ray.generation.actor import JOB
from inbol_ray.generation.shards import SHARD
from inbol_ray.grading import grade, is_refusal_response
from inbol_ray.schema import REASON, SOURCE

SAMPLES, PREDICTIONS = "samples", "predictions"
OUTPUT_SCHEMAS = {SAMPLES: S.SAMPLES, PREDICTIONS: S.PREDICTIONS}


def grade_predictions(batch: pd.DataFrame | pa.Table, method: str, correct_at: float) -> pd.DataFrame:
    """Greedy responses graded against their items: one `predictions` row per item (schema.PREDICTIONS).

    Needs columns id, dataset, responses (one each), answers, choices, metric, answerable; question is
    optional, and so is the rendered prompt (copied into the `prompt` column). Unanswerable items are never
    correct; a refusal is detected with `is_refusal_response`, so picking a multiple-choice option that is
    itself a refusal counts as refusing on unanswerable items (BeyondVisQA) and as an answer on answerable
    ones, and with the question "there are no dogs" answers "how many dogs?" (0) instead of refusing.
    """
    frame = as_frame(batch)
    rows: dict[str, list] = {name: [] for name in S.PREDICTIONS.names}
    for item in frame.to_dict("records"):
        response = str(as_list(item[S.RESPONSES])[0])
        choices = [str(c) for c in as_list(item[S.CHOICES])] or None
        answers = [str(a) for a in as_list(item[S.ANSWERS])]
        answerable = bool(item[S.ANSWERABLE])
        question = item.get(S.QUESTION)
        question = question if isinstance(question, str) and question else None
        rows[S.MODEL].append(method)
        rows[S.DATASET].append(item[S.DATASET])
        rows[S.ID].append(item[S.ID])
        prompt = item.get(S.PROMPT)
        rows[S.PROMPT].append(prompt if isinstance(prompt, str) else None)
        rows[S.RESPONSE].append(response)
        rows[S.CORRECT].append(
            answerable
            and grade(response, answers, item[S.METRIC], choices, correct_at=correct_at, question=question)
        )
        rows[S.REFUSED].append(
            is_refusal_response(response, choices, refusal_option=not answerable, question=question)
        )
    return pd.DataFrame(rows, columns=S.PREDICTIONS.names)


def grade_batch(batch: pa.Table, kind: str, grading, method: str = "") -> pa.Table:
    """The output schema's rows for graded rows of `batch` (all of whose `reason` is null)."""
    if kind == SAMPLES:
        frame = grade_samples_batch(batch, grading)
    elif kind == PREDICTIONS:
        frame = grade_predictions(batch, method, float(grading.vqa_correct_at))
    else:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {sorted(OUTPUT_SCHEMAS)}")
    return pa.Table.from_pandas(frame, schema=OUTPUT_SCHEMAS[kind], preserve_index=False)


def placeholders(bad: pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows in `schema`'s layout for quarantined rows: their own columns where they have them, else empty
    values (the collector writes them to the quarantine, never to the output)."""
    columns = []
    for f in schema:
        if f.name in bad.column_names:
            columns.append(bad[f.name].cast(f.type))
        elif pa.types.is_list(f.type):
            columns.append(pa.array([[]] * bad.num_rows, type=f.type))
        else:
            default = {pa.string(): "", pa.bool_(): False, pa.float64(): 0.0, pa.int64(): 0}[f.type]
            columns.append(pa.array([default] * bad.num_rows, type=f.type))
    return pa.table(columns, schema=schema)


def grade_rows(batch: pa.Table, output: str, grading: GradingConfig, methods: list[str]) -> pa.Table:
    """Output columns + shard, source, reason, job; good rows graded (as `methods[job]`), bad rows with
    placeholder values."""
    schema = OUTPUT_SCHEMAS[output]
    extra = [SHARD, SOURCE, REASON, JOB]
    both = []
    for job in sorted(set(batch[JOB].to_pylist())):
        rows = batch.filter(pc.equal(batch[JOB], job))
        good = rows.filter(pc.is_null(rows[REASON]))
        bad = rows.filter(pc.is_valid(rows[REASON]))
        graded = grade_batch(good, output, grading, methods[job]) if good.num_rows else schema.empty_table()
        for part, source in ((graded, good), (placeholders(bad, schema), bad)):
            for name in extra:
                part = part.append_column(name, source[name])
            both.append(part)
    return pa.concat_tables(both)
