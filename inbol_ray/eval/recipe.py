"""The "Training recipe" section of a report: how every trained method was trained, read from the config
and the method table, so a result table is never read apart from the settings that made it."""

from __future__ import annotations

from collections.abc import Sequence

from inbol_ray import methods as M
from inbol_ray.eval.markdown import markdown_table
from inbol_ray.train import schedule


def short_float(value: float) -> str:
    """A rate as a recipe writes it: 2e-4, 5e-6, 2.5e-5 (no padded exponent, no trailing zeros)."""
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def recipe_table(cfg, trained: Sequence[str]) -> str:
    """One row per trained method: how it was trained, read from `cfg` (a `Config`) and the method table.

    The rate is the one the method used (`train.dpo_lr` for the DPO family when set); beta and sft_weight
    only mean something for the DPO objective, so SFT rows show "–" there.
    """
    train, dash = cfg.train, "–"
    weights = f"LoRA r={train.lora_r}, α={train.lora_alpha}" if train.lora else "full fine-tuning"
    if schedule.master_dtype(train, cfg.model.dtype) != cfg.model.dtype:
        weights += " (fp32 master weights)"
    weights += " + projector" if train.train_projector else ""
    epochs = f"{train.max_steps} steps (max_steps)" if train.max_steps else str(train.epochs)
    rows = []
    for name in trained:
        method = M.method(name)
        dpo = method.objective == "dpo"
        objective = f"{'DPO' if dpo else 'SFT'} ({method.summary})"
        if dpo and train.sft_weight > 0:
            objective += f" + {train.sft_weight:g}·NLL(chosen)"
        start = M.start_method(name, train.dpo_init) or "base"
        rows.append(
            [
                name,
                objective,
                f"{train.beta:g}" if dpo else dash,
                f"{train.sft_weight:g}" if dpo else dash,
                short_float(schedule.method_lr(train, name)),
                schedule.describe(train),
                epochs,
                weights,
                start + (" (also the reference)" if dpo else ""),
            ]
        )
    header = ["Method", "Objective", "beta", "sft_weight", "lr", "Schedule", "Epochs", "Weights", "Start"]
    return markdown_table(header, rows, numeric_from=len(header))


def recipe_section(cfg, trained: Sequence[str]) -> list[str]:
    """The "Training recipe" section's lines (nothing when no method was trained); with sft_weight > 0 a
    note that the DPO losses are not the paper's, since a reader comparing with the paper must know."""
    if not trained:
        return []
    train = cfg.train
    lines = [
        "## Training recipe",
        "",
        recipe_table(cfg, trained),
        "",
        f"From the run's config: lr is the schedule's peak (`train.lr` for SFT objectives, `train.dpo_lr` for "
        f"the DPO family when set), batch {train.batch_size} rows per step, AdamW weight decay "
        f"{train.weight_decay:g}, max grad norm {train.max_grad_norm:g}, model dtype {cfg.model.dtype}, "
        f"images {cfg.model.image_aspect}. `base` is the model InBoL starts from; "
        "a DPO method's frozen reference is its start model.",
        "",
    ]
    if train.sft_weight > 0 and any(M.method(m).objective == "dpo" for m in trained):
        lines += [
            f"**Not the paper's loss:** sft_weight = {train.sft_weight:g} adds {train.sft_weight:g} × the "
            "NLL of the chosen response (per token, weighted like its pair) to every DPO loss above, a "
            "departure from the paper: its CA-DPO loss is the DPO term alone (sft_weight = 0).",
            "",
        ]
    return lines
