"""The learning rate of each training step: the method's peak rate, linear warmup, then constant or cosine.

Why a pure function of the step (and not a torch LR scheduler object): a resumed run must continue with
exactly the rates an uninterrupted one would have used. A scheduler's state would have to be saved,
restored and kept in step with the optimizer; a function of (step, total steps, config) is recomputed
from the checkpoint's step and cannot drift. The shape is Hugging Face's `get_cosine_schedule_with_warmup`
/ `get_constant_schedule_with_warmup` (LLaVA-1.5's LoRA recipe trains with cosine and warmup ratio 0.03),
including its conventions: ceil(ratio x total) warmup steps, the rate of 0-based step s is the factor at s
(so the first warmup step runs at 0), and cosine reaches 0 at s = total.

`master_dtype` (the dtype the trained weights are kept in) lives here too: like the rate, a pure decision
of the training config that the loop, the export and the report all need. No torch, no Ray, so the report
can import this module for the recipe it prints.
"""

from __future__ import annotations

import math

from inbol_ray import methods as M
from inbol_ray.config import TrainConfig


def method_lr(train: TrainConfig, method: str) -> float:
    """The peak rate of `method`: `train.dpo_lr` for the DPO objective when set, else `train.lr`."""
    dpo = M.method(method).objective == "dpo"
    return train.dpo_lr if dpo and train.dpo_lr > 0 else train.lr


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warmup length as Hugging Face's TrainingArguments counts it: ceil(ratio x total)."""
    return math.ceil(total * warmup_ratio)


def lr_factor(step: int, total: int, warmup_ratio: float = 0.0, schedule: str = "constant") -> float:
    """Multiplier of the peak rate at 0-based `step` of `total`: step/warmup during warmup, then 1
    (`constant`) or 0.5·(1 + cos(π·progress)) over the remaining steps (`cosine`)."""
    warm = warmup_steps(total, warmup_ratio)
    if step < warm:
        return step / warm
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; known: constant, cosine")
    progress = (step - warm) / max(1, total - warm)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def step_lr(train: TrainConfig, step: int, total: int) -> float:
    """The rate of `step`, with `train.lr` as the peak (the trainer puts the method's rate there).

    Without warmup and with the constant schedule the factor is exactly 1.0, so such runs use exactly
    the rate they always did (x * 1.0 == x in IEEE arithmetic).
    """
    return train.lr * lr_factor(step, total, train.warmup_ratio, train.lr_schedule)


def describe(train: TrainConfig) -> str:
    """The schedule as the report prints it, e.g. `cosine, warmup 3%` or `constant`."""
    warm = f", warmup {train.warmup_ratio * 100:g}%" if train.warmup_ratio > 0 else ""
    return f"{train.lr_schedule}{warm}"


HALF_DTYPES = ("bfloat16", "float16")


def master_dtype(train: TrainConfig, model_dtype: str) -> str:
    """The dtype the policy trains in: float32 for full fine-tuning of a half-precision model (see
    TrainConfig.fp32_master_weights), else `model_dtype`."""
    if not train.lora and model_dtype in HALF_DTYPES and train.fp32_master_weights:
        return "float32"
    return model_dtype
