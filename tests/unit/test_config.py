"""Config loading: strict keys and types, dotted overrides, every shipped YAML loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inbol_ray.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "llava-1.5-7b.yaml"} <= names


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None, ["train.lr=1e-5", "train.lora=false", "sampling.k=4", "eval.methods=[base, cadpo]"]
    )
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.train.lora is False
    assert cfg.sampling.k == 4
    assert cfg.eval.methods == ["base", "cadpo"]


def test_yaml_float_without_dot_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-5\n")
    assert load_config(p).train.lr == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["sampling.k=ten"], "sampling.k: expected int"),
        (["train.lora=3"], "train.lora: expected bool"),
        (["sampling.engine=tgi"], "sampling.engine: 'tgi' is not one of"),
        (["train=3"], "train: expected a mapping"),
        (["construct.tau_known=0.0"], "tau_unknown < tau_known"),
        (["model.patch_size=7"], "multiple of model.patch_size"),
        (["justtext"], "must look like section.key=value"),
    ],
)
def test_bad_config_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(missing)


def test_section_hash_tracks_only_named_sections() -> None:
    a = load_config(None)
    b = load_config(None, ["train.lr=0.5"])
    assert a.section_hash("sampling") == b.section_hash("sampling")
    assert a.section_hash("train") != b.section_hash("train")


def test_later_files_override_earlier_ones(tmp_path: Path) -> None:
    recipe, site = tmp_path / "recipe.yaml", tmp_path / "site.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n  epochs: 3\nsampling:\n  k: 5\n")
    site.write_text("train:\n  epochs: 7\nrun_dir: /data/run\n")
    cfg = load_config([recipe, site], ["sampling.k=6"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.sampling.k, cfg.run_dir) == (1e-4, 7, 6, "/data/run")


def test_a_bad_key_in_a_layer_names_that_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("train:\n  lr: 1.0e-4\n")
    bad.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.lrr'"):
        load_config([good, bad])


def test_cross_field_checks_judge_the_merged_layers(tmp_path: Path) -> None:
    """A site file that alone would fail (8 workers, default batch 16 x accumulation 4) is fine once the
    recipe beside it sets the batch size."""
    recipe, site = tmp_path / "recipe.yaml", tmp_path / "site.yaml"
    recipe.write_text("train:\n  batch_size: 64\n  grad_accum: 4\n")
    site.write_text("train:\n  num_workers: 8\n")
    assert load_config([recipe, site]).train.num_workers == 8
    with pytest.raises(ConfigError, match=r"batch_size \(64\) must be >= num_workers x grad_accum \(128\)"):
        load_config([recipe, site], ["train.grad_accum=16"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.methods=[base, cadop]"], "eval.methods: unknown method(s) ['cadop']"),
        (["train.num_workers=4", "train.batch_size=2"], "must be >= num_workers x grad_accum"),
        (["sampling.temperature=0"], "sampling.temperature must be > 0"),
        (["model.dtype=fp8"], "model.dtype: 'fp8' is not one of"),
        (["serve.min_replicas=3"], "min_replicas <= max_replicas"),
        (["data.source=files"], "data.datasets is empty"),
    ],
)
def test_sections_validate_on_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_data_root_moves_every_relative_data_set_path() -> None:
    """The 7B config's paths are relative to data.root: one override points the run at another tree."""
    real = ROOT / "configs" / "llava-1.5-7b.yaml"
    shipped = load_config(real)
    assert shipped.data.root == "/data"
    assert all(s.path.startswith("/data/") for s in shipped.data.datasets)
    moved = load_config(real, ["data.root=s3://bucket/sets/"])
    for before, after in zip(shipped.data.datasets, moved.data.datasets, strict=True):
        assert after.path == "s3://bucket/sets/" + before.path.removeprefix("/data/")
        assert after.images == (
            "s3://bucket/sets/" + before.images.removeprefix("/data/") if before.images else ""
        )
    spec = {"name": "x", "format": "vqav2", "split": "train", "path": "/abs/q.json", "images": "gs://b/img"}
    kept = load_config(None, ["data.source=files", "data.root=/mnt", f"data.datasets=[{json.dumps(spec)}]"])
    assert (kept.data.datasets[0].path, kept.data.datasets[0].images) == ("/abs/q.json", "gs://b/img")
