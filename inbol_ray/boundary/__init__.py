"""Where an item sits relative to the model's information boundary: confidence from K samples, and buckets.

conf = #correct / K (DESIGN.md 1): the fraction of the model's own samples that get the item right, a
refusal never counting as right. Unanswerable items (outside the extrinsic boundary) have conf 0 by
definition, whatever the samples say, because no answer to them can be right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import pandas as pd
import pyarrow as pa

from inbol_ray import schema
from inbol_ray.grading import grade, is_refusal_response

KNOWN, MIXED, UNKNOWN = schema.BUCKETS


class Thresholds(Protocol):
    """What bucket_of needs from a config (ConstructConfig has both)."""

    tau_known: float
    tau_unknown: float


def confidence(correct: Sequence[bool], refused: Sequence[bool], answerable: bool) -> float:
    """Fraction of samples that are correct and not refusals; 0 for unanswerable items."""
    if len(correct) != len(refused):
        raise ValueError(f"correct ({len(correct)}) and refused ({len(refused)}) differ in length")
    if not answerable:
        return 0.0
    if len(correct) == 0:
        raise ValueError("confidence needs at least one sample (K >= 1)")
    return sum(bool(c) and not bool(r) for c, r in zip(correct, refused, strict=True)) / len(correct)


def bucket_of(conf: float, cfg: Thresholds) -> str:
    """known (conf >= tau_known), unknown (conf <= tau_unknown), otherwise mixed.

    ConstructConfig guarantees tau_unknown < tau_known, so the three ranges never overlap.
    """
    if math.isnan(conf) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf}")
    if conf >= cfg.tau_known:
        return KNOWN
    if conf <= cfg.tau_unknown:
        return UNKNOWN
    return MIXED


def as_list(value: Any) -> list:
    """List cells arrive as Python lists, numpy arrays (Arrow -> pandas) or None; treat them alike."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    return list(value)


def as_frame(batch: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Ray Data may hand a batch as Arrow or pandas; the maths here works on pandas rows."""
    return batch.to_pandas() if isinstance(batch, pa.Table) else batch


def grade_samples_batch(batch: pd.DataFrame | pa.Table, grading_cfg: Any) -> pd.DataFrame:
    """Grade the K responses of each item and derive conf: one `samples` row per item.

    Needs columns id, responses, answers, choices, metric, answerable, and uses question when the batch has
    it (the generation stage carries it, with the rendered `prompt` that is copied through), so that the refusal detector reads "there are no dogs" as the
    answer 0 to "how many dogs?"; returns exactly schema.SAMPLES' columns, with list columns as object
    columns of Python lists (what Ray Data's map_batches expects).
    Unanswerable items get correct all False and conf 0; refusals are still detected there because CA-DPO
    needs to know which samples were hallucinated answers. No bucket: buckets depend on construct's
    thresholds and are computed there (`bucket_of`), so changing a threshold never invalidates samples.
    """
    frame = as_frame(batch)
    correct_at = float(grading_cfg.vqa_correct_at)
    out: dict[str, list] = {name: [] for name in schema.SAMPLES.names}
    questions = frame[schema.QUESTION] if schema.QUESTION in frame.columns else [None] * len(frame)
    prompts = frame[schema.PROMPT] if schema.PROMPT in frame.columns else [None] * len(frame)
    rows = zip(
        frame[schema.ID],
        frame[schema.RESPONSES],
        frame[schema.ANSWERS],
        frame[schema.CHOICES],
        frame[schema.METRIC],
        frame[schema.ANSWERABLE],
        questions,
        prompts,
        strict=True,
    )
    for item_id, responses, answers, choices, metric, answerable, question, prompt in rows:
        responses_l = [str(r) for r in as_list(responses)]
        answers_l = [str(a) for a in as_list(answers)]
        choices_l = [str(c) for c in as_list(choices)] or None
        q = question if isinstance(question, str) and question else None
        refused = [
            is_refusal_response(r, choices_l, refusal_option=not answerable, question=q) for r in responses_l
        ]
        if answerable:
            correct = [
                grade(r, answers_l, metric, choices_l, correct_at=correct_at, question=q) for r in responses_l
            ]
        else:
            correct = [False] * len(responses_l)
        conf = confidence(correct, refused, bool(answerable))
        out[schema.ID].append(str(item_id))
        out[schema.PROMPT].append(prompt if isinstance(prompt, str) else None)
        out[schema.RESPONSES].append(responses_l)
        out[schema.CORRECT].append(correct)
        out[schema.REFUSED].append(refused)
        out[schema.CONF].append(conf)
    return pd.DataFrame(out, columns=schema.SAMPLES.names)
