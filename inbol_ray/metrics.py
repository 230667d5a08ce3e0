"""The user-centric trust score and the intrinsic-boundary curves (DESIGN.md 1.3).

Each response scores +1 correct, 0 refusal, -1 wrong, so s_trust = mean(score) = 2*acc + refr - 1: a model
gains by refusing exactly the items it would get wrong. Everything here is a fraction; reports multiply
by 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from inbol_ray import schema

# Columns of the boundary-curve table (a plotting frame, not a stage table, hence local names).
BIN_LO = "bin_lo"
BIN_HI = "bin_hi"
REFUSAL_RATE = "refusal_rate"
ANSWERED_ACC = "answered_acc"
BOUNDARY_CURVE_COLUMNS = (BIN_LO, BIN_HI, schema.N, REFUSAL_RATE, ANSWERED_ACC)


def _as_bool_array(values: Sequence[bool], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array.astype(bool)


def _check(correct: Sequence[bool], refused: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    c, r = _as_bool_array(correct, "correct"), _as_bool_array(refused, "refused")
    if len(c) != len(r):
        raise ValueError(f"correct ({len(c)}) and refused ({len(r)}) differ in length")
    both = np.flatnonzero(c & r)
    if both.size:
        raise ValueError(f"item {int(both[0])} is both correct and refused (a refusal is never correct)")
    return c, r


def trust_scores(correct: Sequence[bool], refused: Sequence[bool]) -> dict[str, float]:
    """acc, refr and s_trust = 2*acc + refr - 1 over a set of responses, as fractions."""
    c, r = _check(correct, refused)
    if len(c) == 0:
        raise ValueError("trust_scores needs at least one response")
    acc, refr = float(c.mean()), float(r.mean())
    return {schema.ACC: acc, schema.REFR: refr, schema.S_TRUST: 2.0 * acc + refr - 1.0}


def metrics_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, dataset): n, acc, refr, s_trust, in schema.METRICS_TABLE's column order.

    `predictions` carries the method in schema.MODEL (its name in the predictions layout) or schema.METHOD.
    """
    key = schema.METHOD if schema.METHOD in predictions.columns else schema.MODEL
    rows = []
    for (method, dataset), group in predictions.groupby([key, schema.DATASET], sort=True):
        scores = trust_scores(group[schema.CORRECT].to_numpy(), group[schema.REFUSED].to_numpy())
        rows.append({schema.METHOD: method, schema.DATASET: dataset, schema.N: len(group), **scores})
    return pd.DataFrame(rows, columns=schema.METRICS_TABLE.names)


def bin_edges(bins: int | Sequence[float]) -> np.ndarray:
    """Equal-width edges over [0, 1] for an int, else the given increasing edges.

    Edges are rounded to 12 decimals so that conf = k/K lands on the intended side of an edge
    (np.linspace(0, 1, 6)[3] is 0.6000000000000001, which would put conf 0.6 in the bin below).
    """
    edges = np.linspace(0.0, 1.0, bins + 1) if isinstance(bins, int) else np.asarray(bins, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be a positive int or at least two increasing edges, got {bins!r}")
    return np.round(edges, 12)


def boundary_curves(
    conf: Sequence[float], correct: Sequence[bool], refused: Sequence[bool], bins: int | Sequence[float] = 5
) -> pd.DataFrame:
    """Refusal rate and accuracy among answered items per bin of (base-model) confidence.

    Bins are [lo, hi) except the last, which includes its upper edge (conf 1.0). A bin with no items, or
    with nothing answered, reports NaN rather than 0: "no data" must not plot as "always wrong".
    """
    c, r = _check(correct, refused)
    x = np.round(np.asarray(conf, dtype=float), 12)
    if len(x) != len(c):
        raise ValueError(f"conf ({len(x)}) and correct ({len(c)}) differ in length")
    edges = bin_edges(bins)
    outside = (x < edges[0]) | (x > edges[-1]) | np.isnan(x)
    if outside.any():
        raise ValueError(f"conf {x[outside][0]} is outside the bin edges [{edges[0]}, {edges[-1]}]")
    index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        member = index == b
        n = int(member.sum())
        answered = member & ~r
        n_answered = int(answered.sum())
        rows.append(
            {
                BIN_LO: float(edges[b]),
                BIN_HI: float(edges[b + 1]),
                schema.N: n,
                REFUSAL_RATE: float(r[member].mean()) if n else float("nan"),
                ANSWERED_ACC: float(c[answered].mean()) if n_answered else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=list(BOUNDARY_CURVE_COLUMNS))
