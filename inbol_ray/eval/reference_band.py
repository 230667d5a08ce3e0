"""Where a run's results fall against the embedded default's seed band: "did my `make demo` reproduce?"

Why: two runs of one config on one machine give the same bits, but float kernels differ between CPUs (and
the tiny model amplifies a different rounding into other greedy answers), so a fresh clone on another CPU
prints other digits than the README's run. One run's digits cannot tell a newcomer whether theirs is
healthy; the spread over seeds can. `make seeds` measures it (mean ± sd over seeds of each method's OOD
s_trust, OOD and unanswerable refusal rates) and writes `band.json`; the band of `configs/tiny.yaml` ships
as `configs/reference_band.json`, and every report of a run made with that config (any seed) says, per
method and quantity, "inside" or "outside, by N sd".

Inside means within `WIDTH` standard deviations of the seed mean. Three seeds give a rough sd, so the
band is wide on purpose and an sd below `MIN_SD` points is raised to it (the base never refuses: 0.0 ±
0.0 would call any single refusal an outlier).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from inbol_ray import schema as S

WIDTH = 2.0
MIN_SD = 0.01  # one point of s_trust or refusal rate (metrics are fractions)
QUANTITIES = {
    "ood_s_trust": ("ood_test", S.S_TRUST, "OOD avg s_trust"),
    "ood_refr": ("ood_test", S.REFR, "OOD avg RefR"),
    "unanswerable_refr": ("unanswerable_test", S.REFR, "unanswerable RefR"),
}
"""What the band holds: (split average, metric, label)."""

SEED_KEYS = (
    "data.shapes.seed",
    "data.mismatch_seed",
    "model.seed",
    "base_train.seed",
    "sampling.seed",
    "construct.seed",
    "train.seed",
)
"""Every seed of a config (`jobs.seeds` sets them all per seed): a band covers a config at any seed."""

OUTPUT_SECTIONS = (
    "model",
    "data",
    "base_train",
    "grading",
    "sampling",
    "construct",
    "train",
    "prompt",
    "eval",
)
"""The sections stages hash (what outputs are made from); where a run lives or is served does not count."""

DEFAULT_BAND = Path(__file__).resolve().parents[2] / "configs" / "reference_band.json"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def band_from_summary(summary: pd.DataFrame, seeds: Sequence[int], source: str) -> dict[str, Any]:
    """The band (JSON-ready) from `eval.seeds.summary` over `seeds`: per method and quantity, mean and sd."""
    methods: dict[str, dict[str, list[float]]] = {}
    for key, (split, metric, _) in QUANTITIES.items():
        rows = summary[summary[S.DATASET] == f"avg:{split}"]
        for row in rows.itertuples(index=False):
            row = row._asdict()
            methods.setdefault(row[S.METHOD], {})[key] = [row[f"{metric}_mean"], row[f"{metric}_sd"]]
    return {"seeds": list(seeds), "source": source, "methods": methods}


def _normalised(cfg) -> dict[str, Any]:
    out = {name: asdict(getattr(cfg, name)) for name in OUTPUT_SECTIONS}
    out["train"]["method"] = ""  # picks what jobs.train runs, not what is made
    for key in SEED_KEYS:
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node[part]
        node[last] = 0
    return out


def applies(cfg, band_config: Path = DEFAULT_CONFIG) -> bool:
    """Whether a run of `cfg` is a run of the band's config at some seed (its output sections equal
    `band_config`'s once seeds are set aside)."""
    from inbol_ray.config import load_config

    return _normalised(cfg) == _normalised(load_config(band_config))


def split_values(metrics: pd.DataFrame, splits: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per method and band quantity, this run's split average (unweighted over the split's sets, as the
    seed table averages them)."""
    frame = metrics.assign(split=metrics[S.DATASET].map(dict(splits)))
    out: dict[str, dict[str, float]] = {}
    for key, (split, metric, _) in QUANTITIES.items():
        part = frame[frame["split"] == split]
        for method, value in part.groupby(S.METHOD)[metric].mean().items():
            out.setdefault(str(method), {})[key] = float(value)
    return out


def verdict(value: float, mean: float, sd: float) -> str:
    """ "inside" within WIDTH sd of the mean, else "outside, by N sd" (N: distance beyond the mean in sd)."""
    scale = max(sd, MIN_SD)
    distance = (value - mean) / scale
    if abs(distance) <= WIDTH:
        return "inside"
    return f"outside, by {abs(distance):.1f} sd ({'above' if distance > 0 else 'below'})"


def band_section(
    cfg, metrics: pd.DataFrame, splits: Mapping[str, str], band_file: Path = DEFAULT_BAND
) -> list[str]:
    """The report's lines: this run against the band, or why there is no band for it."""
    head = ["## Against the reference band", ""]
    if not band_file.exists():
        return [*head, f"No reference band file ({band_file}).", ""]
    if not applies(cfg):
        return [
            *head,
            "This run's config is not `configs/tiny.yaml` (at any seed), so the shipped band does not apply: "
            "`make seeds` with this config measures its own.",
            "",
        ]
    band = json.loads(band_file.read_text())
    values = split_values(metrics, splits)
    rows = [
        "| method | quantity | this run | band (mean ± sd) | verdict |",
        "|---|---|---:|---:|---|",
    ]
    outside = 0
    for method, quantities in band["methods"].items():
        for key, (mean, sd) in quantities.items():
            value = values.get(method, {}).get(key)
            if value is None or math.isnan(value):
                continue
            said = verdict(value, mean, sd)
            outside += said != "inside"
            label = QUANTITIES[key][2]
            rows.append(
                f"| {method} | {label} | {100 * value:.1f} | {100 * mean:.1f} ± {100 * sd:.1f} | {said} |"
            )
    seeds = ", ".join(str(s) for s in band["seeds"])
    summary = (
        "every quantity is inside the band: this run reproduces the embedded default"
        if outside == 0
        else f"{outside} of {len(rows) - 2} quantities outside the band"
    )
    return [
        *head,
        f"The embedded default over seeds {seeds} ({band['source']}); inside = within {WIDTH:g} sd of the "
        f"seed mean (sd at least {100 * MIN_SD:g} point). Same config + same machine gives the same bits; "
        f"other CPUs give other digits, inside this band. {summary[0].upper()}{summary[1:]}.",
        "",
        *rows,
        "",
    ]
