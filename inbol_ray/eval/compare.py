"""Compare two runs: the difference in s_trust per (method, data set) with a paired bootstrap 95% CI.

Why paired: both runs answer the same items, and most of the spread in s_trust comes from which items a
set happens to contain. Resampling items (the same resampled items for both runs) and recomputing
s_trust_B - s_trust_A cancels that shared part, so the interval says whether B's gain is larger than the
item-level noise. Each response scores +1 correct, 0 refusal, -1 wrong, and s_trust is the mean score
(DESIGN.md 1.3), so the difference of s_trust is the mean of per-item score differences.

The interval is the percentile bootstrap (B resamples of the paired items); a difference is flagged
significant when the interval excludes 0. Every cell has its own seed derived from (seed, methods,
data set), so adding a method to a run does not change the other cells' intervals.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

from inbol_ray import schema as S
from inbol_ray.data import io as dio
from inbol_ray.eval.markdown import markdown_table
from inbol_ray.eval.report import method_order, pct
from inbol_ray.run_layout import RunLayout

METHOD_A, METHOD_B = "method_a", "method_b"
S_TRUST_A, S_TRUST_B = "s_trust_a", "s_trust_b"
DELTA, CI_LO, CI_HI = "delta", "ci_lo", "ci_hi"
SIGNIFICANT = "significant"
UNPAIRED = "unpaired"
COMPARISON_COLUMNS = [
    METHOD_A,
    METHOD_B,
    S.DATASET,
    S.N,
    S_TRUST_A,
    S_TRUST_B,
    DELTA,
    CI_LO,
    CI_HI,
    SIGNIFICANT,
    UNPAIRED,
]


def item_scores(correct: np.ndarray, refused: np.ndarray) -> np.ndarray:
    """+1 correct, 0 refusal, -1 wrong, per item: 2*correct + refused - 1 (a refusal is never correct)."""
    return 2 * np.asarray(correct, dtype=int) + np.asarray(refused, dtype=int) - 1


def paired_bootstrap_ci(
    diff: np.ndarray, samples: int, rng: np.random.Generator, level: float = 0.95, chunk: int = 256
) -> tuple[float, float]:
    """Percentile interval of mean(diff) over `samples` resamples of the items (chunked: bounded memory)."""
    n = len(diff)
    if n == 0:
        raise ValueError("paired bootstrap needs at least one paired item")
    means = []
    for start in range(0, samples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, samples - start), n))
        means.append(diff[idx].mean(axis=1))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.concatenate(means), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _cell_rng(seed: int, method_a: str, method_b: str, dataset: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{method_a}|{method_b}|{dataset}".encode())])


def compare_predictions(
    pred_a: pd.DataFrame,
    pred_b: pd.DataFrame,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    methods: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per (method pair, data set) with s_trust of both runs, their difference and its CI.

    `methods`: method in A -> method in B (e.g. {"base": "cadpo"} to compare two methods of one run);
    default: every method present in both, paired with itself. Items are paired by (dataset, id); items
    found in only one run are left out and counted in `unpaired`. Fractions, like metrics.parquet.
    """
    if methods:
        pairs = dict(methods)
    else:  # the method table's order, then any others
        shared = set(pred_a[S.MODEL]) & set(pred_b[S.MODEL])
        pairs = {m: m for m in method_order(sorted(shared))}
    rows = []
    for method_a, method_b in pairs.items():
        a = pred_a[pred_a[S.MODEL] == method_a]
        b = pred_b[pred_b[S.MODEL] == method_b]
        if a.empty or b.empty:
            raise ValueError(f"method {method_a if a.empty else method_b!r} has no predictions to compare")
        joined = a.merge(b, on=[S.DATASET, S.ID], suffixes=("_a", "_b"), how="outer", indicator=True)
        for dataset, part in joined.groupby(S.DATASET, sort=True):
            both = part[part["_merge"] == "both"]
            if both.empty:
                continue
            score_a = item_scores(both[f"{S.CORRECT}_a"].astype(bool), both[f"{S.REFUSED}_a"].astype(bool))
            score_b = item_scores(both[f"{S.CORRECT}_b"].astype(bool), both[f"{S.REFUSED}_b"].astype(bool))
            diff = (score_b - score_a).astype(float)
            lo, hi = paired_bootstrap_ci(diff, samples, _cell_rng(seed, method_a, method_b, dataset), level)
            rows.append(
                {
                    METHOD_A: method_a,
                    METHOD_B: method_b,
                    S.DATASET: dataset,
                    S.N: len(both),
                    S_TRUST_A: float(score_a.mean()),
                    S_TRUST_B: float(score_b.mean()),
                    DELTA: float(diff.mean()),
                    CI_LO: lo,
                    CI_HI: hi,
                    SIGNIFICANT: bool(lo > 0 or hi < 0),
                    UNPAIRED: int(len(part) - len(both)),
                }
            )
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def as_layout(run: str | RunLayout) -> RunLayout:
    return run if isinstance(run, RunLayout) else RunLayout(root=dio.absolute(run))


def compare_runs(
    run_a: str | RunLayout,
    run_b: str | RunLayout,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    methods: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """compare_predictions on two run directories' predictions (A may equal B with `methods`).

    `run_a`, `run_b`: run directories (local paths or URIs) or their `RunLayout`s.
    """
    read = [dio.read_table(as_layout(r).predictions).to_pandas() for r in (run_a, run_b)]
    return compare_predictions(read[0], read[1], samples=samples, seed=seed, level=level, methods=methods)


def comparison_markdown(frame: pd.DataFrame, label_a: str, label_b: str, level: float = 0.95) -> str:
    """A readable table: s_trust of A and B, the difference B - A and its CI, x100 like the report."""
    same = (frame[METHOD_A] == frame[METHOD_B]).all()
    header = ["Method" if same else "Methods (A → B)", "Set", "n", "s_trust A", "s_trust B", "Δ (B − A)",
              f"{round(100 * level)}% CI", "significant"]  # fmt: skip
    rows = []
    for r in frame.itertuples(index=False):
        name = r.method_a if same else f"{r.method_a} → {r.method_b}"
        flag = ("yes, B better" if r.delta > 0 else "yes, A better") if r.significant else "no"
        rows.append([name, r.dataset, str(r.n), pct(r.s_trust_a), pct(r.s_trust_b), f"{100 * r.delta:+.2f}",
                     f"[{100 * r.ci_lo:+.2f}, {100 * r.ci_hi:+.2f}]", flag])  # fmt: skip
    lines = [f"A = `{label_a}`, B = `{label_b}`.", "", markdown_table(header, rows, numeric_from=2), ""]
    unpaired = int(frame[UNPAIRED].sum()) if len(frame) else 0
    if unpaired:
        lines.append(f"{unpaired} item(s) were in only one run and are left out of the comparison.")
    lines.append(
        "Paired bootstrap over items: an interval that excludes 0 means the difference is larger than the "
        "noise from which items the set contains."
    )
    return "\n".join(lines)
