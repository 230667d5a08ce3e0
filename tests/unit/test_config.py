"""Config loading: strict keys and types, dotted overrides, every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from inbol_ray.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


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
