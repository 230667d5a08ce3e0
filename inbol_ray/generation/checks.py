"""The read side of the generation stage, as a Ray Data UDF: read units -> validated rows with their prompt.

A pure function of a pyarrow batch (no Ray here), so the rules it applies are the prepare stage's
(`data.images.check_images`) and the renderer's (`model.prompt.render_prompt`), testable without a cluster.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import PromptConfig
from inbol_ray.data.images import check_images
from inbol_ray.generation.actor import JOB
from inbol_ray.generation.shards import SHARD, Selection, read_unit, shard_of
from inbol_ray.model.prompt import render_prompt
from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CHOICES,
    DATASET,
    ID,
    IMAGE,
    ITEMS,
    METRIC,
    PROMPT,
    QUESTION,
    REASON,
    SOURCE,
)

_CARRIED = [ID, DATASET, SOURCE, QUESTION, IMAGE, ANSWERS, CHOICES, METRIC, ANSWERABLE]
"""Item columns the rows carry to the actors and graders (plus the rendered `prompt`)."""


def check_units(units: pa.Table, pending: list[list[int]], refusal: list[bool], **kwargs: Any) -> pa.Table:
    """Read units -> selected rows of the unit's job's unfinished shards, validated and rendered, with
    `prompt`, `shard`, `reason` and `job` columns (`pending[j]`: job j's unfinished shards; `refusal[j]`:
    job j renders with the refusal clause)."""
    tables = []
    for unit in units.to_pylist():
        job = unit[JOB]
        rows = check_rows(read_unit(unit), pending=pending[job], refusal=refusal[job], **kwargs)
        tables.append(rows.append_column(JOB, pa.array([job] * rows.num_rows, type=pa.int32())))
    return pa.concat_tables(tables)


def check_rows(
    batch: pa.Table,
    selection: Selection,
    n_shards: int,
    pending: list[int],
    max_bytes: int,
    max_pixels: int,
    prompt: PromptConfig | None = None,
    refusal: bool = False,
) -> pa.Table:
    """Keep selected rows of unfinished shards; validate image and question; add the rendered `prompt`
    (the one renderer, `render_prompt`), `shard` and `reason`."""
    batch = batch.filter(selection.mask(batch))
    shards = pa.array([shard_of(i, n_shards) for i in batch[ID].to_pylist()], type=pa.int32())
    keep = pc.is_in(shards, value_set=pa.array(pending, type=pa.int32()))
    batch, shards = batch.filter(keep), shards.filter(keep)
    checked = check_images(batch.select(ITEMS.names).cast(ITEMS), "bytes", max_bytes, max_pixels)
    reasons = checked[REASON].to_pylist()
    prompts: list[str] = []
    for i, (question, choices) in enumerate(
        zip(checked[QUESTION].to_pylist(), checked[CHOICES].to_pylist(), strict=True)
    ):
        if reasons[i] is None and not (question or "").strip():
            reasons[i] = f"field '{QUESTION}': empty question"
        prompts.append(render_prompt(question or "", choices, prompt, refusal=refusal))
    out = checked.select(_CARRIED).append_column(PROMPT, pa.array(prompts, type=pa.string()))
    out = out.append_column(SHARD, shards)
    return out.append_column(REASON, pa.array(reasons, type=pa.string()))
