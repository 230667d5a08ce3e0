"""report.md and the boundary figures from a synthetic run directory (no Ray, no model).

The synthetic run has the shape of a real one (items with splits, predictions of several methods, the base
model's conf per answerable item) and deliberately neutral data set names: the tables must group sets by
the `split` column of items, never by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.eval.figures import ACCURACY_FIGURE, GROUP, N_ANSWERED, REFUSAL_FIGURE, boundary_table
from inbol_ray.eval.markdown import markdown_table
from inbol_ray.eval.recipe import recipe_section
from inbol_ray.eval.report import (
    HOW_TO_READ,
    pct,
    render_report,
    write_report,
)
from inbol_ray.metrics import ANSWERED_ACC, REFUSAL_RATE, metrics_table
from inbol_ray.run_layout import RunLayout

SETS = {"alpha": "id_test", "beta": "ood_test", "gamma": "ood_test", "delta": "unanswerable_test"}
METHODS = ["base", "refusal_prompt", "idk_it", "cadpo"]
REFUSE = {"base": 0.02, "refusal_prompt": 0.2, "idk_it": 0.6, "cadpo": 0.8}
"""Refusal propensity on low-confidence items (scaled by 1 - conf), like a boundary-aware method."""


def write_synthetic_run(run_dir: Path, n: int = 60, seed: int = 0) -> pd.DataFrame:
    """items (keys only), predictions, metrics and base conf as the evaluate stage writes them."""
    rng = np.random.default_rng(seed)
    items, conf, preds = [], [], []
    for dataset, split in SETS.items():
        answerable = split != "unanswerable_test"
        ids = [f"{dataset}:{i}" for i in range(n)]
        c = rng.integers(0, 11, size=n) / 10 if answerable else np.zeros(n)
        items += [{S.ID: i, S.DATASET: dataset, S.SPLIT: split, S.ANSWERABLE: answerable} for i in ids]
        if answerable:
            conf += [{S.ID: i, S.CONF: float(x)} for i, x in zip(ids, c, strict=True)]
        for method in METHODS:
            refused = rng.random(n) < REFUSE[method] * (1 - c)
            correct = ~refused & (rng.random(n) < c) & answerable
            preds += [
                {
                    S.MODEL: method,
                    S.DATASET: dataset,
                    S.ID: i,
                    S.RESPONSE: "x",
                    S.CORRECT: bool(k),
                    S.REFUSED: bool(r),
                }
                for i, k, r in zip(ids, correct, refused, strict=True)
            ]
    predictions = pd.DataFrame(preds)
    run = str(run_dir)
    dio.write_table(pa.Table.from_pylist(items), dio.join(run, "items", "part-0.parquet"))
    dio.write_table(pa.Table.from_pandas(predictions), dio.join(run, "predictions.parquet"))
    dio.write_table(pa.Table.from_pandas(metrics_table(predictions)), dio.join(run, "metrics.parquet"))
    dio.write_table(pa.Table.from_pylist(conf), dio.join(run, "eval", "base_confidence", "part-0.parquet"))
    return predictions


def report_of(run_dir: Path, methods: list[str]) -> str:
    """write_report as the pipeline calls it: the config's methods and bins, the run's layout."""
    cfg = Config()
    cfg.eval.methods = methods
    return write_report(cfg, RunLayout.of(cfg, str(run_dir)), log=lambda line: None)


def section(text: str, title: str) -> list[list[str]]:
    """Header and rows (cells, bold markers stripped) of the table under the heading `## {title}`."""
    body = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|") and not line.startswith("|-")]
    return [[c.strip().strip("*") for c in row.strip("|").split("|")] for row in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, str]:
    run_dir = tmp_path_factory.mktemp("synthetic_run")
    predictions = write_synthetic_run(run_dir)
    report = report_of(run_dir, ["dpo1", *reversed(METHODS)])  # rows follow the method table, not this
    return run_dir, predictions, Path(report).read_text()


def test_pct_prints_like_the_paper() -> None:
    assert pct(0.6210) == "62.10"
    assert pct(-0.306) == "-30.60"
    assert pct((0.3075 + 0.19) / 2) == "24.88"  # half-up, despite 24.874999... in binary
    assert pct(float("nan")) == "–"


def test_tables_follow_the_split_column_and_equal_the_metrics(run) -> None:
    run_dir, predictions, text = run
    metrics = metrics_table(predictions).set_index([S.METHOD, S.DATASET])
    in_domain = section(text, "In-domain")
    assert in_domain[0] == ["Method", "Acc", "RefR", "s_trust"]
    assert [r[0] for r in in_domain[1:]] == METHODS  # the given order, not alphabetical
    for row in in_domain[1:]:
        m = metrics.loc[(row[0], "alpha")]
        assert row[1:] == [pct(m[S.ACC]), pct(m[S.REFR]), pct(m[S.S_TRUST])]
    ood = section(text, "Out-of-domain")
    assert ood[0] == ["Method"] + [
        f"{d} {c}" for d in ("beta", "gamma") for c in ("Acc", "RefR", "s_trust")
    ] + ["Avg s_trust"]
    for row in ood[1:]:
        beta, gamma = metrics.loc[(row[0], "beta")], metrics.loc[(row[0], "gamma")]
        assert row[3] == pct(beta[S.S_TRUST]) and row[6] == pct(gamma[S.S_TRUST])
        assert row[7] == pct((beta[S.S_TRUST] + gamma[S.S_TRUST]) / 2)
    unanswerable = section(text, "Unanswerable")
    assert unanswerable[0] == ["Method", "RefR"]
    assert {r[0]: r[1] for r in unanswerable[1:]} == {
        m: pct(metrics.loc[(m, "delta")][S.REFR]) for m in METHODS
    }
    assert "Not evaluated (no checkpoint or not run): dpo1." in text
    assert "Set: `alpha` (n=60)." in text
    assert "`cadpo` (mixed: both pairs weighted by conf)" in text  # described by the method table


def test_best_s_trust_is_bold_and_ties_of_everyone_are_not() -> None:
    metrics = pd.DataFrame(
        [
            ("a", "x", 10, 0.5, 0.1, 0.1),
            ("b", "x", 10, 0.6, 0.1, 0.3),
            ("a", "u", 10, 0, 0.5, -0.5),
            ("b", "u", 10, 0, 0.5, -0.5),
        ],
        columns=S.METRICS_TABLE.names,
    )
    text = render_report(metrics, {"x": "id_test", "u": "unanswerable_test"}, ["a", "b"])
    assert "**30.00**" in text and "**10.00**" not in text
    assert "**50.00**" not in text  # both refuse half of the unanswerable set: nobody is singled out


def test_validation_set_has_its_own_table_after_the_test_tables() -> None:
    """Settings are chosen on split `val`: its table must never be mistaken for a test table."""
    metrics = pd.DataFrame(
        [("a", "x", 10, 0.5, 0.1, 0.1), ("a", "v", 20, 0.4, 0.3, 0.1), ("a", "u", 10, 0, 0.5, -0.5)],
        columns=S.METRICS_TABLE.names,
    )
    text = render_report(metrics, {"x": "id_test", "v": "val", "u": "unanswerable_test"}, ["a"])
    assert text.index("## In-domain") < text.index("## Unanswerable") < text.index("## Validation")
    section = text[text.index("## Validation") :]
    assert "Acc" in section and "RefR" in section and "s_trust" in section and "(n=20)" in section
    assert "## Other sets" not in text


def test_figures_are_linked_relative_and_are_real_pngs(run) -> None:
    run_dir, _, text = run
    for name in (REFUSAL_FIGURE, ACCURACY_FIGURE):
        assert f"](figures/{name})" in text
        path = run_dir / "figures" / name
        assert path.stat().st_size > 20_000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 800 and img.height > 300
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # lines and text, not blank


def test_boundary_numbers_equal_a_direct_count(run) -> None:
    run_dir, predictions, text = run
    conf = dio.read_table(str(run_dir / "eval" / "base_confidence")).to_pandas()
    table = boundary_table(predictions, conf, {"alpha": "in-domain", "beta": "OOD", "gamma": "OOD"}, 5)
    assert set(table[GROUP]) == {"in-domain", "OOD"}
    joined = predictions.merge(conf, on=S.ID)
    cadpo = joined[(joined[S.MODEL] == "cadpo") & joined[S.DATASET].isin(["beta", "gamma"])]
    low = cadpo[cadpo[S.CONF] < 0.2]
    row = table[(table[S.METHOD] == "cadpo") & (table[GROUP] == "OOD")].iloc[0]
    assert row[S.N] == len(low)
    assert row[REFUSAL_RATE] == pytest.approx(low[S.REFUSED].mean())
    answered = low[~low[S.REFUSED]]
    assert row[N_ANSWERED] == len(answered)
    assert row[ANSWERED_ACC] == pytest.approx(answered[S.CORRECT].mean())
    # the report prints the same two numbers for that bin (its OOD panel holds the same two sets)
    ood_rows = text.split("**out-of-domain**", 1)[1]
    cadpo_row = next(line for line in ood_rows.splitlines() if line.startswith("| cadpo"))
    assert cadpo_row.split("|")[2].strip() == f"{pct(row[REFUSAL_RATE])} / {pct(row[ANSWERED_ACC])}"


def test_report_without_confidence_skips_figures(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, n=10)
    dio.remove(str(tmp_path / "eval"))
    text = Path(report_of(tmp_path, METHODS)).read_text()
    assert "No base-model confidence table" in text and "![" not in text
    assert not (tmp_path / "figures").exists()


def test_markdown_tables_are_aligned() -> None:
    table = markdown_table(["Method", "Acc"], [["base", "1.00"], ["refusal_prompt", "100.00"]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert re.fullmatch(r"\|-+\|-+:\|", lines[1])


def test_recipe_lists_every_trained_method_with_the_rate_it_used(run) -> None:
    """Default config: `dpo1` and `cadpo` are reported, so `idk_it` (their start model) is trained too."""
    _, _, text = run
    recipe = section(text, "Training recipe")
    assert recipe[0] == [
        "Method", "Objective", "beta", "sft_weight", "lr", "Schedule", "Epochs", "Weights", "Start",
    ]  # fmt: skip
    rows = {r[0]: r for r in recipe[1:]}
    assert list(rows) == ["idk_it", "dpo1", "cadpo"]  # training order; base/refusal_prompt are not trained
    train = Config().train
    assert rows["idk_it"][1].startswith("SFT (") and rows["idk_it"][2:4] == ["–", "–"]
    assert rows["cadpo"][1] == "DPO (mixed: both pairs weighted by conf)"
    assert rows["cadpo"][2:4] == [f"{train.beta:g}", f"{train.sft_weight:g}"]
    assert rows["cadpo"][4] == rows["idk_it"][4] == "1e-3"  # dpo_lr 0: every method uses lr
    assert rows["cadpo"][5] == "constant" and rows["cadpo"][6] == "1"
    assert rows["cadpo"][7] == "LoRA r=16, α=32"
    assert rows["idk_it"][8] == "base" and rows["cadpo"][8] == "idk_it (also the reference)"
    assert "Not the paper's loss" not in text  # sft_weight 0: the paper's loss
    # the recipe sits with the result tables, before the boundary figures
    assert text.index("## Training recipe") < text.index("## Intrinsic boundary")


def test_recipe_shows_per_method_rates_schedule_and_full_fine_tuning() -> None:
    cfg = Config()
    cfg.model.dtype = "bfloat16"
    cfg.train.lora, cfg.train.lr, cfg.train.dpo_lr = False, 2e-4, 5e-6
    cfg.train.warmup_ratio, cfg.train.lr_schedule, cfg.train.max_steps = 0.03, "cosine", 40
    cfg.train.dpo_init = "base"
    text = "\n".join(recipe_section(cfg, ["sft", "dpo2"]))
    rows = {r[0]: r for r in section(text, "Training recipe")[1:]}
    assert rows["sft"][4] == "2e-4" and rows["dpo2"][4] == "5e-6"
    assert rows["dpo2"][5] == "cosine, warmup 3%" and rows["dpo2"][6] == "40 steps (max_steps)"
    assert rows["sft"][7] == "full fine-tuning (fp32 master weights)"
    assert rows["dpo2"][8] == "base (also the reference)"
    assert recipe_section(cfg, []) == []  # nothing trained: no section


def test_recipe_says_when_the_loss_departs_from_the_paper() -> None:
    cfg = Config()
    cfg.train.sft_weight = 0.5
    text = "\n".join(recipe_section(cfg, ["idk_it", "cadpo"]))
    rows = {r[0]: r for r in section(text, "Training recipe")[1:]}
    assert rows["cadpo"][1].endswith("+ 0.5·NLL(chosen)") and rows["cadpo"][3] == "0.5"
    assert rows["idk_it"][3] == "–"
    assert "**Not the paper's loss:** sft_weight = 0.5 adds 0.5 × the NLL of the chosen response" in text
    assert "departure from the paper" in text
    sft_only = "\n".join(recipe_section(cfg, ["sft"]))
    assert "Not the paper's loss" not in sft_only  # no DPO method: nothing departs


def test_s_trust_formula_names_its_units() -> None:
    text = " ".join(HOW_TO_READ.split())
    assert "s_trust = 2·Acc + RefR − 100** (all three in %; 2·Acc + RefR − 1 as fractions)" in text


def test_other_models_are_described_where_they_came_from(tmp_path) -> None:
    """Models scored beside the methods are registered by name (never a method's name) and the report
    says where each came from."""
    from inbol_ray.eval.models import ExternalModel, check_name, claim, register, registered
    from inbol_ray.eval.report import methods_line
    from inbol_ray.run_layout import RunLayout

    layout = RunLayout(str(tmp_path))
    register(layout, ExternalModel("gpt-x", "endpoint", "http://127.0.0.1:9/v1", "gpt-x-2026"))
    register(layout, ExternalModel("qwen", "checkpoint", "/models/qwen", "qwen2_vl"))
    register(layout, ExternalModel("qwen", "checkpoint", "/models/qwen2", "qwen2_vl"))  # replaced, not added
    found = registered(layout)
    assert list(found) == ["gpt-x", "qwen"] and found["qwen"].location == "/models/qwen2"
    line = methods_line(["base", "qwen", "gpt-x"], {n: m.describe() for n, m in found.items()})
    assert "`qwen` (qwen2_vl checkpoint `/models/qwen2`)" in line
    assert "`gpt-x` (endpoint http://127.0.0.1:9/v1, model `gpt-x-2026`)" in line
    for bad, why in (("cadpo", "is a method"), ("a/b", "letters, digits"), ("", "letters, digits")):
        with pytest.raises(ValueError, match=why):
            check_name(bad)
    answers = tmp_path / "eval" / "predictions" / "gpt-x" / "endpoint.parquet"
    answers.parent.mkdir(parents=True)
    answers.write_bytes(b"x")
    claim(layout, "gpt-x", "endpoint")  # the same backend again: its answers stay (reused, resumed)
    assert answers.exists()
    claim(layout, "gpt-x", "checkpoint")  # the name reused by another backend: the old answers go
    assert not answers.parent.exists()
