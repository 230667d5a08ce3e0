"""The learning-rate schedule: endpoints, Hugging Face's curve, per-method peaks, the defaults unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from inbol_ray.config import ConfigError, TrainConfig
from inbol_ray.train.schedule import describe, lr_factor, master_dtype, method_lr, step_lr, warmup_steps


def test_warmup_endpoints() -> None:
    total = 100
    assert warmup_steps(total, 0.03) == 3
    assert warmup_steps(10, 0.03) == 1  # ceil: any ratio > 0 warms up at least one step
    assert lr_factor(0, total, 0.03, "cosine") == 0.0  # warmup starts from 0
    assert lr_factor(1, total, 0.03, "constant") == pytest.approx(1 / 3)
    assert lr_factor(3, total, 0.03, "constant") == 1.0  # the peak right after warmup
    assert lr_factor(3, total, 0.03, "cosine") == 1.0


def test_cosine_decays_to_zero_at_the_end() -> None:
    total, ratio = 40, 0.05  # 2 warmup steps, 38 decaying
    assert lr_factor(total, total, ratio, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(2 + 19, total, ratio, "cosine") == pytest.approx(0.5)  # half way: half the peak
    factors = [lr_factor(s, total, ratio, "cosine") for s in range(2, total)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))  # monotone after warmup
    assert 0 < factors[-1] < 0.01  # the last trained step runs just above 0


def test_constant_without_warmup_is_the_configured_rate_exactly() -> None:
    cfg = TrainConfig(lr=5.0e-4)
    assert cfg.warmup_ratio == 0.0 and cfg.lr_schedule == "constant"  # the defaults: today's runs
    assert all(step_lr(cfg, s, 40) == 5.0e-4 for s in range(40))  # bit for bit, not approx


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_same_curve_as_hugging_face(schedule: str) -> None:
    total, ratio, peak = 37, 0.1, 2e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    warm = math.ceil(total * ratio)
    hf = (
        get_cosine_schedule_with_warmup(opt, warm, total)
        if schedule == "cosine"
        else get_constant_schedule_with_warmup(opt, warm)
    )
    cfg = TrainConfig(lr=peak, warmup_ratio=ratio, lr_schedule=schedule)
    for step in range(total):
        assert step_lr(cfg, step, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        opt.step()
        hf.step()


def test_resume_recomputes_the_same_rates() -> None:
    """The rate depends on (step, total, config) only: a run resumed at step 7 continues the same curve."""
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.2, lr_schedule="cosine")
    whole = [step_lr(cfg, s, 20) for s in range(20)]
    resumed = [
        step_lr(TrainConfig(lr=1e-3, warmup_ratio=0.2, lr_schedule="cosine"), s, 20) for s in range(7, 20)
    ]
    assert resumed == whole[7:]


def test_method_rates_and_description() -> None:
    cfg = TrainConfig(lr=2e-4, dpo_lr=5e-6, warmup_ratio=0.03, lr_schedule="cosine")
    assert method_lr(cfg, "idk_it") == 2e-4 and method_lr(cfg, "sft") == 2e-4
    assert method_lr(cfg, "cadpo") == 5e-6 and method_lr(cfg, "dpo3") == 5e-6
    assert method_lr(TrainConfig(lr=2e-4), "cadpo") == 2e-4  # dpo_lr 0: lr
    assert describe(cfg) == "cosine, warmup 3%"
    assert describe(TrainConfig()) == "constant"


def test_master_dtype_is_float32_only_for_half_precision_full_fine_tuning() -> None:
    full, lora = TrainConfig(lora=False), TrainConfig(lora=True)
    assert master_dtype(full, "bfloat16") == "float32"
    assert master_dtype(full, "float16") == "float32"
    assert master_dtype(full, "float32") == "float32"
    assert master_dtype(lora, "bfloat16") == "bfloat16"  # peft keeps the adapters in float32 itself


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_ratio": -0.1}, "train.warmup_ratio"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
        ({"reference_batch_size": -1}, "train.reference_batch_size"),
        ({"lr_schedule": "linear"}, "train.lr_schedule"),
    ],
)
def test_bad_schedule_settings_fail_at_load(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
