"""Seed noise: one config run under several seeds, each result as mean ± sd, and which orderings survive it.

Why: on a few hundred items, two runs that differ only in seeds (world, base training, sampling,
construction, training) can move s_trust by several points, so one run's table cannot say whether
"CA-DPO beats SFT" is the method or the draw. `jobs.seeds` runs the pipeline once per seed; this module
turns their `metrics.parquet` tables into the summary (pure: frames in, frames and Markdown out).

An ordering (a `Claim`: one method's split-average metric against another's, or against a number) is
checked per seed on the paired difference left − right. It *exceeds seed noise* when it holds in every
seed and the mean difference clears the claim's margin by more than two standard errors of the paired
differences (sd / sqrt(seeds)); with one seed nothing can exceed noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from inbol_ray import schema as S
from inbol_ray.eval.markdown import markdown_table
from inbol_ray.eval.report import SECTIONS, method_order, short_names

SPLIT_SECTIONS = {section.split: section for section in SECTIONS}
"""The splits a seed table shows, in the report's order, titles and metrics (an unanswerable split: RefR)."""

SEED = "seed"
SPLIT = "split"


@dataclass(frozen=True)
class Quantity:
    """A method's metric averaged (unweighted, as the report's Avg column) over the sets of one split."""

    method: str
    split: str
    metric: str


@dataclass(frozen=True)
class Claim:
    """`left - right >= margin` (fractions); with `within` set, `|left - right| <= within`; with `below`,
    `left < right`."""

    text: str
    left: Quantity
    right: Quantity | float
    margin: float = 0.0
    within: float | None = None
    below: bool = False

    def holds(self, diff: float) -> bool:
        if self.within is not None:
            return abs(diff) <= self.within
        return diff < 0 if self.below else diff >= self.margin

    def beyond_noise(self, diffs: Sequence[float]) -> bool:
        """Holds in every seed and clears its bound by two standard errors of the paired differences."""
        if len(diffs) < 2 or not all(self.holds(d) for d in diffs):
            return False
        mean = sum(diffs) / len(diffs)
        se = _sd(diffs) / math.sqrt(len(diffs))
        if self.within is not None:
            return abs(mean) + 2 * se <= self.within
        return mean + 2 * se < 0 if self.below else mean - 2 * se >= self.margin


OOD, UNANS = "ood_test", "unanswerable_test"
PAPER_ORDERINGS: tuple[Claim, ...] = (
    Claim("CA-DPO OOD s_trust >= SFT's", Quantity("cadpo", OOD, S.S_TRUST), Quantity("sft", OOD, S.S_TRUST)),
    Claim(
        "CA-DPO OOD s_trust >= IDK-IT's",
        Quantity("cadpo", OOD, S.S_TRUST),
        Quantity("idk_it", OOD, S.S_TRUST),
    ),
    Claim(
        "CA-DPO OOD s_trust >= base + 10",
        Quantity("cadpo", OOD, S.S_TRUST),
        Quantity("base", OOD, S.S_TRUST),
        margin=0.10,
    ),
    Claim(
        "SFT OOD Acc within 5 of the base's",
        Quantity("sft", OOD, S.ACC),
        Quantity("base", OOD, S.ACC),
        within=0.05,
    ),
    Claim(
        "IDK-IT OOD RefR > CA-DPO's",
        Quantity("idk_it", OOD, S.REFR),
        Quantity("cadpo", OOD, S.REFR),
        margin=1e-9,
    ),
    Claim("IDK-IT unanswerable RefR >= 70%", Quantity("idk_it", UNANS, S.REFR), 0.70),
    Claim("CA-DPO unanswerable RefR >= 70%", Quantity("cadpo", UNANS, S.REFR), 0.70),
    Claim("base unanswerable RefR < 30%", Quantity("base", UNANS, S.REFR), 0.30, below=True),
)
"""The paper's findings the embedded default should reproduce (issue 16's done-when)."""


def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def stack(per_seed: Mapping[int, pd.DataFrame], splits: Mapping[int, Mapping[str, str]]) -> pd.DataFrame:
    """One frame of every seed's metrics rows, with `seed` and each set's `split` (sets not in a split that
    a seed table shows are dropped)."""
    frames = []
    for seed, metrics in sorted(per_seed.items()):
        frame = metrics[[S.METHOD, S.DATASET, S.N, S.ACC, S.REFR, S.S_TRUST]].copy()
        frame[SEED] = seed
        frame[SPLIT] = frame[S.DATASET].map(dict(splits[seed]))
        frames.append(frame[frame[SPLIT].isin(list(SPLIT_SECTIONS))])
    return pd.concat(frames, ignore_index=True)


def split_averages(stacked: pd.DataFrame) -> pd.DataFrame:
    """Per (seed, method, split): the unweighted mean of each metric over the split's sets."""
    return stacked.groupby([SEED, S.METHOD, SPLIT], as_index=False)[[S.ACC, S.REFR, S.S_TRUST]].mean()


def summary(stacked: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per (method, dataset) and per (method, split average, dataset `avg:<split>`)."""
    averages = split_averages(stacked).assign(**{S.DATASET: lambda f: "avg:" + f[SPLIT]})
    rows = pd.concat([stacked, averages], ignore_index=True)
    grouped = rows.groupby([S.METHOD, SPLIT, S.DATASET])
    out = grouped[[S.ACC, S.REFR, S.S_TRUST]].agg(["mean", lambda v: _sd(list(v))])
    out.columns = [f"{metric}_{'mean' if stat == 'mean' else 'sd'}" for metric, stat in out.columns]
    out["seeds"] = grouped[SEED].nunique()
    return out.reset_index()


def _value(averages: pd.DataFrame, seed: int, q: Quantity) -> float:
    hit = averages[(averages[SEED] == seed) & (averages[S.METHOD] == q.method) & (averages[SPLIT] == q.split)]
    return float(hit[q.metric].iloc[0]) if len(hit) else math.nan


def claim_rows(stacked: pd.DataFrame, claims: Sequence[Claim] = PAPER_ORDERINGS) -> pd.DataFrame:
    """Per claim: its paired difference (left - right) per seed, mean, sd, seeds holding, beyond noise.
    A claim whose methods or splits a run lacks is left out."""
    averages = split_averages(stacked)
    seeds = sorted(averages[SEED].unique())
    out = []
    for claim in claims:
        diffs = []
        for seed in seeds:
            left = _value(averages, seed, claim.left)
            right = claim.right if isinstance(claim.right, float) else _value(averages, seed, claim.right)
            diffs.append(left - right)
        if not diffs or any(math.isnan(d) for d in diffs):
            continue
        held = [claim.holds(d) for d in diffs]
        out.append(
            {
                "claim": claim.text,
                "diff_mean": sum(diffs) / len(diffs),
                "diff_sd": _sd(diffs),
                "holds": sum(held),
                "seeds": len(diffs),
                "beyond_noise": claim.beyond_noise(diffs),
                **{f"diff_seed{seed}": d for seed, d in zip(seeds, diffs, strict=True)},
            }
        )
    return pd.DataFrame(out)


def _cell(mean: float, sd: float) -> str:
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def seeds_markdown(stacked: pd.DataFrame, recipe: Sequence[str] = ()) -> str:
    """Per split: methods x (sets, split average) as mean ± sd (%), then the orderings and the recipe."""
    table = summary(stacked)
    seeds = sorted(stacked[SEED].unique())
    methods = method_order(sorted(stacked[S.METHOD].unique()))
    out = [
        "# Seed table",
        "",
        f"{len(seeds)} runs of one config, seeds {', '.join(map(str, seeds))} (world, base training, sampling, "
        "construction and training seeds all set to the seed). Cells: mean ± sd over seeds, in %.",
        "",
    ]
    for split, section in SPLIT_SECTIONS.items():
        part = table[table[SPLIT] == split]
        if part.empty:
            continue
        metric = S.S_TRUST if S.S_TRUST in section.columns else section.columns[0]
        sets = sorted(d for d in part[S.DATASET].unique() if not d.startswith("avg:"))
        labels = short_names(sets)
        columns = [(d, labels[d]) for d in sets] + ([(f"avg:{split}", "Avg")] if len(sets) > 1 else [])
        extra = (
            [(f"avg:{split}", S.ACC, "Avg Acc"), (f"avg:{split}", S.REFR, "Avg RefR")] if split == OOD else []
        )
        index = part.set_index([S.METHOD, S.DATASET])
        name = "RefR" if metric == S.REFR else "s_trust"
        header = ["Method", *[f"{label} {name}" for _, label in columns], *[e[2] for e in extra]]
        rows = []
        for method in methods:
            cells = []
            for key, m in [(d, metric) for d, _ in columns] + [(d, m) for d, m, _ in extra]:
                hit = (method, key) in index.index
                row = index.loc[(method, key)] if hit else None
                cells.append(_cell(row[f"{m}_mean"], row[f"{m}_sd"]) if hit else "–")
            rows.append([method, *cells])
        out += [f"## {section.title}", "", markdown_table(header, rows), ""]
    claims = claim_rows(stacked)
    if not claims.empty:
        out += [
            "## Orderings",
            "",
            "Each claim's paired difference (left − right, points) per seed. *Beyond noise*: it holds in every seed "
            "and its mean clears the bound by two standard errors (sd/√seeds).",
            "",
        ]
        header = ["Claim", "Mean diff", "sd", "Holds", "Beyond noise", *[f"seed {s}" for s in seeds]]
        rows = [
            [
                r["claim"],
                f"{100 * r['diff_mean']:+.1f}",
                f"{100 * r['diff_sd']:.1f}",
                f"{r['holds']}/{r['seeds']}",
                "yes" if r["beyond_noise"] else "no",
                *[f"{100 * r[f'diff_seed{s}']:+.1f}" for s in seeds],
            ]
            for _, r in claims.iterrows()
        ]
        out += [markdown_table(header, rows), ""]
    out += list(recipe)
    return "\n".join(out)
