"""Several responses after one shared image+prompt prefix, scored in one forward pass.

Why: an item's correct, incorrect and refusal responses share the same image and prompt. For LLaVA-1.5 the
prefix is ~600 tokens (576 of them image tokens) and a response is 1–5 tokens, so scoring each response as
its own sequence (what TRL's DPO does: chosen and rejected as two full rows) runs the vision tower and the
prefix through the LM once per response. Here each item is one packed row

    [ prefix (P tokens) | response 1 (R1) | response 2 (R2) | ... | padding ]

with a block attention mask: prefix tokens attend causally to the prefix; a response token attends to the
whole prefix and causally to its own response, never to the other responses; padding attends to itself
only (a query row with no key would make softmax NaN, and 0·NaN poisons the weight gradients). Position ids
restart at P for every response, so each response sees exactly the positions it would see in its own
sequence. The result is equal (up to float rounding) to separate forwards, gradients included, with one
vision pass and one prefix pass per item (tests/unit/test_shared_prefix.py).

Predicting rows (shift by one, as every causal LM loss): the first token of every response is predicted by
the last prefix position P−1, token j > 0 of a response by the position of token j−1 of the same response.
Only those rows go through the lm_head, via the fused op (`fused_response_logprobs`), so no [B, T, V]
logits exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from inbol_ray.train.logprob import DEFAULT_CHUNK_SIZE, fused_response_logprobs, segment_sum
from inbol_ray.train.response_logprobs import backbone_hidden, causal_lm

PAD_SEGMENT = -1
PREFIX_SEGMENT = 0


@dataclass
class PackedBatch:
    """B items, each with up to K responses packed after its prefix. Tensors live on one device."""

    input_ids: Tensor
    """[B, T] token ids (pad id in padding)."""
    position_ids: Tensor
    """[B, T] prefix 0..P−1, every response P..P+R−1, padding 0."""
    segments: Tensor
    """[B, T] int: 0 prefix, k+1 response k, −1 padding. The attention mask is built from this."""
    pixel_values: Tensor | None
    """[B, 3, H, W] one image per item (the prefix's image tokens)."""
    pred_rows: Tensor
    """[N] batch row of each response token."""
    pred_cols: Tensor
    """[N] position whose hidden state predicts that token."""
    targets: Tensor
    """[N] the response token ids."""
    slots: Tensor
    """[N] response slot of each token: row * K + k."""
    present: Tensor
    """[B, K] bool: item b has response k (absent ones, e.g. `incorrect` of a known row, are skipped)."""

    @property
    def num_responses(self) -> int:
        return self.present.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: the work the LM does, for tokens/s."""
        return int((self.segments != PAD_SEGMENT).sum())

    def to(self, device: torch.device | str, pixel_dtype: torch.dtype | None = None) -> PackedBatch:
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device=device, dtype=pixel_dtype or pv.dtype)
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            segments=self.segments.to(device),
            pixel_values=pv,
            pred_rows=self.pred_rows.to(device),
            pred_cols=self.pred_cols.to(device),
            targets=self.targets.to(device),
            slots=self.slots.to(device),
            present=self.present.to(device),
        )


def pack_responses(
    prefixes: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int] | None]],
    pad_id: int,
    pixel_values: Tensor | None = None,
) -> PackedBatch:
    """Pack `responses[b]` (K token lists, None = absent) after `prefixes[b]`, right-padded to one width.

    Responses must be non-empty (they carry at least the EOS token) and prefixes too (the first response
    token needs a predicting position).
    """
    if len(prefixes) != len(responses) or not prefixes:
        raise ValueError(
            f"need matching non-empty batches, got {len(prefixes)} prefixes, {len(responses)} rows"
        )
    k = len(responses[0])
    if any(len(r) != k for r in responses):
        raise ValueError("every item needs the same number of response slots (use None for absent ones)")
    rows_ids: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_seg: list[list[int]] = []
    pred_rows: list[int] = []
    pred_cols: list[int] = []
    targets: list[int] = []
    slots: list[int] = []
    present = torch.zeros(len(prefixes), k, dtype=torch.bool)
    for b, (prefix, resps) in enumerate(zip(prefixes, responses, strict=True)):
        p = len(prefix)
        if p == 0:
            raise ValueError(f"item {b}: empty prefix")
        ids, pos, seg = list(prefix), list(range(p)), [PREFIX_SEGMENT] * p
        for j, resp in enumerate(resps):
            if resp is None:
                continue
            if len(resp) == 0:
                raise ValueError(f"item {b} response {j}: empty (it should at least hold EOS)")
            start = len(ids)
            present[b, j] = True
            ids.extend(resp)
            pos.extend(range(p, p + len(resp)))
            seg.extend([j + 1] * len(resp))
            pred_rows.extend([b] * len(resp))
            pred_cols.extend([p - 1] + list(range(start, start + len(resp) - 1)))
            targets.extend(resp)
            slots.extend([b * k + j] * len(resp))
        rows_ids.append(ids)
        rows_pos.append(pos)
        rows_seg.append(seg)
    width = max(len(r) for r in rows_ids)
    input_ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows_ids), width), dtype=torch.long)
    segments = torch.full((len(rows_ids), width), PAD_SEGMENT, dtype=torch.long)
    for b, (ids, pos, seg) in enumerate(zip(rows_ids, rows_pos, rows_seg, strict=True)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        position_ids[b, : len(pos)] = torch.tensor(pos)
        segments[b, : len(seg)] = torch.tensor(seg)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segments=segments,
        pixel_values=pixel_values,
        pred_rows=torch.tensor(pred_rows, dtype=torch.long),
        pred_cols=torch.tensor(pred_cols, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        slots=torch.tensor(slots, dtype=torch.long),
        present=present,
    )


def block_attention_mask(segments: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """[B, 1, T, T] mask from segment ids: bool (True = attend) for sdpa, additive float for eager.

    query i may see key j iff j <= i and (j is prefix or j is in i's own response); padding sees itself.
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"the shared-prefix forward needs an arbitrary attention mask: load the model with "
            f"attn_implementation='sdpa' or 'eager', not {attn_implementation!r}"
        )
    t = segments.shape[1]
    q = segments[:, :, None]
    kv = segments[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((kv == PREFIX_SEGMENT) | (kv == q)) & (q != PAD_SEGMENT)
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(
        allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=segments.device)
    )


def shared_prefix_token_logprobs(
    model: nn.Module, batch: PackedBatch, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """[N] log π(token | image, prompt, earlier tokens of the same response), in `batch.targets` order.

    `model` is a LlavaForConditionalGeneration, optionally wrapped by peft (adapters active).
    """
    lm = causal_lm(model)
    lm_head = lm.get_output_embeddings()
    mask = block_attention_mask(batch.segments, lm.config._attn_implementation, lm_head.weight.dtype)
    hidden = backbone_hidden(
        model, batch.input_ids, mask, batch.pixel_values, position_ids=batch.position_ids
    )
    h = hidden[batch.pred_rows, batch.pred_cols]
    return fused_response_logprobs(
        h.to(lm_head.weight.dtype), lm_head.weight, batch.targets, chunk_size, bias=lm_head.bias
    )


def per_response(token_logps: Tensor, batch: PackedBatch) -> Tensor:
    """[B, K] Σ over each response's tokens; NaN where the item has no such response (so misuse shows)."""
    b, k = batch.present.shape
    sums = segment_sum(token_logps, batch.slots, b * k).view(b, k)
    return torch.where(batch.present, sums, torch.full_like(sums, float("nan")))


class ResponseScorer(nn.Module):
    """The policy as one module whose forward returns per-token response log-probs.

    Why a module: DDP and FSDP synchronise gradients through the wrapped module's forward. Calling the
    backbone and the lm_head weight from outside (as the fused path must) would bypass the wrapper; putting
    the whole computation in this forward keeps `prepare_model(ResponseScorer(model))` correct.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: PackedBatch) -> Tensor:
        return shared_prefix_token_logprobs(self.model, batch, self.chunk_size)
