"""Training tables from graded samples: IDK-IT and SFT-baseline targets, CA-DPO response triples.

Input is one batch of `items` joined with `samples` on id (pandas or Arrow, so Ray Data can map it);
output is a `Built`: the table with exactly the contracted columns, a quarantine table, and counts. No row
is ever lost silently: every input row is either in the table or in quarantine with a reason, every
fallback is counted, and `counts["input"] == counts["output"] + counts["quarantined"]` holds by
construction (checked in Built.__post_init__).

Response choices (DESIGN.md 1.2):
- correct: the most common gold answer; fallback (counted): the most frequent correct sample.
- incorrect: the most frequent wrong, non-refusal sample (counted by normalised text, original spelling
  kept); for unanswerable items the most frequent non-refusal sample, i.e. the model's hallucination.
  Fallback (counted) for multiple choice only: a wrong, non-refusal option picked by a stable hash of
  (seed, id); otherwise the row is quarantined with "no incorrect response".
- multiple choice (the item has options): every vote is on the option a text picks (`choice_index`: a
  letter, "(B)", the option's text), never on normalised text, and the response is that option's letter.
  Normalised text lost the letter "A" to the VQA article rule, so every gold-"A" item had no answer.
- refusal: a REFUSAL_TEMPLATES entry (config construct.refusal_template; -1 rotates by item id).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from inbol_ray import schema
from inbol_ray.boundary import KNOWN, MIXED, UNKNOWN, as_frame, as_list, bucket_of
from inbol_ray.grading import answer_key, choice_index, is_refusal
from inbol_ray.refusal import refusal_target

Row = Mapping[str, Any]
PromptFn = Callable[[Row], str]

NO_ANSWER = "no gold answer and no correct sample"
NO_INCORRECT = "no incorrect response"
SAME_RESPONSE = "correct and incorrect responses are the same answer"

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Built:
    """One constructed table, what was set aside, and how every input row was accounted for."""

    table: pd.DataFrame
    quarantine: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.counts.get("input", 0) != len(self.table) + len(self.quarantine):
            raise AssertionError(
                f"row accounting broken: {self.counts}, {len(self.table)}+{len(self.quarantine)}"
            )


def merge_built(parts: Sequence[Built]) -> Built:
    """Combine per-batch results (e.g. from Ray Data batches) into one table, quarantine and tally."""
    if not parts:
        raise ValueError("merge_built needs at least one part (its columns come from the parts)")
    counts: Counter[str] = Counter()
    for part in parts:
        counts.update(part.counts)
    return Built(
        table=pd.concat([p.table for p in parts], ignore_index=True),
        quarantine=pd.concat([p.quarantine for p in parts], ignore_index=True),
        counts=dict(counts),
    )


# --- choosing responses ---------------------------------------------------------------------------


def most_frequent(texts: Sequence[str]) -> str | None:
    """The most frequent answer by normalised form (ties: first seen), in its most frequent spelling.

    Counting normalised forms makes "Red", "red." and "the red" one answer, which is what the grader
    sees; keeping an original spelling keeps the training target something the model actually wrote.
    """
    groups: dict[str, Counter[str]] = {}
    for text in texts:
        key = answer_key(text)
        if key:
            groups.setdefault(key, Counter())[text.strip()] += 1
    if not groups:
        return None
    best = max(groups.values(), key=lambda spellings: sum(spellings.values()))  # max keeps the first on ties
    return best.most_common(1)[0][0]


def most_frequent_option(texts: Sequence[str], choices: Sequence[str]) -> int | None:
    """The option most texts pick (ties: first seen); texts that pick no option do not vote."""
    votes: Counter[int] = Counter()
    for text in texts:
        index = choice_index(text, choices)
        if index is not None:
            votes[index] += 1
    return votes.most_common(1)[0][0] if votes else None  # most_common keeps first-seen order on ties


def _choices(row: Row) -> list[str]:
    return [str(c) for c in as_list(row.get(schema.CHOICES))]


def _stable_pick(seed: int, item_id: str, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def _wrong_option(row: Row, seed: int) -> str | None:
    """A wrong, non-refusal option letter: the documented multiple-choice fallback for `incorrect`."""
    choices = _choices(row)
    if not choices:
        return None
    gold = (
        {choice_index(str(a), choices) for a in as_list(row.get(schema.ANSWERS))}
        if row[schema.ANSWERABLE]
        else set()
    )
    wrong = [i for i, option in enumerate(choices) if i not in gold and not is_refusal(option)]
    if not wrong:
        return None
    return _LETTERS[wrong[_stable_pick(seed, str(row[schema.ID]), len(wrong))]]


def _correct_response(row: Row, counts: Counter[str]) -> str | None:
    choices = _choices(row)
    answers = [str(a) for a in as_list(row.get(schema.ANSWERS))]
    if choices:
        index = most_frequent_option(answers, choices)
        if index is not None:
            return _LETTERS[index]
    else:
        gold = most_frequent(answers)
        if gold is not None:
            return gold
    responses, correct = as_list(row.get(schema.RESPONSES)), as_list(row.get(schema.CORRECT))
    right = [str(r) for r, c in zip(responses, correct, strict=False) if c]
    if choices:
        index = most_frequent_option(right, choices)
        sample = None if index is None else _LETTERS[index]
    else:
        sample = most_frequent(right)
    if sample is not None:
        counts["fallback_correct_from_sample"] += 1
    return sample


def _incorrect_response(row: Row, seed: int, counts: Counter[str]) -> str | None:
    responses = [str(r) for r in as_list(row.get(schema.RESPONSES))]
    refused = as_list(row.get(schema.REFUSED)) or [False] * len(responses)
    correct = as_list(row.get(schema.CORRECT)) or [False] * len(responses)
    answerable = bool(row[schema.ANSWERABLE])
    wrong = [
        r for r, ref, c in zip(responses, refused, correct, strict=True) if not ref and not (answerable and c)
    ]
    choices = _choices(row)
    if choices:
        index = most_frequent_option(wrong, choices)
        sample = None if index is None else _LETTERS[index]
    else:
        sample = most_frequent(wrong)
    if sample is not None:
        return sample
    option = _wrong_option(row, seed)
    if option is not None:
        counts["fallback_incorrect_from_wrong_option"] += 1
    return option


def _row_bucket(row: Row, cfg: Any, counts: Counter[str]) -> tuple[float, str]:
    """conf and its bucket under *this* config's thresholds (samples store conf only, DESIGN.md 3)."""
    if not row[schema.ANSWERABLE]:
        counts["unanswerable"] += 1
        return 0.0, UNKNOWN
    conf = float(row[schema.CONF])
    return conf, bucket_of(conf, cfg)


# --- builders -------------------------------------------------------------------------------------


def _prompt(row: Row) -> str:
    """The prompt the samples were drawn with: training shows the model byte-for-byte the same text."""
    prompt = row.get(schema.PROMPT)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(
            f"construct: row {row.get(schema.ID)!r} has no '{schema.PROMPT}' (samples from before the prompt "
            "renderer: rerun the sample stage)"
        )
    return prompt


class _Collector:
    """Accumulates output rows, quarantine rows and counts for one builder call."""

    def __init__(self, stage: str, names: Sequence[str]) -> None:
        self.stage, self.names = stage, list(names)
        self.rows: list[dict[str, Any]] = []
        self.quarantined: list[dict[str, str]] = []
        self.counts: Counter[str] = Counter()

    def keep(self, row: Row, prompt_fn: PromptFn, **values: Any) -> None:
        self.rows.append(
            {
                schema.ID: str(row[schema.ID]),
                schema.IMAGE: row.get(schema.IMAGE),
                schema.IMAGE_PATH: row.get(schema.IMAGE_PATH),
                schema.PROMPT: prompt_fn(row),
                **values,
            }
        )

    def drop(self, row: Row, reason: str) -> None:
        source = row.get(schema.SOURCE) or row.get(schema.DATASET) or ""
        self.quarantined.append(
            {
                schema.SOURCE: str(source),
                schema.ROW_KEY: str(row[schema.ID]),
                schema.STAGE: self.stage,
                schema.REASON: reason,
            }
        )
        self.counts[f"quarantine: {reason}"] += 1

    def built(self, n_input: int) -> Built:
        self.counts.update(input=n_input, output=len(self.rows), quarantined=len(self.quarantined))
        return Built(
            table=pd.DataFrame(self.rows, columns=self.names),
            quarantine=pd.DataFrame(self.quarantined, columns=schema.QUARANTINE.names),
            counts=dict(self.counts),
        )


def _build_sft(frame: pd.DataFrame, cfg: Any, stage: str, intrinsic: bool, prompt_fn: PromptFn) -> Built:
    """Shared by IDK-IT (intrinsic=True: also refuse below tau_idk) and the SFT baseline (extrinsic only)."""
    out = _Collector(stage, schema.SFT.names)
    for row in frame.to_dict("records"):
        answerable = bool(row[schema.ANSWERABLE])
        if not answerable or (intrinsic and float(row[schema.CONF]) < cfg.tau_idk):
            target, kind = refusal_target(str(row[schema.ID]), cfg.refusal_template), "refusal"
        else:
            answer = _correct_response(row, out.counts)
            if answer is None:
                out.drop(row, NO_ANSWER)
                continue
            target, kind = answer, "answer"
        out.counts[f"target_{kind}"] += 1
        out.keep(row, prompt_fn, **{schema.TARGET: target, schema.TARGET_KIND: kind})
    return out.built(len(frame))


def build_idk_it(rows: pd.DataFrame | pa.Table, cfg: Any, *, prompt_fn: PromptFn = _prompt) -> Built:
    """IDK-IT: refuse when the item is unanswerable or conf < tau_idk, else answer with the gold answer."""
    return _build_sft(as_frame(rows), cfg, "construct/idk_it", True, prompt_fn)


def build_sft_baseline(rows: pd.DataFrame | pa.Table, cfg: Any, *, prompt_fn: PromptFn = _prompt) -> Built:
    """SFT baseline: refusals only for unanswerable items (the extrinsic boundary), gold answers otherwise."""
    return _build_sft(as_frame(rows), cfg, "construct/sft_baseline", False, prompt_fn)


def build_cadpo_pairs(rows: pd.DataFrame | pa.Table, cfg: Any, *, prompt_fn: PromptFn = _prompt) -> Built:
    """CA-DPO triples: known rows carry correct + refusal, mixed all three, unknown incorrect + refusal."""
    frame = as_frame(rows)
    out = _Collector("construct/cadpo_pairs", schema.CADPO_PAIRS.names)
    for row in frame.to_dict("records"):
        conf, bucket = _row_bucket(row, cfg, out.counts)
        correct = incorrect = None
        if bucket in (KNOWN, MIXED):
            correct = _correct_response(row, out.counts)
            if correct is None:
                out.drop(row, NO_ANSWER)
                continue
        if bucket in (MIXED, UNKNOWN):
            incorrect = _incorrect_response(row, cfg.seed, out.counts)
            if incorrect is None:
                out.drop(row, NO_INCORRECT)
                continue
        if correct is not None and incorrect is not None and answer_key(correct) == answer_key(incorrect):
            out.drop(row, SAME_RESPONSE)
            continue
        out.counts[f"bucket_{bucket}"] += 1
        out.keep(
            row,
            prompt_fn,
            **{
                schema.RESP_CORRECT: correct,
                schema.RESP_INCORRECT: incorrect,
                schema.RESP_REFUSAL: refusal_target(str(row[schema.ID]), cfg.refusal_template),
                schema.CONF: conf,
                schema.BUCKET: bucket,
            },
        )
    return out.built(len(frame))
