"""What a tracker is sent, as plain data: flattened parameters, tag pairs, metric names and values.

Pure functions, so the shapes both backends receive are decided (and unit-tested) in one place: MLflow
and W&B then hold the same keys for the same run, and a sweep's runs compare column by column.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PAIR_SEPARATOR = ">"
"""Training rows name preference pairs `correct>refusal`; MLflow refuses `>` in a metric name."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config (dataclasses, dicts, lists) as `{"train.lr": 2e-05, "eval.methods": '["base", ...]'}`.

    Dotted keys are the names a user writes as overrides (`train.lr=...`), so a tracker's parameter column
    is the override that reproduces it. Lists of sections flatten by position (`data.datasets.0.name`);
    other lists stay one JSON value, as one override sets them.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list | tuple) and any(
        isinstance(v, Mapping) or dataclasses.is_dataclass(v) for v in value
    ):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
        return out
    if isinstance(value, list | tuple):
        return {prefix: json.dumps(list(value), default=str)}
    return {prefix: value}


def parse_tags(tags: list[str]) -> dict[str, str]:
    """`["team=vision", "sweep=lr"]` -> `{"team": "vision", "sweep": "lr"}` (the config checked the form;
    a value may itself hold `=`)."""
    out = {}
    for tag in tags:
        key, _, value = tag.partition("=")
        out[key.strip()] = value.strip()
    return out


def metric_name(key: str) -> str:
    """A key as a tracker's metric or parameter name: `correct>refusal/margin` -> `correct_vs_refusal/margin`.
    MLflow accepts letters, digits and `_ - . / :` and space, and rejects the rest (`>` first of all)."""
    return re.sub(r"[^\w./\- :]", "_", key.replace(PAIR_SEPARATOR, "_vs_"))


def numeric(value: Any) -> float | None:
    """A finite number as float (bools as 0/1); None for anything a metric cannot hold (text, NaN: a pair
    without rows in a step has no value, not a zero)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def step_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """One training step's row (loop.py) as tracker metrics: every finite number but the step itself
    (the tracker's step axis) and the row ids."""
    out = {}
    for key, value in row.items():
        number = numeric(value)
        if key not in ("step", "ids") and number is not None:
            out[metric_name(key)] = number
    return out


def split_counts(counts: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """A stage's counts (its manifest's `counts`, nested) as (metrics, params): numbers become metrics
    (`family_accuracy.shape.acc`), text such as output URIs becomes parameters."""
    metrics, params = {}, {}
    for key, value in flatten(dict(counts), prefix).items():
        number = numeric(value)
        if number is not None:
            metrics[metric_name(key)] = number
        elif isinstance(value, str):
            params[metric_name(key)] = value
    return metrics, params


def as_text(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameter values as strings (None -> ""): what MLflow stores, and what W&B shows the same way."""
    return {
        k: "" if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
        for k, v in params.items()
    }


def git_commit(where: Path | None = None) -> dict[str, str]:
    """`{"git.commit": sha, "git.dirty": "true"|"false"}` of the checkout holding this package, or `{}`
    without git or outside a checkout (an installed wheel): the tracker records what it can, never fails."""
    where = where or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": "true" if dirty else "false"}
