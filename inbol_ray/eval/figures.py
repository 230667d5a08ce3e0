"""Intrinsic-boundary figures (paper section 4.3): per method, refusal rate and accuracy among answered
items, by bin of the *base* model's confidence on each test item.

Why these two plots: a method that learned its information boundary refuses where the base model was
unsure (high refusal in low-confidence bins, low in high ones) and, when it does answer a low-confidence
item, is right more often. Bins are the same items for every method, so each bin's item count is printed
once under the x axis; a bin where a method answered nothing is a gap in its line, never a 0.

Matplotlib runs on the Agg backend (no display); PNGs are written through pyarrow filesystems so a run
directory on object storage works too.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from inbol_ray import schema as S  # noqa: E402
from inbol_ray.data import io as dio  # noqa: E402
from inbol_ray.metrics import ANSWERED_ACC, BIN_HI, BIN_LO, REFUSAL_RATE, boundary_curves  # noqa: E402
from inbol_ray.run_layout import RunLayout  # noqa: E402

GROUP = "group"
N_ANSWERED = "n_answered"
REFUSAL_FIGURE = "refusal_by_confidence.png"
ACCURACY_FIGURE = "answered_accuracy_by_confidence.png"
FIXED_STYLE = {
    "base": ("#444444", "-", "o"),
    "refusal_prompt": ("#888888", "--", "s"),
    "cadpo": ("#d62728", "-", "*"),
}
"""Untrained baselines in greys and the paper's method in red, so the comparison of interest stands out."""
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
"""tab10 without its red and grey (taken by FIXED_STYLE)."""
MARKERS = ("^", "D", "v", "P", "X", "h", "<", ">")
MIN_ANSWERED = 10
"""Accuracy-among-answered points resting on fewer answered items are drawn hollow: they are noisy."""


def boundary_table(
    predictions: pd.DataFrame, conf: pd.DataFrame, groups: Mapping[str, str], bins: int | Sequence[float]
) -> pd.DataFrame:
    """One row per (method, group, bin): n, refusal_rate, answered_acc, n_answered (fractions).

    `predictions`: the predictions table; `conf`: id, conf of the base model; `groups`: data set -> panel
    label (e.g. "in-domain"); items without a conf (unanswerable sets, or sets not sampled) are left out.
    """
    joined = predictions.merge(conf[[S.ID, S.CONF]], on=S.ID, how="inner")
    joined = joined[joined[S.DATASET].isin(list(groups))].assign(
        **{GROUP: lambda f: f[S.DATASET].map(groups)}
    )
    frames = []
    for (method, group), part in joined.groupby([S.MODEL, GROUP], sort=False):
        curve = boundary_curves(
            part[S.CONF].to_numpy(), part[S.CORRECT].to_numpy(), part[S.REFUSED].to_numpy(), bins
        )
        curve[N_ANSWERED] = (curve[S.N] * (1.0 - curve[REFUSAL_RATE].fillna(1.0))).round().astype(int)
        frames.append(curve.assign(**{S.METHOD: method, GROUP: group}))
    columns = [S.METHOD, GROUP, BIN_LO, BIN_HI, S.N, REFUSAL_RATE, ANSWERED_ACC, N_ANSWERED]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def bin_label(lo: float, hi: float, last: bool) -> str:
    """[lo, hi) per bin, the last one closed: conf 1.0 (all K samples right) belongs to the top bin."""
    return f"[{lo:g}, {hi:g}{']' if last else ')'}"


def method_styles(methods: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """(colour, line style, marker) per method, stable across both figures."""
    styles, k = {}, 0
    for method in methods:
        if method in FIXED_STYLE:
            styles[method] = FIXED_STYLE[method]
        else:
            styles[method] = (PALETTE[k % len(PALETTE)], "-", MARKERS[k % len(MARKERS)])
            k += 1
    return styles


def plot_boundary(
    table: pd.DataFrame, value: str, *, title: str, ylabel: str, methods: Sequence[str]
) -> bytes:
    """One panel per group, one line per method; returns the PNG bytes."""
    groups = list(dict.fromkeys(table[GROUP]))
    present = [m for m in methods if m in set(table[S.METHOD])]
    present += sorted(set(table[S.METHOD]) - set(present))
    styles = method_styles(present)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.2 * len(groups) + 1.8, 4.4), sharey=True, squeeze=False
    )
    for ax, group in zip(axes[0], groups, strict=True):
        part = table[table[GROUP] == group]
        edges = part[[BIN_LO, BIN_HI, S.N]].drop_duplicates(subset=[BIN_LO]).sort_values(BIN_LO)
        x = np.arange(len(edges))
        for method in present:
            line = part[part[S.METHOD] == method].sort_values(BIN_LO)
            if line.empty:
                continue
            colour, dash, marker = styles[method]
            y = 100.0 * line[value].to_numpy(dtype=float)
            size = 9 if marker == "*" else 6
            ax.plot(x, y, color=colour, linestyle=dash, marker=marker, markersize=size,
                    linewidth=2.4 if method == "cadpo" else 1.6, label=method)  # fmt: skip
            if value == ANSWERED_ACC:
                few = line[N_ANSWERED].to_numpy() < MIN_ANSWERED
                ax.plot(x[few], y[few], linestyle="none", marker=marker, markersize=size,
                        markerfacecolor="white", markeredgecolor=colour)  # fmt: skip
        labels = [
            f"{bin_label(lo, hi, i == len(edges) - 1)}\nn={n}"
            for i, (lo, hi, n) in enumerate(edges.itertuples(index=False))
        ]
        ax.set_xticks(x, labels, fontsize=9)
        ax.set_xlim(-0.3, len(edges) - 0.7)
        ax.set_ylim(-4, 104)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{group} ({int(edges[S.N].sum())} answerable items)", fontsize=11)
        ax.set_xlabel("base model's confidence (share of K sampled answers correct)", fontsize=10)
    axes[0][0].set_ylabel(ylabel, fontsize=10)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), title="method", frameon=False)
    if value == ANSWERED_ACC:
        fig.text(0.01, -0.02, f"Hollow markers: fewer than {MIN_ANSWERED} items answered in the bin "
                 "(noisy). A gap: nothing answered.", fontsize=9, color="#555555")  # fmt: skip
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_boundary_figures(table: pd.DataFrame, layout: RunLayout, methods: Sequence[str]) -> dict[str, str]:
    """Both figures as PNGs at `layout.figure(name)`; returns {file name: URI}. Nothing is written for an
    empty table."""
    if table.empty:
        return {}
    specs = {
        REFUSAL_FIGURE: (REFUSAL_RATE, "Refusal rate by the base model's confidence", "refusal rate (%)"),
        ACCURACY_FIGURE: (
            ANSWERED_ACC,
            "Accuracy among answered items by the base model's confidence",
            "accuracy among answered (%)",
        ),
    }
    written = {}
    for name, (value, title, ylabel) in specs.items():
        uri = layout.figure(name)
        dio.write_bytes(uri, plot_boundary(table, value, title=title, ylabel=ylabel, methods=methods))
        written[name] = uri
    return written
