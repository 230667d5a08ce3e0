"""The run layout and the method table: one owner of every run path and of the start/reference rules."""

from __future__ import annotations

import pytest

from inbol_ray import methods as M
from inbol_ray.config import load_config
from inbol_ray.run_layout import RunLayout


def test_paths_are_uris_under_the_root() -> None:
    layout = RunLayout("s3://bucket/run", model_path="/models/llava", dpo_init="idk_it")
    assert layout.items == "s3://bucket/run/items"
    assert layout.training_table("cadpo") == "s3://bucket/run/tables/cadpo_pairs_ref"
    assert layout.training_table("sft") == "s3://bucket/run/tables/sft_baseline"
    assert layout.manifest("sample") == "s3://bucket/run/manifests/sample.json"
    assert layout.train_storage("idk_it") == "s3://bucket/run/models/idk_it/ray"


@pytest.mark.parametrize(
    ("build_tiny", "dpo_init", "method", "start"),
    [
        (True, "idk_it", "cadpo", "/r/models/idk_it"),
        (True, "idk_it", "idk_it", "/r/models/base"),
        (False, "idk_it", "sft", "/m/llava"),
        (False, "base", "dpo2", "/m/llava"),
    ],
)
def test_start_and_reference_models(build_tiny: bool, dpo_init: str, method: str, start: str) -> None:
    layout = RunLayout("/r", model_path="/m/llava", build_tiny=build_tiny, dpo_init=dpo_init)
    assert layout.start_model(method) == start
    if M.method(method).needs_reference:
        assert layout.reference_model(method) == start
    else:
        with pytest.raises(ValueError, match="no reference"):
            layout.reference_model(method)


def test_baselines_are_evaluated_on_the_base_model() -> None:
    layout = RunLayout.of(load_config("configs/tiny.yaml"), "/r")
    assert layout.eval_model("refusal_prompt") == layout.eval_model("base") == "/r/models/base"
    assert layout.eval_model("dpo3") == "/r/models/dpo3"


def test_training_order_adds_what_a_method_starts_from() -> None:
    assert M.training_order(["base", "cadpo"], "idk_it") == ["idk_it", "cadpo"]
    assert M.training_order(["cadpo", "sft", "dpo1"], "base") == ["sft", "dpo1", "cadpo"]
    assert M.training_order(["base", "refusal_prompt"], "idk_it") == []
    with pytest.raises(ValueError, match="unknown method 'cadop'"):
        M.method("cadop")
