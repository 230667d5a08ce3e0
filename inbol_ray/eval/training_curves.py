"""Training curves for the report: per trained method, its loss and, for the DPO family, the reward margin
and reward accuracy of each pair type against steps, from the run's own `models/<method>/metrics.jsonl`.

Why in the report: a result table says what a method scores, not whether its training did what the recipe
meant: a loss that never fell, a correct-vs-refusal margin stuck at 0 (the refusal never learned) or an
accuracy that reached 1 in a few steps (an easy pair type, nothing left to learn) are read here, beside the
boundary figures they explain.

Keys are found, not listed: a pair-type metric is any `<chosen>><rejected>/<stat>` key and a group loss any
`loss/<group>` key, so a metric the training adds later gets plotted and one a method lacks is a missing
line, never an error. A null value (a step without rows of that pair type) is a gap. Long runs get a
rolling mean over the raw steps, drawn faint, so a trend is readable through the per-batch noise.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from inbol_ray.data import io as dio  # noqa: E402
from inbol_ray.run_layout import RunLayout  # noqa: E402

METRICS_FILE = "metrics.jsonl"
LOSS = "loss"
PAIR_KEY = re.compile(r"^(?P<pair>[A-Za-z_]+>[A-Za-z_]+)/(?P<stat>.+)$")
PAIR_STYLE = {
    "correct>refusal": ("#2ca02c", "correct vs refusal"),
    "refusal>incorrect": ("#ff7f0e", "refusal vs incorrect"),
    "correct>incorrect": ("#1f77b4", "correct vs incorrect"),
}
"""Colour and legend label per pair type, the same in every method's figure (the paper's three pairs)."""
STAT_TITLES = {
    "margin": ("reward margin", "β·[(log π − log π_ref)_chosen − (…)_rejected]"),
    "accuracy": ("reward accuracy", "share of pairs with margin > 0"),
    "rewards/chosen": ("reward of the chosen response", "β·(log π − log π_ref)"),
    "rewards/rejected": ("reward of the rejected response", "β·(log π − log π_ref)"),
    "logps/chosen": ("log-prob of the chosen response", "log π"),
    "logps/rejected": ("log-prob of the rejected response", "log π"),
}
"""Known pair statistics first, in this order (the last four as TRL names them); others follow under
their own names."""
COLUMNS = 4
"""Panels per row: loss, margin and accuracy side by side; more statistics wrap to further rows."""
LOSS_COLOUR = "#222222"
GROUP_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
SMOOTH_FROM = 50
"""Runs with at least this many steps get a rolling mean (window ~1/25 of the run) over the raw line."""


def figure_name(method: str) -> str:
    return f"training_{method}.png"


def metrics_uri(layout: RunLayout, method: str) -> str:
    return dio.join(layout.model(method), METRICS_FILE)


def read_history(uri: str) -> list[dict[str, Any]]:
    """The per-step rows of one training; [] when the file is missing (a method not trained yet).
    Unreadable lines are skipped: a curve with a hole says more than no curve."""
    if not dio.exists(uri):
        return []
    rows = []
    for line in dio.read_bytes(uri).decode().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    colour: str
    width: float = 1.6


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    bounds: tuple[float, float] | None = None
    zero_line: bool = False


def _numeric(rows: Sequence[dict[str, Any]], key: str) -> bool:
    """A key worth a line: some step holds a finite number for it."""
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return True
    return False


def panels(rows: Sequence[dict[str, Any]]) -> list[Panel]:
    """What this history can show: the loss (total, and per group when logged), then one panel per pair
    statistic (margin, accuracy, then any other) with a line per pair type present."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = []
    groups = [k for k in keys if k.startswith(f"{LOSS}/") and _numeric(rows, k)]
    loss_lines = [Line(LOSS, "loss", LOSS_COLOUR, 2.2)] if _numeric(rows, LOSS) else []
    loss_lines += [
        Line(k, k.split("/", 1)[1], GROUP_COLOURS[i % len(GROUP_COLOURS)], 1.2) for i, k in enumerate(groups)
    ]
    if loss_lines:
        out.append(Panel("loss", "training loss", tuple(loss_lines)))
    by_stat: dict[str, list[str]] = {}
    for key in keys:
        match = PAIR_KEY.match(key)
        if match and _numeric(rows, key):
            by_stat.setdefault(match["stat"], []).append(match["pair"])
    order = [s for s in STAT_TITLES if s in by_stat] + sorted(set(by_stat) - set(STAT_TITLES))
    for stat in order:
        title, ylabel = STAT_TITLES.get(stat, (stat.replace("_", " "), stat))
        known = [p for p in PAIR_STYLE if p in by_stat[stat]]
        pairs = known + sorted(set(by_stat[stat]) - set(known))
        styles = [PAIR_STYLE.get(p, (GROUP_COLOURS[i % len(GROUP_COLOURS)], p)) for i, p in enumerate(pairs)]
        lines = tuple(
            Line(f"{pair}/{stat}", label, colour) for pair, (colour, label) in zip(pairs, styles, strict=True)
        )
        bounds = (-0.04, 1.04) if stat == "accuracy" else None
        out.append(Panel(title, ylabel, lines, bounds, zero_line=stat == "margin"))
    return out


def _values(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """One float per step; NaN where the step has no (finite) value, which matplotlib leaves as a gap."""
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[i] = float(value)
    return out


def rolling_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values among the last `window` steps (NaN where there are none)."""
    finite = np.isfinite(y)
    sums = np.cumsum(np.where(finite, y, 0.0))
    counts = np.cumsum(finite)
    lagged_sums = np.concatenate([np.zeros(window), sums[:-window]])[: len(y)]
    lagged_counts = np.concatenate([np.zeros(window), counts[:-window]])[: len(y)]
    n = counts - lagged_counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums - lagged_sums) / np.maximum(n, 1), np.nan)


def plot_training(method: str, rows: Sequence[dict[str, Any]]) -> bytes | None:
    """One figure for one training: a panel per `panels(rows)` entry, steps on x. None when there is
    nothing to draw (no rows, or no numeric metric)."""
    chosen = panels(rows)
    if not rows or not chosen:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    window = max(2, len(rows) // 25) if len(rows) >= SMOOTH_FROM else 0
    epochs = [r.get("epoch") for r in rows]
    starts = [steps[i] - 0.5 for i in range(1, len(rows)) if epochs[i] != epochs[i - 1]]
    ncols = min(COLUMNS, len(chosen))
    nrows = -(-len(chosen) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 0.6, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(chosen) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, chosen, strict=False):
        for line in panel.lines:
            y = _values(rows, line.key)
            marker = "o" if len(rows) <= 20 else None
            if window:
                ax.plot(steps, y, color=line.colour, linewidth=0.8, alpha=0.3)
                ax.plot(steps, rolling_mean(y, window), color=line.colour, linewidth=line.width,
                        label=line.label)  # fmt: skip
            else:
                ax.plot(steps, y, color=line.colour, linewidth=line.width, marker=marker, markersize=4,
                        label=line.label)  # fmt: skip
        for x in starts:
            ax.axvline(x, color="#bbbbbb", linestyle=":", linewidth=1)
        if panel.zero_line:
            ax.axhline(0.0, color="#999999", linewidth=0.8)
        if panel.bounds:
            ax.set_ylim(*panel.bounds)
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("step", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    smoothing = f"; bold: mean of the last {window} steps, faint: every step" if window else ""
    epoch_note = "; dotted: epoch starts" if starts else ""
    fig.suptitle(f"{method}: {len(rows)} steps{smoothing}{epoch_note}", fontsize=12)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_training_figures(layout: RunLayout, methods: Sequence[str]) -> dict[str, str]:
    """`figures/training_<method>.png` for every method in `methods` that left a metrics.jsonl with
    something to plot; returns {method: figure URI}, in `methods`' order."""
    written = {}
    for method in methods:
        png = plot_training(method, read_history(metrics_uri(layout, method)))
        if png is not None:
            written[method] = dio.write_bytes(layout.figure(figure_name(method)), png)
    return written


def training_section(links: Mapping[str, str], trained: Sequence[str]) -> list[str]:
    """The report's "Training curves" lines: a figure per method in `links` (method -> relative link);
    trained methods without curves are named, so a missing figure is never silent. Nothing when no
    method is trained."""
    if not trained:
        return []
    out = [
        "## Training curves",
        "",
        "Per step, from each training's `models/<method>/metrics.jsonl`: the loss (and its parts per group "
        "of rows), and for the DPO family the reward margin and reward accuracy per pair type (chosen vs "
        "rejected response). A pair type without rows in a step is a gap.",
        "",
    ]
    for method in trained:  # a paragraph each: the figures are wide
        out += [f"![training curves: {method}]({links[method]})", ""] if method in links else []
    missing = [m for m in trained if m not in links]
    if missing:
        out += [f"No training metrics for: {', '.join(missing)}.", ""]
    return out
