"""Training tables → token ids once per worker → packed batches per step.

Why encode once: tokenising is the only per-row work that does not change between steps, and at the embedded
default (2000 short rows) doing it up front costs milliseconds while keeping every step's work to image
decoding plus the forward. Images stay encoded (bytes or a path) until their batch is built, so a worker's
memory is the table plus token ids, not a pixel tensor per row.

A row becomes one item with K response slots: SFT-style methods have one slot (the target), DPO methods
three (correct, incorrect, refusal; absent ones are None and cost nothing, see shared_prefix.py).
Prompt and response ids are made exactly as `inbol_ray.model.batching.encode_prompt_response` makes them
(prompt with BOS and expanded image tokens; the response's tokens as they follow that prompt, then EOS:
`batching.encode_responses`), so the log-probs here equal those of the evaluation and reference paths and
score the tokens the sampler emitted after the same prompt ids (checked in the tests, for the tiny
byte-level BPE and a Llama SentencePiece tokenizer: tests/unit/test_tokenizer_seam.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from inbol_ray import schema as S
from inbol_ray.data.images import load_image_bytes
from inbol_ray.model.batching import encode_prompts, encode_responses, pixel_values
from inbol_ray.train.losses import bucket_codes
from inbol_ray.train.shared_prefix import PackedBatch, pack_responses

SFT_KINDS = (S.TARGET,)
DPO_KINDS = S.RESPONSE_KINDS
TARGET_KIND_CODES = {kind: i for i, kind in enumerate(S.TARGET_KINDS)}


@dataclass
class EncodedTable:
    """One training table as token ids plus the per-row values the losses need."""

    ids: list[str]
    images: list[bytes | None]
    image_paths: list[str | None]
    prefixes: list[list[int]]
    responses: list[list[list[int] | None]]
    """[row][slot] token ids (response + EOS), None where the row has no such response."""
    kinds: tuple[str, ...]
    groups: Tensor
    """[n] int64 row group for per-group metrics: bucket code (DPO) or target-kind code (SFT)."""
    conf: Tensor | None
    """[n] float64 confidence (DPO tables only)."""
    ref_logps: Tensor | None
    """[n, K] float64 reference log-probs, NaN where absent (DPO tables with ref columns only)."""

    def __len__(self) -> int:
        return len(self.ids)

    def response_tokens(self, rows: Sequence[int]) -> int:
        """Response tokens in `rows` (the SFT loss normaliser for a whole accumulated step)."""
        return sum(len(r) for i in rows for r in self.responses[i] if r is not None)


def _response_ids(
    tokenizer, texts: Sequence[str | None], prompts: Sequence[str] | None = None, system: str = ""
) -> list[list[int] | None]:
    """Response ids + EOS as they follow `prompts[i]` (None: any generation prompt), None where absent."""
    return encode_responses(tokenizer, texts, prompts, system=system)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    """float64 array with NaN for nulls (pyarrow's to_numpy refuses nulls without this)."""
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def encode_table(
    table: pa.Table, processor, kinds: tuple[str, ...], need_ref: bool = False, system: str = ""
) -> EncodedTable:
    """Tokenise every row of an SFT table (kinds=SFT_KINDS) or a CA-DPO pairs table (kinds=DPO_KINDS), in
    the conversation opened by `system` (`prompt.system`) as sampling and evaluation show it."""
    if kinds == SFT_KINDS:
        S.check_columns(table, S.SFT, "training table (idk_it / sft_baseline)")
    else:
        S.check_columns(table, S.CADPO_PAIRS_WITH_REF if need_ref else S.CADPO_PAIRS, "cadpo_pairs table")
    tok = processor.tokenizer
    n = table.num_rows
    prompts = table.column(S.PROMPT).to_pylist()
    prefixes = [list(p) for p in encode_prompts(processor, prompts, system=system)]
    per_kind = [_response_ids(tok, table.column(kind).to_pylist(), prompts, system) for kind in kinds]
    responses = [[per_kind[k][i] for k in range(len(kinds))] for i in range(n)]
    if kinds == SFT_KINDS:
        groups = torch.tensor([TARGET_KIND_CODES[str(k)] for k in table.column(S.TARGET_KIND).to_pylist()])
        conf = ref = None
    else:
        groups = bucket_codes(table.column(S.BUCKET).to_pylist())
        conf = torch.from_numpy(_float_column(table, S.CONF))
        ref = None
        if need_ref:
            ref = torch.from_numpy(np.stack([_float_column(table, S.REF_LOGP[k]) for k in kinds], axis=1))
    return EncodedTable(
        ids=[str(i) for i in table.column(S.ID).to_pylist()],
        images=table.column(S.IMAGE).to_pylist(),
        image_paths=table.column(S.IMAGE_PATH).to_pylist(),
        prefixes=prefixes,
        responses=responses,
        kinds=kinds,
        groups=groups.reshape(n).long(),
        conf=conf,
        ref_logps=ref,
    )


@dataclass
class RowValues:
    """Per-row tensors of one micro-batch that the losses read next to the packed batch."""

    groups: Tensor
    conf: Tensor | None
    ref_logps: Tensor | None


def make_batch(
    enc: EncodedTable, rows: Sequence[int], processor, image_aspect: str = "crop"
) -> tuple[PackedBatch, RowValues]:
    """Pack `rows` of an encoded table: images decoded and preprocessed here, once per item, shaped by
    `image_aspect` (`model.image_aspect`) as every stage that shows the model an image shapes it."""
    rows = [int(r) for r in rows]
    images = [load_image_bytes({S.IMAGE: enc.images[i], S.IMAGE_PATH: enc.image_paths[i]}) for i in rows]
    packed = pack_responses(
        [enc.prefixes[i] for i in rows],
        [enc.responses[i] for i in rows],
        processor.tokenizer.pad_token_id,
        pixel_values(processor, images, image_aspect),
    )
    index = torch.tensor(rows, dtype=torch.long)
    values = RowValues(
        groups=enc.groups[index],
        conf=None if enc.conf is None else enc.conf[index],
        ref_logps=None if enc.ref_logps is None else enc.ref_logps[index],
    )
    return packed, values


def sort_by_id(table: pa.Table) -> pa.Table:
    """Rows in id order: Ray Data may stream blocks in any order, training order must not depend on it."""
    return table.sort_by(S.ID)
