"""Column names and Arrow schemas of every table passed between stages (DESIGN.md section 3).

This module is the one owner of table layouts: stages import the constants instead of spelling column
names, so a rename is one edit and a typo is an ImportError rather than a silently empty column.
"""

from __future__ import annotations

import pyarrow as pa

# --- shared keys --------------------------------------------------------------------------------
ID = "id"
DATASET = "dataset"
SPLIT = "split"
IMAGE = "image"  # encoded image bytes (PNG/JPEG), nullable when IMAGE_PATH is used
IMAGE_PATH = "image_path"  # path or URI resolved lazily, nullable when IMAGE holds bytes
QUESTION = "question"
ANSWERS = "answers"  # list<str>: gold answers (VQA: the 10 annotator answers, duplicates kept)
CHOICES = "choices"  # list<str> or null: multiple-choice options, in letter order A, B, C, ...
METRIC = "metric"  # one of METRICS
ANSWERABLE = "answerable"
CATEGORY = "category"  # question family, e.g. easy_perception / hard_perception / knowledge
SOURCE = "source"  # file or generator the row came from, for provenance and quarantine

METRICS = ("vqa_soft", "exact", "mc_letter")

# --- samples --------------------------------------------------------------------------------------
RESPONSES = "responses"  # list<str>, K sampled responses
CORRECT = "correct"  # list<bool> in samples; bool in predictions
REFUSED = "refused"  # list<bool> in samples; bool in predictions
CONF = "conf"
BUCKET = "bucket"  # known | mixed | unknown (unanswerable items are "unknown" with conf 0)
BUCKETS = ("known", "mixed", "unknown")

# --- constructed training tables ------------------------------------------------------------------
PROMPT = "prompt"  # rendered user text (model.prompt.render_prompt): what the model saw, minus chat format
TARGET = "target"
TARGET_KIND = "target_kind"  # answer | refusal
TARGET_KINDS = ("answer", "refusal")

RESP_CORRECT = "correct"
RESP_INCORRECT = "incorrect"
RESP_REFUSAL = "refusal"
RESPONSE_KINDS = (RESP_CORRECT, RESP_INCORRECT, RESP_REFUSAL)
REF_LOGP = {kind: f"ref_logp_{kind}" for kind in RESPONSE_KINDS}  # filled by the reference pass

# --- evaluation -----------------------------------------------------------------------------------
MODEL = "model"
METHOD = "method"
RESPONSE = "response"
N = "n"
ACC = "acc"
REFR = "refr"
S_TRUST = "s_trust"

# --- quarantine -------------------------------------------------------------------------------------
ROW_KEY = "row_key"
STAGE = "stage"
REASON = "reason"

_str_list = pa.list_(pa.string())
_bool_list = pa.list_(pa.bool_())

ITEMS = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(DATASET, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_PATH, pa.string()),
        pa.field(QUESTION, pa.string(), nullable=False),
        pa.field(ANSWERS, _str_list, nullable=False),
        pa.field(CHOICES, _str_list),
        pa.field(METRIC, pa.string(), nullable=False),
        pa.field(ANSWERABLE, pa.bool_(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
    ]
)

SAMPLES = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string()),  # null only in tables older than the prompt renderer
        pa.field(RESPONSES, _str_list, nullable=False),
        pa.field(CORRECT, _bool_list, nullable=False),
        pa.field(REFUSED, _bool_list, nullable=False),
        pa.field(CONF, pa.float64(), nullable=False),
    ]
)
"""No bucket column: buckets follow from conf under construct's thresholds and are computed there."""

# IDK-IT and the SFT baseline share one layout.
SFT = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_PATH, pa.string()),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(TARGET, pa.string(), nullable=False),
        pa.field(TARGET_KIND, pa.string(), nullable=False),
    ]
)

CADPO_PAIRS = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_PATH, pa.string()),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(RESP_CORRECT, pa.string()),  # null for unknown / unanswerable rows
        pa.field(RESP_INCORRECT, pa.string()),  # null for known rows
        pa.field(RESP_REFUSAL, pa.string()),
        pa.field(CONF, pa.float64(), nullable=False),
        pa.field(BUCKET, pa.string(), nullable=False),
    ]
)

CADPO_PAIRS_WITH_REF = (
    CADPO_PAIRS.append(pa.field(REF_LOGP[RESP_CORRECT], pa.float64()))
    .append(pa.field(REF_LOGP[RESP_INCORRECT], pa.float64()))
    .append(pa.field(REF_LOGP[RESP_REFUSAL], pa.float64()))
)

PREDICTIONS = pa.schema(
    [
        pa.field(MODEL, pa.string(), nullable=False),
        pa.field(DATASET, pa.string(), nullable=False),
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string()),
        pa.field(RESPONSE, pa.string(), nullable=False),
        pa.field(CORRECT, pa.bool_(), nullable=False),
        pa.field(REFUSED, pa.bool_(), nullable=False),
    ]
)

METRICS_TABLE = pa.schema(
    [
        pa.field(METHOD, pa.string(), nullable=False),
        pa.field(DATASET, pa.string(), nullable=False),
        pa.field(N, pa.int64(), nullable=False),
        pa.field(ACC, pa.float64(), nullable=False),
        pa.field(REFR, pa.float64(), nullable=False),
        pa.field(S_TRUST, pa.float64(), nullable=False),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(ROW_KEY, pa.string(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
    ]
)


def check_columns(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """Fail with one line naming the table and the missing columns, before any row is touched."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; expected {schema.names}")


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Select and cast a table to a schema, so every stage writes exactly the contracted layout."""
    check_columns(table, schema, where)
    return table.select(schema.names).cast(schema)
