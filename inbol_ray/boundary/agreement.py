"""Live confidence for serving: agreement of K sampled answers with the greedy one, when no gold exists.

Training confidence (`inbol_ray.boundary.confidence`) is the share of K samples graded correct against
gold answers. A served question has no gold, so the estimate replaces "correct" by "agrees with the
model's own greedy answer": the same K-sample idea, measuring how stable the answer is under sampling.
Pure: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from inbol_ray.grading import answer_key
from inbol_ray.refusal import is_refusal


def answer_agreement(greedy: str, samples: Sequence[str]) -> float:
    """Share of sampled answers that agree with the greedy one (0.0 with no samples).

    Answers agree when their VQA-normalised text is equal ("Two." = "2"); two refusals agree whatever
    their wording, so a confident refusal scores high too.
    """
    if not samples:
        return 0.0
    if is_refusal(greedy):
        return sum(is_refusal(s) for s in samples) / len(samples)
    target = answer_key(greedy)
    return sum(not is_refusal(s) and answer_key(s) == target for s in samples) / len(samples)
