"""What each set held and what was scored: the denominators behind every rate in the report.

A rate is only as honest as its denominator. Rows drop out on the way from a file to a metric: a loader
quarantines a row it cannot parse, prepare an image that does not decode, `sample_rows` leaves rows out of
a subset on purpose, and generation quarantines a prompt longer than the model's context. Each of these
silently changes what "Acc on MMBench" means, so the report shows, per set, the rows read, left out,
quarantined (with the most common reason) and evaluated. It also shows the training mix the run trained on.
Pure: the caller reads the prepare manifest, the quarantine tables and the metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import pandas as pd

from inbol_ray import schema as S
from inbol_ray.eval.markdown import markdown_table


def _reason(reasons: Counter[str]) -> str:
    """The most common reason, shortened to its kind (text before a colon or parenthesis)."""
    if not reasons:
        return ""
    reason, n = reasons.most_common(1)[0]
    kind = reason.split(":")[0].split(" (")[0].strip()
    more = f"; {len(reasons) - 1} other reason(s)" if len(reasons) > 1 else ""
    return f"{kind} ({n}{more})"


def denominators_table(
    prepare_counts: Mapping[str, Mapping[str, int]],
    splits: Mapping[str, str],
    metrics: pd.DataFrame,
    eval_quarantine: pd.DataFrame,
    prepare_quarantine: pd.DataFrame | None = None,
) -> str:
    """One row per set: split, read, not sampled, quarantined by prepare (and why), items, evaluated, and
    quarantined at evaluation (and why: e.g. a prompt longer than the model's context).

    `prepare_counts`: the prepare manifest's per-set counts (read, items, quarantined, not_sampled);
    `eval_quarantine`: the evaluation stages' quarantine rows with a `dataset` column added (the caller
    maps row keys to sets through the items table; one item quarantined for several methods counts once);
    `prepare_quarantine`: prepare's quarantine rows with `dataset`, for the reasons (optional).
    """
    n_eval = metrics.groupby(S.DATASET)[S.N].max() if len(metrics) else pd.Series(dtype=int)
    eval_q = (
        eval_quarantine.drop_duplicates([S.DATASET, S.ROW_KEY]) if len(eval_quarantine) else eval_quarantine
    )
    rows = []
    order = {"train": 0, "val": 1, "id_test": 2, "ood_test": 3, "unanswerable_test": 4}
    names = sorted(
        set(prepare_counts) | set(n_eval.index), key=lambda d: (order.get(splits.get(d, ""), 9), d)
    )
    for name in names:
        counts = prepare_counts.get(name, {})
        split = splits.get(name, "")
        prep_reasons = (
            Counter(prepare_quarantine.loc[prepare_quarantine[S.DATASET] == name, S.REASON])
            if prepare_quarantine is not None and len(prepare_quarantine)
            else Counter()
        )
        eval_reasons = Counter(eval_q.loc[eval_q[S.DATASET] == name, S.REASON]) if len(eval_q) else Counter()
        evaluated = int(n_eval[name]) if name in n_eval.index else None
        rows.append(
            [
                f"`{name}`",
                split or "–",
                str(counts.get("read", "–")),
                str(counts.get("not_sampled", 0)),
                " ".join(p for p in (str(counts.get("quarantined", 0)), _reason(prep_reasons)) if p),
                str(counts.get("items", "–")),
                "–" if evaluated is None else str(evaluated),
                "–"
                if split == "train"
                else " ".join(p for p in (str(sum(eval_reasons.values())), _reason(eval_reasons)) if p),
            ]
        )
    header = ["Set", "Split", "Read", "Not sampled", "Quarantined (prepare)", "Items", "Evaluated",
              "Quarantined (evaluation)"]  # fmt: skip
    return markdown_table(header, rows, numeric_from=2)


def training_mix(prepare_counts: Mapping[str, Mapping[str, int]], splits: Mapping[str, str]) -> str:
    """The training sets' share of training items, one phrase each ("vqav2 50000 (65.8%)")."""
    train = {d: int(c.get("items", 0)) for d, c in prepare_counts.items() if splits.get(d) == "train"}
    total = sum(train.values())
    if not total:
        return ""
    parts = [f"`{d}` {n} ({100 * n / total:.1f}%)" for d, n in sorted(train.items(), key=lambda kv: -kv[1])]
    return f"Training mix ({total} items): " + ", ".join(parts) + "."


def data_section(
    prepare_counts: Mapping[str, Mapping[str, int]] | None,
    splits: Mapping[str, str],
    metrics: pd.DataFrame,
    eval_quarantine: pd.DataFrame,
    prepare_quarantine: pd.DataFrame | None = None,
    mismatch_line: str = "",
) -> list[str]:
    """The report's "Data" section lines (nothing without the prepare manifest's counts)."""
    if not prepare_counts:
        return []
    lines = [
        "## Data: what each set held and what was scored",
        "",
        denominators_table(prepare_counts, splits, metrics, eval_quarantine, prepare_quarantine),
        "",
        "Read: rows in the set's files; not sampled: usable rows left out of a `sample_rows` subset; quarantined "
        "rows (an unreadable row or image at prepare, a prompt too long for the model at evaluation) are in "
        "the run's `quarantine/` tables with their reasons. Every rate above is over Evaluated.",
        "",
    ]
    for line in (training_mix(prepare_counts, splits), mismatch_line):
        if line:
            lines += [line, ""]
    return lines


def with_datasets(
    quarantine: pd.DataFrame, item_sets: Mapping[str, str], sets: Sequence[str] = ()
) -> pd.DataFrame:
    """Quarantine rows with the `dataset` of their item (row keys are item ids); rows of unknown items are
    attributed by their id's prefix (`<dataset>:<key>`, the loaders' ids) or to `sets` when only one."""
    if not len(quarantine):
        return quarantine.assign(**{S.DATASET: pd.Series(dtype=str)})

    def which(key: str) -> str:
        if key in item_sets:
            return item_sets[key]
        return sets[0] if len(sets) == 1 else key.split(":", 1)[0]

    return quarantine.assign(**{S.DATASET: [which(str(k)) for k in quarantine[S.ROW_KEY]]})
