"""Models by Hub id through a real `huggingface_hub` cache (issue 33): the tiny checkpoint placed in the
cache layout under `org/tiny` at two commits, `HF_HUB_OFFLINE=1`, nothing reaches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inbol_ray import checkpoint as ckpt
from inbol_ray import hub
from inbol_ray.config import Config, ModelConfig
from inbol_ray.pipeline import stage_hashes, stages
from inbol_ray.run_layout import RunLayout

COMMITS = ("a" * 40, "b" * 40)


def hub_cache(root: Path, checkpoint: Path, repo: str = "org/tiny") -> Path:
    """`<root>/models--org--tiny/snapshots/<commit>/...` for both commits, `refs/main` -> the first, and a
    branch `v2` -> the second: the layout `huggingface_hub` writes when it downloads."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for commit in COMMITS:
        shutil.copytree(checkpoint, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMITS[0])
    (folder / "refs" / "v2").write_text(COMMITS[1])
    return folder


@pytest.fixture()
def cache(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    hub.forget()
    yield hub_cache(tmp_path / "hub", tiny_checkpoint)
    hub.forget()


def test_what_is_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub.hub_ref("llava-hf/llava-1.5-7b-hf") == hub.HubRef("llava-hf/llava-1.5-7b-hf")
    assert hub.hub_ref("org/tiny@v2") == hub.HubRef("org/tiny", "v2")
    for not_an_id in ("s3://bucket/model", "/abs/model", "./org/x", "runs/tiny/models/cadpo", "tiny", ""):
        assert hub.hub_ref(not_an_id) is None, not_an_id
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    assert hub.hub_ref("runs/tiny") is None  # an existing local folder wins
    assert ckpt.model_location("runs/tiny") == str(tmp_path / "runs" / "tiny")
    assert ckpt.model_location("org/tiny@v2") == "org/tiny@v2"  # each node resolves it in its own cache


def test_ids_and_revisions_resolve_to_cached_snapshots(cache: Path) -> None:
    main, v2 = (str(cache / "snapshots" / c) for c in COMMITS)
    assert ckpt.resolve("org/tiny") == ckpt.Resolved(main)
    assert ckpt.resolve("org/tiny@v2") == ckpt.Resolved(v2)
    assert ckpt.resolve(f"org/tiny@{COMMITS[1]}") == ckpt.Resolved(v2)
    assert ckpt.local_dir("org/tiny@v2") == v2
    assert ckpt.stamp("org/tiny") == [("hub:org/tiny", 0, COMMITS[0])]
    model, _ = ckpt.load_model("org/tiny@v2")
    assert model.config.model_type == "llava"


def test_errors_name_the_id_and_the_case(cache: Path) -> None:
    with pytest.raises(
        hub.HubError, match=r"org/other: HF_HUB_OFFLINE is set and it is not in the hub cache"
    ):
        ckpt.resolve("org/other")
    with pytest.raises(hub.HubError, match=r"org/tiny@nope: "):
        ckpt.resolve("org/tiny@nope")


def test_an_adapter_whose_base_is_a_hub_id_loads_without_base(cache: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = ckpt.load_model("org/tiny")
    policy = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*q_proj"))
    adapter = tmp_path / "adapter"
    policy.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny"  # what a model trained elsewhere records
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    found = ckpt.resolve(str(adapter))
    assert found == ckpt.Resolved(str(cache / "snapshots" / COMMITS[0]), str(adapter))
    ckpt.load_model(str(adapter))


def test_a_moved_branch_is_a_changed_input(cache: Path, tmp_path: Path) -> None:
    cfg = Config(run_dir=str(tmp_path / "run"), model=ModelConfig(path="org/tiny"))
    assert RunLayout.of(cfg).base_model == "org/tiny"
    before = stage_hashes(cfg, stages(cfg))
    (cache / "refs" / "main").write_text(COMMITS[1])  # the branch moved
    hub.forget()  # a new job resolves it again
    after = stage_hashes(cfg, stages(cfg))
    assert after["prepare"] == before["prepare"]
    assert after["sample"] != before["sample"] and after["evaluate"] != before["evaluate"]


def test_python_m_serve_checkpoint_takes_a_hub_id(cache: Path) -> None:
    """`python -m serve --checkpoint org/tiny@v2`: the app's plan serves the cached snapshot as `tiny`."""
    from serve.llm_app import plan_app

    plan = plan_app({"checkpoint": "org/tiny@v2", "engine": "transformers"})
    assert [m.name for m in plan.served] == ["tiny"]
    assert plan.deployments == {"tiny": str(cache / "snapshots" / COMMITS[1])}
