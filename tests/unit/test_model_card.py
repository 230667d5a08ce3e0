"""The exported model's card (`inbol_ray.eval.model_card`), rendered from a synthetic metrics table: what the
Hub reads (front matter), the numbers in the right cells, and a loading snippet that asks in the prompt
format the scores were measured under. The card of a real run is checked in
tests/integration/test_export_job.py (its tables against the run's report, its snippet executed)."""

from __future__ import annotations

import ast
import dataclasses

import pandas as pd
import pytest
import yaml

from inbol_ray import schema as S
from inbol_ray.config import load_config
from inbol_ray.eval.model_card import Exported, render_card, training_sets
from inbol_ray.model.prompt import format_prompt, render_prompt

SPLITS = {"alpha": "id_test", "beta": "ood_test", "gamma": "ood_test", "delta": "unanswerable_test"}
SCORES = {  # (method, set) -> (acc, refr): every cell a different number
    ("base", "alpha"): (0.50, 0.00),
    ("cadpo", "alpha"): (0.4375, 0.3125),
    ("base", "beta"): (0.25, 0.0625),
    ("cadpo", "beta"): (0.1875, 0.5),
    ("base", "gamma"): (0.375, 0.0),
    ("cadpo", "gamma"): (0.3125, 0.25),
    ("base", "delta"): (0.0, 0.125),
    ("cadpo", "delta"): (0.0, 0.6875),
}


def metrics() -> pd.DataFrame:
    rows = [
        {S.METHOD: m, S.DATASET: d, S.N: 16, S.ACC: a, S.REFR: r, S.S_TRUST: 2 * a + r - 1}
        for (m, d), (a, r) in SCORES.items()
    ]
    return pd.DataFrame(rows, columns=S.METRICS_TABLE.names)


def exported(**changes) -> Exported:
    e = Exported(
        method="cadpo",
        adapter=True,
        base_id="llava-hf/llava-1.5-7b-hf",
        base_location="s3://bucket/run/models/base",
        license="llama2",
        datasets=("vqav2", "scienceqa"),
        run_dir="s3://bucket/run",
        provenance={"train_cadpo manifest token": "abc"},
    )
    return dataclasses.replace(e, **changes)


@pytest.fixture()
def cfg():
    return load_config(None, ["construct.tau_known=0.9", "construct.tau_idk=0.4", "sampling.k=7"])


def meta(card: str) -> dict:
    return yaml.safe_load(card.split("---\n", 2)[1])


def snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_front_matter_names_the_hub_base_library_and_data(cfg) -> None:
    card = render_card(cfg, exported(base_id="llava-hf/llava-1.5-7b-hf@a1b2c3"), metrics(), SPLITS)
    found = meta(card)
    assert found["base_model"] == "llava-hf/llava-1.5-7b-hf"  # the Hub wants the repo, not the revision
    assert found["license"] == "llama2" and found["datasets"] == ["vqav2", "scienceqa"]
    assert found["library_name"] == "peft" and found["pipeline_tag"] == "image-text-to-text"
    assert {"cadpo", "lora", "base_model:adapter:llava-hf/llava-1.5-7b-hf"} <= set(found["tags"])

    full = meta(render_card(cfg, exported(adapter=False), metrics(), SPLITS))
    assert full["library_name"] == "transformers" and "lora" not in full["tags"]


def test_without_a_hub_id_the_card_keeps_the_runs_base_and_says_so(cfg) -> None:
    card = render_card(cfg, exported(base_id=None, license="other"), metrics(), SPLITS)
    assert "base_model" not in meta(card)  # a path there would be invalid Hub metadata
    assert "the run's own base at `s3://bucket/run/models/base`" in card and "--base-id" in card
    assert "base model's terms apply" in card
    assert 'from_pretrained("s3://bucket/run/models/base"' in snippet(card)


def row(card: str, heading: str, method: str) -> list[str]:
    section = card.split(f"### {heading}\n", 1)[1].split("###", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith(f"| {method} "))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_tables_put_the_runs_numbers_in_their_cells(cfg) -> None:
    card = render_card(cfg, exported(), metrics(), SPLITS)
    # alpha: Acc 43.75, RefR 31.25, s_trust 2*43.75 + 31.25 - 100 = 18.75 (the best: bold)
    assert row(card, "In-domain", "cadpo") == ["43.75", "31.25", "**18.75**"]
    assert row(card, "In-domain", "base") == ["50.00", "0.00", "0.00"]
    # beta, gamma and their mean s_trust: cadpo -12.50 on both, base (-43.75 - 25.00) / 2 = -34.375
    assert row(card, "Out-of-domain", "cadpo") == ["18.75", "50.00", "**-12.50**", "31.25", "25.00", "**-12.50**", "**-12.50**"]  # fmt: skip
    assert row(card, "Out-of-domain", "base")[-1] == "-34.38"
    assert row(card, "Unanswerable: refusal rate (extrinsic boundary)", "cadpo") == ["**68.75**"]
    assert "This model is the row `cadpo`" in card


def test_method_text_and_recipe_come_from_the_config(cfg) -> None:
    card = render_card(cfg, exported(), metrics(), SPLITS)
    assert "K=7" in card and "tau_known = 0.9" in card and "IDK-IT model" in card  # dpo_init: idk_it
    recipe = card.split("## Training recipe", 1)[1].split("##", 1)[0]
    assert "| idk_it " in recipe and "| cadpo " in recipe  # the method and the one it started from
    idk = render_card(cfg, exported(method="idk_it"), metrics(), SPLITS)
    assert "tau_idk = 0.4" in idk and "| cadpo " not in idk.split("## Training recipe", 1)[1]


def test_the_snippet_asks_in_the_runs_prompt_format(cfg) -> None:
    cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, system="You are careful."))
    code = snippet(render_card(cfg, exported(base_id="org/tiny@v2"), metrics(), SPLITS))
    tree = ast.parse(code)  # valid Python
    prompt = next(
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "prompt"
    )
    assert prompt == format_prompt(
        render_prompt("What colour is the car?", None, cfg.prompt), system="You are careful."
    )
    assert 'from_pretrained("org/tiny", revision="v2"' in code and "PeftModel.from_pretrained" in code
    full = snippet(render_card(cfg, exported(adapter=False), metrics(), SPLITS))
    ast.parse(full)
    assert "peft" not in full and "from_pretrained(export" in full


def test_training_sets_are_the_train_split() -> None:
    keys = pd.DataFrame(
        {
            S.DATASET: ["vqav2", "vqav2", "gqa", "vqav2_mismatch"],
            S.SPLIT: ["train", "train", "ood_test", "train"],
        }
    )
    assert training_sets(keys, load_config(None)) == ("vqav2", "vqav2_mismatch")
