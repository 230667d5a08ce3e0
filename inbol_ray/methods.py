"""The method table: every method's training table, objective, start model and reference, in one place.

Why one table: which methods exist, which are trained, which need reference log-probs and which model each
starts from used to be spelled out in the pipeline, three jobs, the trainer, the report and the config. A
new method (or a typo in `eval.methods`) is now one edit here and one check when the config loads.

Pure: no Ray, no torch. The run layout turns `start` into a checkpoint location.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Start = Literal["base", "dpo_init"]
"""`base`: the model InBoL starts from (tiny base or `model.path`); `dpo_init`: `train.dpo_init` decides
(`idk_it`: InBoL's second step starts from, and is anchored to, the IDK-IT model; `base`: from the base)."""


@dataclass(frozen=True)
class Method:
    name: str
    table: str | None
    """Training table under `<run_dir>/tables/` (None: not trained, evaluated on the base model)."""
    objective: Literal["sft", "dpo"] | None
    """`sft`: cross-entropy on the target; `dpo`: the CA-DPO family (variant = the method name)."""
    start: Start
    """The model training starts from; DPO methods also score their frozen reference with it."""
    refusal_prompt: bool = False
    """Evaluated with the refusal clause added to the prompt (the refusal-prompt baseline)."""
    summary: str = ""

    @property
    def trained(self) -> bool:
        return self.table is not None

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("base", None, None, "base", summary="the base model, no training"),
        Method("refusal_prompt", None, None, "base", True, "the base model asked to refuse when unsure"),
        Method("sft", "sft_baseline", "sft", "base", summary="refusals for unanswerable items only"),
        Method("idk_it", "idk_it", "sft", "base", summary="refusal target where conf < tau_idk"),
        Method("dpo1", "cadpo_pairs", "dpo", "dpo_init", summary="mixed: refusal > incorrect only"),
        Method("dpo2", "cadpo_pairs", "dpo", "dpo_init", summary="mixed: correct > incorrect only"),
        Method("dpo3", "cadpo_pairs", "dpo", "dpo_init", summary="mixed: both pairs, weight 1/2"),
        Method("cadpo", "cadpo_pairs", "dpo", "dpo_init", summary="mixed: both pairs weighted by conf"),
    )
}
TRAINED = tuple(name for name, m in METHODS.items() if m.trained)
DPO = tuple(name for name, m in METHODS.items() if m.objective == "dpo")


def method(name: str) -> Method:
    """The method called `name`; a clear error listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def unknown_methods(names: Sequence[str]) -> list[str]:
    return [n for n in names if n not in METHODS]


def start_method(name: str, dpo_init: str) -> str | None:
    """The trained method whose checkpoint `name` starts from, or None when it starts from the base."""
    m = method(name)
    if m.start == "dpo_init" and dpo_init != "base":
        return dpo_init
    return None


def training_order(evaluated: Sequence[str], dpo_init: str) -> list[str]:
    """Methods to train for the evaluated ones, each after the method it starts from.

    A method another one starts from is trained even when it is not evaluated itself (the DPO methods need
    IDK-IT with `dpo_init: idk_it`).
    """
    wanted = [n for n in TRAINED if n in evaluated]
    for name in list(wanted):
        first = start_method(name, dpo_init)
        if first and first not in wanted:
            wanted.append(first)
    ordered: list[str] = []

    def visit(name: str) -> None:
        first = start_method(name, dpo_init)
        if first:
            visit(first)
        if name not in ordered:
            ordered.append(name)

    for name in TRAINED:  # table order: sft, idk_it, then the DPO family
        if name in wanted:
            visit(name)
    return ordered
