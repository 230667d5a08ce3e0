"""`make rehearse` at smoke size: the 7B config, on ShapesWorld exported in the published formats, end to end.

The same three steps as `python -m jobs.rehearse` (embedded base model, export, the 7B config layered
with configs/rehearsal.yaml), shrunk: the smoke-size embedded run of the pipeline test (a few hundred
items, 30 base-training steps), 2 training steps, four methods. The checks are the real path's fidelity
points on its outputs, not accuracy (`make rehearse` is the full-size run): options and instructions
reach the model, one item is one prompt in every stage, unanswerable training rows exist, VizWiz is
scored on its unanswerable subset, every 7B evaluation set is in the report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from inbol_ray import schema as S
from inbol_ray.config import load_config
from inbol_ray.data import io as dio
from inbol_ray.model.prompt import render_prompt
from jobs import rehearse

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REAL = [
    "sampling.k=2",
    "train.max_steps=2",
    "train.batch_size=16",
    "train.num_workers=0",  # local mode: each Ray Train worker group costs ~20 s to start (test_train covers it)
    "eval.methods=[base,refusal_prompt,idk_it,cadpo]",
    # The 7B config's vicuna_v1 system line would make step 1 retrain the shared smoke base under it
    # (`make rehearse` does); tests/unit/test_llava_conventions.py checks the line in every encoder.
    'prompt.system=""',
]


@pytest.fixture(scope="module")
def rehearsed(ray_local, smoke_run: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Step 1 is the smoke-size embedded run the pipeline test uses (its base model is made once)."""
    embedded, smoke = smoke_run
    out = tmp_path_factory.mktemp("rehearsal")
    argv = [
        "--run-dir",
        str(out),
        "--embedded-run-dir",
        str(embedded),
        *(f"--embedded={o}" for o in smoke),
        *REAL,
    ]
    assert rehearse.main(argv) == 0
    return out / "run"


def table(run: Path, name: str) -> pd.DataFrame:
    return dio.read_table(str(run / name)).to_pandas()


def test_every_7b_evaluation_set_is_in_the_report(rehearsed: Path) -> None:
    cfg = load_config([ROOT / "configs" / "llava-1.5-7b.yaml"])
    report = (rehearsed / "report.md").read_text()
    metrics = table(rehearsed, "metrics.parquet")
    for spec in cfg.data.datasets:
        if spec.split != "train":
            assert f"`{spec.name}` (n=" in report, spec.name
            assert set(metrics[metrics[S.DATASET] == spec.name][S.METHOD]) == {
                "base", "refusal_prompt", "idk_it", "cadpo"
            }  # fmt: skip


def test_options_and_instructions_reach_the_model(rehearsed: Path) -> None:
    cfg = load_config([ROOT / "configs" / "llava-1.5-7b.yaml"])
    items = table(rehearsed, "items").set_index(S.ID)
    samples = table(rehearsed, "samples")
    predictions = table(rehearsed, "predictions.parquet")
    shown = pd.concat(
        [samples[[S.ID, S.PROMPT]], predictions[predictions[S.MODEL] == "base"][[S.ID, S.PROMPT]]]
    )
    assert len(shown) and shown[S.PROMPT].notna().all()
    seen = set()
    for item_id, prompt in zip(shown[S.ID], shown[S.PROMPT], strict=True):
        item = items.loc[item_id]
        choices = list(item[S.CHOICES]) if item[S.CHOICES] is not None else None
        assert prompt == render_prompt(item[S.QUESTION], choices, cfg.prompt)
        if choices:
            assert "\nA. " in prompt and prompt.endswith(cfg.prompt.multiple_choice)
            seen.add("multiple choice")
            if item[S.DATASET] == "scienceqa" and prompt.startswith("Context: "):
                seen.add("hint first")
        else:
            assert prompt.endswith(cfg.prompt.short_answer)
            seen.add("open")
    assert seen == {"multiple choice", "hint first", "open"}


def test_one_item_is_one_prompt_in_every_stage(rehearsed: Path) -> None:
    """Sampling, the training tables, the reference pass's table, base confidence and evaluation all show an
    item the same bytes (the refusal baseline adds only its clause)."""
    sampled = table(rehearsed, "samples").set_index(S.ID)[S.PROMPT]
    for name in ("idk_it", "sft_baseline", "cadpo_pairs", "cadpo_pairs_ref"):
        rows = table(rehearsed, f"tables/{name}")
        assert len(rows) and (rows[S.PROMPT].to_numpy() == sampled.loc[rows[S.ID]].to_numpy()).all(), name
    confidence = table(rehearsed, "eval/base_confidence").set_index(S.ID)[S.PROMPT]
    pred = table(rehearsed, "predictions.parquet")
    clause = load_config([ROOT / "configs" / "llava-1.5-7b.yaml"]).prompt.refusal_clause
    for method, suffix in (("base", ""), ("idk_it", ""), ("cadpo", ""), ("refusal_prompt", f" {clause}")):
        mine = pred[(pred[S.MODEL] == method) & pred[S.ID].isin(confidence.index)]
        assert (
            len(mine)
            and (mine[S.PROMPT].to_numpy() == (confidence.loc[mine[S.ID]] + suffix).to_numpy()).all()
        )


def test_training_has_unanswerable_rows_and_vizwiz_scores_its_unanswerable_subset(rehearsed: Path) -> None:
    items = table(rehearsed, "items")
    mismatched = items[items[S.DATASET].str.endswith("_mismatch")]
    assert len(mismatched) and set(mismatched[S.SPLIT]) == {"train"} and not mismatched[S.ANSWERABLE].any()
    idk = table(rehearsed, "tables/idk_it").set_index(S.ID)
    assert (idk.loc[idk.index.intersection(mismatched[S.ID]), S.TARGET_KIND] == "refusal").all()
    assert len(idk.index.intersection(mismatched[S.ID])) > 0
    vizwiz = items[items[S.DATASET] == "vizwiz"]
    assert len(vizwiz) and set(vizwiz[S.SPLIT]) == {"unanswerable_test"} and not vizwiz[S.ANSWERABLE].any()
    answerable = items[items[S.DATASET] == "vizwiz_answerable"]
    assert len(answerable) and set(answerable[S.SPLIT]) == {"ood_test"} and answerable[S.ANSWERABLE].all()
