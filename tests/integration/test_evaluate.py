"""The evaluate job end to end on a real local Ray: the tiny checkpoint on three ShapesWorld sets.

Runs `python -m jobs.evaluate` (in-process, on the session's Ray) with two methods - the base checkpoint
and the refusal-prompt baseline - over an in-domain, an OOD and an unanswerable set of a few items and a
set of text-only questions (no image), then checks the tables against each other and against the grader,
and that the report and figures exist; then a checkpoint of another architecture (a tiny Qwen2-VL) is
scored on the same run through `jobs.evaluate_checkpoint`.
The checkpoint is untrained, so answers are wrong: the checks are about bookkeeping, not accuracy.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import load_config
from inbol_ray.data import io as dio
from inbol_ray.data.shapes import generate_items
from inbol_ray.eval.base_confidence import compute_base_confidence
from inbol_ray.eval.evaluate import eval_job, eval_selection, method_refuses, run_evaluation
from inbol_ray.eval.figures import ACCURACY_FIGURE, REFUSAL_FIGURE
from inbol_ray.eval.report import write_report
from inbol_ray.generation.stage import run_generation
from inbol_ray.grading import grade, is_refusal_response
from inbol_ray.metrics import trust_scores
from inbol_ray.model.prompt import render_prompt
from inbol_ray.run_layout import RunLayout

REFUSAL_PROMPT = "refusal_prompt"

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "tiny.yaml"
SETS = ["shapes_id_test", "shapes_ood_scene", "shapes_unanswerable", "text_probe"]
METHODS = ["base", "refusal_prompt"]
OVERRIDES = [f"eval.datasets=[{', '.join(SETS)}]", "eval.methods=[base, refusal_prompt]", "sampling.k=2"]


@pytest.fixture(scope="module")
def evaluated(
    ray_local, tiny_checkpoint: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("eval_run")
    shutil.copytree(tiny_checkpoint, run_dir / "models" / "base")
    shapes = dataclasses.replace(
        tiny_config.data.shapes,
        n_pretrain=0,
        n_train=0,
        n_val=0,
        n_id_test=4,
        n_ood_test=3,
        n_unanswerable_test=3,
    )
    dio.write_table(
        generate_items(shapes, tiny_config.model.image_size), str(run_dir / "items" / "part-0.parquet")
    )
    dio.write_table(text_only_items(), str(run_dir / "items" / "part-1.parquet"))
    cfg = load_config(TINY_YAML, OVERRIDES)
    layout = layout_of(run_dir)
    run_evaluation(cfg, layout)
    compute_base_confidence(cfg, layout)
    write_report(cfg, layout)
    return run_dir


def text_only_items():
    """Questions that need no picture (an open one, a multiple-choice one): valid items with no image."""
    rows = [
        ("text-0", "How many sides does a triangle have?", ["3"], None, "vqa_soft"),
        ("text-1", "Which shape has four equal sides?", ["B"], ["circle", "square", "triangle"], "mc_letter"),
    ]
    return S.conform(
        pa.Table.from_pylist(
            [
                {
                    S.ID: i,
                    S.DATASET: "text_probe",
                    S.SPLIT: "ood_test",
                    S.IMAGE: None,
                    S.IMAGE_PATH: None,
                    S.QUESTION: q,
                    S.ANSWERS: a,
                    S.CHOICES: c,
                    S.METRIC: m,
                    S.ANSWERABLE: True,
                    S.CATEGORY: "text",
                    S.SOURCE: "test",
                }
                for i, q, a, c, m in rows
            ]  # fmt: skip
        ),
        S.ITEMS,
        "text_probe",
    )


def layout_of(run_dir: Path) -> RunLayout:
    return RunLayout(str(run_dir), build_tiny=True)  # base model: <run_dir>/models/base


def items_of(run_dir: Path) -> pd.DataFrame:
    items = dio.read_table(str(run_dir / "items")).to_pandas()
    return items[items[S.DATASET].isin(SETS)].drop(columns=[S.IMAGE])


def test_every_item_is_answered_once_per_method(evaluated: Path) -> None:
    pred = dio.read_table(str(evaluated / "predictions.parquet")).to_pandas()
    pred = pred[pred[S.MODEL].isin(METHODS)]  # other models scored on the run come later in this module
    items = items_of(evaluated)
    assert len(pred) == 2 * len(items) == 24
    assert not pred.duplicated([S.MODEL, S.DATASET, S.ID]).any()
    for method in ("base", REFUSAL_PROMPT):
        mine = pred[pred[S.MODEL] == method]
        assert sorted(mine[S.ID]) == sorted(items[S.ID])


def test_predictions_carry_the_rendered_prompt(evaluated: Path) -> None:
    """What the model saw is auditable: `base` got the item rendered under cfg.prompt, the refusal
    baseline the same text plus only the refusal clause."""
    cfg = load_config(TINY_YAML, OVERRIDES)
    pred = dio.read_table(str(evaluated / "predictions.parquet")).to_pandas()
    shown = {(m, i): p for m, i, p in zip(pred[S.MODEL], pred[S.ID], pred[S.PROMPT], strict=True)}
    for item in items_of(evaluated).to_dict("records"):
        plain = render_prompt(item[S.QUESTION], item[S.CHOICES], cfg.prompt)
        assert shown["base", item[S.ID]] == plain
        assert shown[REFUSAL_PROMPT, item[S.ID]] == f"{plain} {cfg.prompt.refusal_clause}"


def test_metrics_are_the_trust_scores_of_the_predictions(evaluated: Path) -> None:
    pred = dio.read_table(str(evaluated / "predictions.parquet")).to_pandas()
    metrics = dio.read_table(str(evaluated / "metrics.parquet"))
    assert metrics.schema.names == S.METRICS_TABLE.names
    rows = metrics.to_pandas()
    assert len(rows[rows[S.METHOD].isin(METHODS)]) == 2 * len(SETS)
    for row in rows.itertuples(index=False):
        group = pred[(pred[S.MODEL] == row.method) & (pred[S.DATASET] == row.dataset)]
        expected = trust_scores(group[S.CORRECT].to_numpy(), group[S.REFUSED].to_numpy())
        assert row.n == len(group)
        assert (row.acc, row.refr, row.s_trust) == pytest.approx(
            (expected[S.ACC], expected[S.REFR], expected[S.S_TRUST])
        )


def test_predictions_are_graded_with_each_items_metric(evaluated: Path) -> None:
    pred = dio.read_table(str(evaluated / "predictions.parquet")).to_pandas()
    joined = pred.merge(items_of(evaluated), on=[S.DATASET, S.ID])
    for r in joined.itertuples(index=False):
        choices = list(r.choices) if r.choices is not None else None
        assert r.refused == is_refusal_response(
            r.response, choices, refusal_option=not r.answerable, question=r.question
        )
        assert r.correct == (
            r.answerable and grade(r.response, list(r.answers), r.metric, choices, question=r.question)
        )
    assert not joined.loc[~joined[S.ANSWERABLE], S.CORRECT].any()


def test_report_has_the_papers_tables_and_real_figures(evaluated: Path) -> None:
    text = (evaluated / "report.md").read_text()
    for heading in ("## In-domain", "## Out-of-domain", "## Unanswerable", "## Intrinsic boundary"):
        assert heading in text
    conf = dio.read_table(str(evaluated / "eval" / "base_confidence")).to_pandas()
    answerable = items_of(evaluated).query("answerable")
    assert sorted(conf[S.ID]) == sorted(answerable[S.ID])  # the unanswerable set is not sampled
    assert all(len(r) == 2 for r in conf[S.RESPONSES])  # K = sampling.k
    for name in (REFUSAL_FIGURE, ACCURACY_FIGURE):
        assert f"](figures/{name})" in text
        png = evaluated / "figures" / name
        assert png.stat().st_size > 10_000
        with Image.open(png) as img:
            assert img.format == "PNG" and len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_rerun_reuses_every_shard(evaluated: Path) -> None:
    cfg = load_config(TINY_YAML, OVERRIDES)
    t0 = time.perf_counter()
    result = run_evaluation(cfg, layout_of(evaluated))
    assert result.computed == [] and sorted(result.runs) == ["base", REFUSAL_PROMPT]
    assert time.perf_counter() - t0 < 10  # no Ray work at all
    assert method_refuses(REFUSAL_PROMPT) and not method_refuses("base")


def test_greedy_answers_do_not_depend_on_batching(evaluated: Path, tmp_path: Path) -> None:
    """The same method answered alone, with one actor, batches of 3 and shards of 4 gives the same
    predictions as in the evaluation's shared pass (both methods, default batching)."""
    cfg = load_config(TINY_YAML, [*OVERRIDES, "eval.batch_size=3", "sampling.num_actors=1"])
    layout = layout_of(evaluated)
    job = dataclasses.replace(
        eval_job(cfg, layout, REFUSAL_PROMPT, layout.base_model, eval_selection(SETS), shard_rows=4),
        out_uri=str(tmp_path / "again"),
        quarantine_uri=str(tmp_path / "quarantine.parquet"),
    )
    result = run_generation(cfg, job, log=lambda _: None)
    assert result.shards == 3 and result.shards_reused == 0
    again = dio.read_table(result.out_uri).sort_by(S.ID)
    first = dio.read_table(layout.eval_shards(REFUSAL_PROMPT)).sort_by(S.ID)
    assert again.to_pylist() == first.to_pylist()


def test_one_pass_over_two_models_equals_two_passes(evaluated: Path, tmp_path: Path) -> None:
    """Jobs on different models sharing a pass (batches that span both, one actor switching models) give
    each job exactly what it gets alone."""
    from inbol_ray.checkpoint import load_model, save_model
    from inbol_ray.generation.stage import run_generations

    layout = layout_of(evaluated)
    model, processor = load_model(layout.base_model)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(-1.5)  # another model: other answers
    other = save_model(model, processor, str(tmp_path / "other"))
    cfg = load_config(TINY_YAML, [*OVERRIDES, "eval.batch_size=3", "sampling.num_actors=1"])

    def job(name: str, model_dir: str, out: str):
        return dataclasses.replace(
            eval_job(cfg, layout, name, model_dir, eval_selection(SETS), shard_rows=4),
            out_uri=str(tmp_path / out),
            quarantine_uri=str(tmp_path / f"{out}-quarantine.parquet"),
        )

    shared = run_generations(cfg, [job("base", layout.base_model, "a"), job("sft", other, "b")])
    alone = run_generation(cfg, job("sft", other, "b1"), log=lambda _: None)
    # base alone: the module's evaluation (base beside refusal_prompt, other batching: batch-invariant)
    outs = [r.out_uri for r in shared] + [layout.eval_shards("base"), alone.out_uri]
    tables = [dio.read_table(uri).sort_by(S.ID).to_pylist() for uri in outs]
    assert tables[0] == tables[2] and tables[1] == tables[3]
    assert [r[S.RESPONSE] for r in tables[0]] != [r[S.RESPONSE] for r in tables[1]]
    assert {r[S.MODEL] for r in tables[1]} == {"sft"}
    assert [r.done for r in shared] == [12, 12]
    # Both share one pass's time: each line says so and reports the pass's rate, not 12 responses in it.
    assert [(r.pass_jobs, r.pass_outputs) for r in shared] == [(2, 24), (2, 24)]
    assert "in one pass of 2 jobs (24 responses in" in shared[1].summary_line()
    assert shared[0].per_s == shared[1].per_s == 24 / shared[0].seconds
    assert alone.pass_jobs == 1 and alone.per_s == alone.new_outputs / alone.seconds


def test_adapter_only_checkpoint_loads_on_its_base_in_memory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A LoRA method is its adapter (train.merge=false): the loaders apply it to its base in memory, with
    exactly the merged weights, and write nothing next to it."""
    from peft import LoraConfig, get_peft_model

    from inbol_ray.checkpoint import load_model, load_processor, resolve

    model, _ = load_model(str(tiny_checkpoint))
    lora = LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    policy = get_peft_model(model, lora)
    policy.save_pretrained(tmp_path / "idk_it" / "adapter")  # what train.merge=false leaves behind
    expected = policy.merge_and_unload().state_dict()
    found = resolve(str(tmp_path / "idk_it"), base=str(tiny_checkpoint))
    assert found.adapter_dir == f"{tmp_path}/idk_it/adapter"
    loaded, processor = load_model(str(tmp_path / "idk_it"), base=str(tiny_checkpoint))
    name = next(k for k in expected if "language_model" in k and "q_proj.weight" in k)
    assert torch.equal(loaded.state_dict()[name], expected[name])
    assert not torch.equal(
        expected[name], load_model(str(tiny_checkpoint))[0].state_dict()[name]
    )  # non-trivial
    assert sorted(p.name for p in (tmp_path / "idk_it").iterdir()) == ["adapter"]
    assert processor.tokenizer.vocab_size == load_processor(str(tiny_checkpoint)).tokenizer.vocab_size


def test_another_architecture_is_scored_on_the_same_items(
    evaluated: Path, tiny_qwen2_vl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jobs.evaluate_checkpoint` scores a non-LLaVA checkpoint (a tiny Qwen2-VL, asked through its own chat
    template) on every item of the run, text-only ones included: through vLLM (one actor of the generation
    stage), with exactly the answers transformers gives outside the stage. It joins the run's predictions,
    metrics, report and figures beside the methods, with where it came from, and the run's own evaluation,
    rerun, keeps it."""
    from inbol_ray.data.images import decode_image
    from inbol_ray.eval.models import registered
    from inbol_ray.sampling import build_sampler
    from jobs import evaluate_checkpoint

    argv = ["--config", str(TINY_YAML), "--run-dir", str(evaluated), "--name", "qwen-tiny",
            "--checkpoint", str(tiny_qwen2_vl), *OVERRIDES, "sampling.engine=vllm", "sampling.num_actors=1"]  # fmt: skip
    assert evaluate_checkpoint.main(argv) == 0
    assert "evaluate_qwen-tiny[vllm]" in capsys.readouterr().out  # vLLM implements Qwen2-VL: no fallback
    cfg = load_config(TINY_YAML, OVERRIDES)
    pred = dio.read_table(str(evaluated / "predictions.parquet")).to_pandas()
    mine = pred[pred[S.MODEL] == "qwen-tiny"].set_index(S.ID)
    items = dio.read_table(str(evaluated / "items")).to_pandas().set_index(S.ID).loc[sorted(mine.index)]
    assert sorted(mine.index) == sorted(items_of(evaluated)[S.ID]) and items[S.IMAGE].isna().sum() == 2
    sampler = build_sampler("transformers", str(tiny_qwen2_vl))
    expected = sampler.generate(
        [None if b is None else decode_image(b) for b in items[S.IMAGE]],
        [render_prompt(q, c, cfg.prompt) for q, c in zip(items[S.QUESTION], items[S.CHOICES], strict=True)],
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    assert list(mine.loc[items.index, S.RESPONSE]) == [r[0] for r in expected]
    assert registered(layout_of(evaluated))["qwen-tiny"].model == "qwen2_vl"
    metrics = dio.read_table(str(evaluated / "metrics.parquet")).to_pandas()
    assert set(metrics.loc[metrics[S.METHOD] == "qwen-tiny", S.DATASET]) == set(SETS)
    text = (evaluated / "report.md").read_text()
    assert f"`qwen-tiny` (qwen2_vl checkpoint `{tiny_qwen2_vl}`)" in text and "| qwen-tiny " in text
    assert f"](figures/{REFUSAL_FIGURE})" in text
    run_evaluation(cfg, layout_of(evaluated))  # the methods again: the other model stays in the tables
    again = dio.read_table(str(evaluated / "predictions.parquet")).to_pandas()
    assert (again[S.MODEL] == "qwen-tiny").sum() == len(mine)
