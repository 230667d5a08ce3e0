"""Per-response log-probs from a LLaVA model without [batch, seq, vocab] logits.

Why: `model(**batch).logits` runs the lm_head over every position (576 image tokens + the question + the
answer) and, in float32, costs B·T·V·4 bytes before log_softmax doubles it; DPO only needs the few answer
tokens. Here the backbone (vision tower + projector + LM body) runs as usual, the last hidden states are
gathered at the positions that predict response tokens, and the fused op does the lm_head + log-softmax
gather on those rows only. Gradients flow to every parameter that produced the hidden states (LoRA
adapters included) and to the lm_head weight when it requires grad.

Shift convention (as in every causal LM loss): the logit at position t−1 predicts token t, so a response
token at position t contributes log_softmax(lm_head(hidden[t−1]))[input_ids[t]]. Padding may be on either
side; only `response_mask` decides which tokens count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from inbol_ray.train.logprob import DEFAULT_CHUNK_SIZE, fused_response_logprobs, segment_sum


class ResponseLogprobs(NamedTuple):
    """Per-response sums and the per-token values they came from (for SFT or per-token losses)."""

    per_sequence: Tensor
    """[B] Σ log π(y_t | x, y_<t) over the response tokens of each row (0 for a row with none)."""
    per_token: Tensor
    """[N] one log-prob per response token, rows in (batch, position) order."""
    sequence_ids: Tensor
    """[N] batch row of each entry of `per_token`."""


def causal_lm(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration under an optional peft wrapper (adapters stay active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone_hidden(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    pixel_values: Tensor | None,
    **model_kwargs: Any,
) -> Tensor:
    """Last hidden states [B, T, D] of the LLaVA backbone (vision tower, projector, LM body; no lm_head).

    Calls `LlavaForConditionalGeneration.model` with the same arguments `model(**batch)` would pass it, so
    the hidden states are exactly those the full forward feeds to its lm_head.
    """
    out = causal_lm(model).model(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **model_kwargs
    )
    return out.last_hidden_state


def gather_response_positions(
    hidden: Tensor, input_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of `hidden` that predict response tokens: (hidden [N, D], targets [N], sequence_ids [N]).

    response_mask [B, T] is True at response *tokens*; the predicting row of token t is hidden[t − 1].
    """
    if hidden.shape[:2] != input_ids.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"hidden [B, T, D], input_ids and response_mask [B, T] disagree: {tuple(hidden.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(response_mask.shape)}"
        )
    mask = response_mask.bool()
    if mask[:, 0].any():
        raise ValueError("a response token at position 0 has no preceding position to predict it")
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)
    return hidden[rows, cols], input_ids[rows, cols + 1], rows


def response_logprobs_from_hidden(
    hidden: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ResponseLogprobs:
    """Per-response log-probs from backbone hidden states [B, T, D] and the lm_head weight [V, D]."""
    h, targets, seq_ids = gather_response_positions(hidden, input_ids, response_mask)
    per_token = fused_response_logprobs(h, weight, targets, chunk_size, bias=bias)
    per_sequence = segment_sum(per_token, seq_ids, input_ids.shape[0])
    return ResponseLogprobs(per_sequence=per_sequence, per_token=per_token, sequence_ids=seq_ids)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    pixel_values: Tensor | None,
    response_mask: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **model_kwargs: Any,
) -> ResponseLogprobs:
    """Log π(response | prompt, image) per row of a batch, equal to gathering from model(**batch).logits.

    `model` is a LlavaForConditionalGeneration, optionally wrapped by peft (adapters active; use peft's
    `disable_adapter()` context for the reference model). Extra keyword arguments (e.g. position_ids,
    image_sizes) go to the backbone unchanged.
    """
    hidden = backbone_hidden(model, input_ids, attention_mask, pixel_values, **model_kwargs)
    lm_head = causal_lm(model).get_output_embeddings()
    return response_logprobs_from_hidden(
        hidden, input_ids, response_mask, lm_head.weight, getattr(lm_head, "bias", None), chunk_size
    )


def naive_response_logprobs_from_logits(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Reference: full [B, T, V] logits → float32 log_softmax → gather → masked sum per row ([B])."""
    logp = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(dim=1)


__all__ = [
    "ResponseLogprobs",
    "backbone_hidden",
    "causal_lm",
    "gather_response_positions",
    "naive_response_logprobs_from_logits",
    "response_logprobs",
    "response_logprobs_from_hidden",
]
