"""`report.md`: the paper's tables and the intrinsic-boundary figures for one run directory.

Layout (DESIGN.md 1.3, the paper's section 4):
1. in-domain table: Acc / RefR / s_trust per in-domain test set (split `id_test`);
2. out-of-domain table: Acc / RefR / s_trust per OOD set (split `ood_test`) and their average s_trust;
3. unanswerable table: refusal rate per unanswerable set (split `unanswerable_test`, the extrinsic
   boundary: no answer is right, so refusing is the only good response); then the validation table
   (split `val`: what settings are chosen on, kept apart from the test tables);
4. the training recipe of every trained method (objective, beta, sft_weight, the rate it used, schedule,
   epochs, LoRA or full fine-tuning, start model), so a table is never read apart from how it was made,
   and its training curves (loss; reward margin and accuracy per pair type for DPO: `training_curves`);
5. the intrinsic boundary: refusal rate and accuracy among answered by the base model's confidence bin,
   as PNG figures (relative links) and the exact numbers beside them.
Methods are listed, ordered and described by the method table (`inbol_ray.methods`); every location is
the run layout's (`inbol_ray.run_layout`), so a run directory on object storage reads the same way.
Tables group data sets by the `split` column of `items`, never by name, so real benchmarks and
ShapesWorld read the same way. Numbers are percentages with two decimals, as in the paper; the best value
of each s_trust column (and of each unanswerable refusal-rate column) is bold.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import pandas as pd

from inbol_ray import methods as M
from inbol_ray import schema as S
from inbol_ray.data import io as dio
from inbol_ray.eval.denominators import data_section, with_datasets
from inbol_ray.eval.figures import (
    ACCURACY_FIGURE,
    GROUP,
    REFUSAL_FIGURE,
    bin_label,
    boundary_table,
    write_boundary_figures,
)
from inbol_ray.eval.markdown import markdown_table
from inbol_ray.eval.recipe import recipe_section
from inbol_ray.eval.reference_band import band_section
from inbol_ray.eval.training_curves import training_section, write_training_figures
from inbol_ray.metrics import ANSWERED_ACC, BIN_HI, BIN_LO, REFUSAL_RATE
from inbol_ray.run_layout import RunLayout

SPLIT_GROUPS = {"id_test": "in-domain", "ood_test": "out-of-domain"}
"""Which splits the boundary figures plot (answerable test items), and their panel titles."""

HOW_TO_READ = """\
**How to read.** Every response scores +1 if correct, 0 if it is a refusal, -1 if wrong. *Acc* is the
share of items answered correctly, *RefR* the share refused, and **s_trust = 2·Acc + RefR − 100** (all
three in %; 2·Acc + RefR − 1 as fractions) is the average score ×100: from −100 (always wrong) through 0
(always refuses) to 100 (always right). Refusing
raises s_trust exactly when the refused answers would have been wrong, so a method that learned where
its knowledge ends gains s_trust even if its Acc drops. All numbers are percentages; **bold** marks the
best method per column. Differences of a point or two on a few hundred items can be noise: compare
two runs with `python -m jobs.compare RUN_A RUN_B` for bootstrap 95% confidence intervals."""


def pct(value: float) -> str:
    """A fraction as the paper prints it: x100, two decimals (e.g. 0.6210 -> 62.10)."""
    if pd.isna(value):
        return "–"
    # Half-up on the decimal value, after cutting float noise: (0.3075 + 0.19) / 2 prints 24.88, not 24.87.
    exact = Decimal(repr(round(100.0 * float(value), 9)))
    return str(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def short_names(datasets: Sequence[str]) -> dict[str, str]:
    """Column labels: the sets' common `_`-separated prefix dropped (shapes_ood_scene -> scene)."""
    if len(datasets) < 2:
        return {d: d for d in datasets}
    prefix = os.path.commonprefix(list(datasets))
    prefix = prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""
    return {d: d[len(prefix) :] or d for d in datasets}


def method_order(names: Sequence[str]) -> list[str]:
    """`names` in the method table's order (base, baselines, then the trained methods); unknown names last."""
    known = [m for m in M.METHODS if m in names]
    return known + sorted(set(names) - set(known))


def methods_line(names: Sequence[str], others: Mapping[str, str] | None = None) -> str:
    """What each reported model is: a method's summary from the method table; for other models scored on
    the same sets (`others`: name -> where it came from, `eval.models`) that description."""
    others = others or {}
    parts = [
        f"`{m}` ({M.METHODS[m].summary})"
        if m in M.METHODS
        else f"`{m}` ({others[m]})"
        if m in others
        else f"`{m}`"
        for m in names
    ]
    return "Methods: " + "; ".join(parts) + "."


def _bold_best(cells: list[str], values: list[float]) -> list[str]:
    finite = [v for v in values if not pd.isna(v)]
    if len(finite) < 2 or max(finite) - min(finite) < 1e-12:  # nothing to single out
        return cells
    best = max(finite)
    return [
        f"**{c}**" if not pd.isna(v) and abs(v - best) < 1e-12 else c
        for c, v in zip(cells, values, strict=True)
    ]


def split_table(
    metrics: pd.DataFrame,
    datasets: Sequence[str],
    methods: Sequence[str],
    columns: Sequence[str],
    average: bool,
) -> str:
    """Methods as rows; per data set the given metric columns; optionally the mean s_trust over sets."""
    index = metrics.set_index([S.METHOD, S.DATASET])
    labels = short_names(datasets)
    names = {S.ACC: "Acc", S.REFR: "RefR", S.S_TRUST: "s_trust"}
    # One set: plain metric names (the line under the table names the set).
    header = ["Method"] + [f"{labels[d]} {names[c]}".strip() if len(datasets) > 1 else names[c]
                           for d in datasets for c in columns]  # fmt: skip
    grid: list[list[float]] = []
    for method in methods:
        row = [
            index.loc[(method, d), c] if (method, d) in index.index else float("nan")
            for d in datasets
            for c in columns
        ]
        if average:
            trust = [index.loc[(method, d), S.S_TRUST] for d in datasets if (method, d) in index.index]
            row.append(sum(trust) / len(trust) if len(trust) == len(datasets) else float("nan"))
        grid.append(row)
    if average:
        header.append("Avg s_trust")
    cells = [[pct(v) for v in row] for row in grid]
    # bold the best s_trust per set (and the average); on unanswerable-only tables the best RefR
    targets = [i for i, h in enumerate(header[1:]) if h.endswith("s_trust")] or list(range(len(header) - 1))
    for j in targets:
        column = _bold_best([r[j] for r in cells], [r[j] for r in grid])
        for r, c in zip(cells, column, strict=True):
            r[j] = c
    return markdown_table(header, [[m, *r] for m, r in zip(methods, cells, strict=True)])


def sets_line(metrics: pd.DataFrame, datasets: Sequence[str]) -> str:
    """Which set each column is and how many items it has (n is the same for every method)."""
    labels = short_names(datasets)
    n = metrics.groupby(S.DATASET)[S.N].max()
    parts = [
        f"{labels[d]} = `{d}` (n={int(n[d])})" if labels[d] != d else f"`{d}` (n={int(n[d])})"
        for d in datasets
    ]
    return ("Sets: " if len(parts) > 1 else "Set: ") + "; ".join(parts) + "."


def bins_table(boundary: pd.DataFrame, group: str, methods: Sequence[str]) -> str:
    """Exact values behind one figure panel: refusal rate / accuracy among answered per bin."""
    part = boundary[boundary[GROUP] == group]
    edges = part[[BIN_LO, BIN_HI, S.N]].drop_duplicates(subset=[BIN_LO]).sort_values(BIN_LO)
    header = ["Method"] + [
        f"{bin_label(lo, hi, i == len(edges) - 1)} n={n}"
        for i, (lo, hi, n) in enumerate(edges.itertuples(index=False))
    ]
    rows = []
    for method in methods:
        line = part[part[S.METHOD] == method].sort_values(BIN_LO)
        if line.empty:
            continue
        cells = [f"{pct(r)} / {pct(a)}" for r, a in zip(line[REFUSAL_RATE], line[ANSWERED_ACC], strict=True)]
        rows.append([method, *cells])
    return markdown_table(header, rows)


@dataclass(frozen=True)
class Section:
    split: str
    title: str
    columns: tuple[str, ...]
    average: bool
    caption: str


TRUST_COLUMNS = (S.ACC, S.REFR, S.S_TRUST)
SECTIONS = (
    Section("id_test", "In-domain", TRUST_COLUMNS, True, ""),
    Section("ood_test", "Out-of-domain", TRUST_COLUMNS, True, ""),
    Section(
        "unanswerable_test",
        "Unanswerable: refusal rate (extrinsic boundary)",
        (S.REFR,),
        False,
        " No answer to these questions is right (the image lacks the information): higher RefR is better.",
    ),
    Section(
        "val",
        "Validation (where settings are chosen)",
        TRUST_COLUMNS,
        False,
        " Answerable and unanswerable items together (an unanswerable one scores 0 if refused, -1 if answered);"
        " hyper-parameters and world choices are compared here, never on the test sets above.",
    ),
)
"""The paper's tables, in order: which split feeds each and which metric columns it shows."""


def split_sections(metrics: pd.DataFrame, splits: Mapping[str, str]):
    """(section, its evaluated sets, whether it gets an average column) for every split section the run has
    sets in, in the report's order: what the report and the model card both lay their tables out by."""
    evaluated = sorted(metrics[S.DATASET].unique())
    for section in SECTIONS:
        datasets = [d for d in evaluated if splits.get(d) == section.split]
        if datasets:
            yield section, datasets, section.average and len(datasets) > 1


def render_report(
    metrics: pd.DataFrame,
    splits: Mapping[str, str],
    methods: Sequence[str],
    boundary: pd.DataFrame | None = None,
    figures: Sequence[str] = (),
    *,
    run_dir: str = "",
    note: str = "",
    recipe: Sequence[str] = (),
    others: Mapping[str, str] | None = None,
    data: Sequence[str] = (),
    training: Sequence[str] = (),
    band: Sequence[str] = (),
) -> str:
    """The Markdown text (pure: no I/O). `splits`: data set -> split; `figures`: relative PNG links;
    `data`: the denominators section's lines (`denominators.data_section`), after the result tables;
    `recipe`: the training-recipe section's lines (`recipe_section`), placed after the result tables;
    `training`: the training-curves section's lines (`training_curves.training_section`), after the recipe;
    `others`: models that are not methods (name -> where they came from), listed after the methods;
    `band`: where this run falls against the seed band (`reference_band.band_section`), after the tables.

    Rows follow `methods` (the caller orders them, see `method_order`); evaluated methods not in
    `methods` come last.
    """
    order = [m for m in methods if m in set(metrics[S.METHOD])]
    order += sorted(set(metrics[S.METHOD]) - set(order))
    out = ["# InBoL evaluation report", ""]
    if run_dir:
        out.append(f"Run `{run_dir}`, written {time.strftime('%Y-%m-%d %H:%M')}.")
    out.append(methods_line(order, others))
    missing = [m for m in methods if m not in order]
    if missing:
        out.append(f"Not evaluated (no checkpoint or not run): {', '.join(missing)}.")
    out += ["", HOW_TO_READ, ""]
    evaluated = sorted(metrics[S.DATASET].unique())
    for section, datasets, average in split_sections(metrics, splits):
        caption = section.caption + (" Avg s_trust: the unweighted mean over the sets." if average else "")
        out += [
            f"## {section.title}",
            "",
            split_table(metrics, datasets, order, section.columns, average),
            "",
        ]
        out += [(sets_line(metrics, datasets) + caption).strip(), ""]
    other = [d for d in evaluated if splits.get(d) not in {section.split for section in SECTIONS}]
    if other:
        out += ["## Other sets", "", split_table(metrics, other, order, TRUST_COLUMNS, False), ""]
        out += [sets_line(metrics, other), ""]
    out += list(band)
    out += list(data)
    out += list(recipe)
    out += list(training)
    out += ["## Intrinsic boundary", ""]
    if boundary is None or boundary.empty:
        out += [note or "No base-model confidence for the test items: figures skipped.", ""]
        return "\n".join(out)
    out += [
        "Answerable test items binned by the **base** model's confidence (the share of its K sampled answers "
        "that were right). A method that knows its boundary refuses often in the low bins and rarely in the "
        "high ones, and is right more often when it does answer a low-confidence item.",
        "",
    ]
    out += [f"![{os.path.splitext(os.path.basename(f))[0].replace('_', ' ')}]({f})" for f in figures] + [""]
    for group in dict.fromkeys(boundary[GROUP]):
        out += [
            f"**{group}**: refusal rate / accuracy among answered (%) per confidence bin "
            "(– = nothing answered).",
            "",
            bins_table(boundary, group, order),
            "",
        ]
    return "\n".join(out)


def read_item_keys(items_uri: str) -> pd.DataFrame:
    """id, dataset, split, answerable of every item: no images, cheap even for large tables."""
    return dio.read_table(items_uri, columns=[S.ID, S.DATASET, S.SPLIT, S.ANSWERABLE]).to_pandas()


def dataset_splits(keys: pd.DataFrame) -> dict[str, str]:
    """data set -> split, from `read_item_keys`' frame: what every table groups sets by (never names)."""
    return keys.drop_duplicates(S.DATASET).set_index(S.DATASET)[S.SPLIT].to_dict()


def write_report(cfg, layout: RunLayout, *, log: Callable[[str], None] = print) -> str:
    """Write the layout's `report.md` and figures from the run's metrics, predictions and base confidence.

    `cfg` (a `Config`): `eval.methods` are the rows (in the method table's order), `eval.conf_bins` the
    confidence bins of the figures, `train` (and `model.dtype`) the recipe printed for every method the
    pipeline trains for them (`methods.training_order`), with each one's training curves from its
    `metrics.jsonl` (`training_curves`). The boundary figures need the base model's confidence at
    `layout.base_confidence`; without it the report says so and skips them. Returns the report's URI.
    """
    from inbol_ray.eval.base_confidence import read_confidence
    from inbol_ray.eval.models import registered

    others = {name: model.describe() for name, model in registered(layout).items()}
    methods = method_order(cfg.eval.methods) + list(others)
    metrics = dio.read_table(layout.metrics).to_pandas()
    keys = read_item_keys(layout.items)
    splits = dataset_splits(keys)
    conf_uri = layout.base_confidence
    boundary, links, note = None, [], ""
    if dio.exists(conf_uri):
        predictions = dio.read_table(layout.predictions).to_pandas()
        # Only answerable items: an unanswerable one has conf 0 by definition, not by the model's doing.
        predictions = predictions[predictions[S.ID].isin(keys.loc[keys[S.ANSWERABLE], S.ID])]
        groups = {d: SPLIT_GROUPS[s] for d, s in splits.items() if s in SPLIT_GROUPS}
        boundary = boundary_table(predictions, read_confidence(conf_uri), groups, cfg.eval.conf_bins)
        written = write_boundary_figures(boundary, layout, methods)
        links = [
            relative(layout, written[name]) for name in (REFUSAL_FIGURE, ACCURACY_FIGURE) if name in written
        ]
    else:
        note = f"No base-model confidence table at `{conf_uri}`: figures skipped."
        log(f"report: {note}")
    trained = M.training_order(cfg.eval.methods, cfg.train.dpo_init)
    recipe = recipe_section(cfg, trained)
    curves = {m: relative(layout, uri) for m, uri in write_training_figures(layout, trained).items()}
    data = _data_section(layout, keys, splits, metrics)
    text = render_report(
        metrics,
        splits,
        methods,
        boundary,
        links,
        run_dir=layout.root,
        note=note,
        recipe=recipe,
        others=others,
        data=data,
        training=training_section(curves, trained),
        band=band_section(cfg, metrics, splits),
    )
    return dio.write_bytes(layout.report, text.encode())  # its callers say where it is


def _data_section(
    layout: RunLayout, keys: pd.DataFrame, splits: Mapping[str, str], metrics: pd.DataFrame
) -> list[str]:
    """The denominators section from the prepare manifest and the prepare and evaluation quarantines."""
    from inbol_ray.data.mismatch import summary as mismatch_summary
    from inbol_ray.manifest import read_manifest

    found = read_manifest(layout.manifest("prepare")) or {}
    counts = found.get("counts") or {}
    per_set = {name: c for name, c in counts.items() if isinstance(c, dict) and "read" in c}
    item_sets = dict(zip(keys[S.ID], keys[S.DATASET], strict=True))
    sets = sorted(per_set)

    def quarantine(stage: str) -> pd.DataFrame:
        uri = layout.quarantine(stage)
        frame = (
            dio.read_table(uri).to_pandas()
            if dio.exists(uri)
            else pd.DataFrame(columns=[S.ROW_KEY, S.REASON])
        )
        return with_datasets(frame, item_sets, sets)

    none = pd.DataFrame(columns=[S.ROW_KEY, S.REASON, S.DATASET])
    evaluated = pd.concat(
        [quarantine(f"evaluate_{m}") for m in sorted(set(metrics[S.METHOD]))] or [none], ignore_index=True
    )
    mismatch = counts.get("mismatch")
    line = f"Mismatched unanswerable training rows: {mismatch_summary(mismatch)}." if mismatch else ""
    return data_section(per_set, splits, metrics, evaluated, quarantine("prepare"), line)


def relative(layout: RunLayout, uri: str) -> str:
    """A location beside or under the report as the relative link the report writes (figures/x.png)."""
    folder = dio.parent(layout.report) + "/"
    return uri[len(folder) :] if uri.startswith(folder) else uri
