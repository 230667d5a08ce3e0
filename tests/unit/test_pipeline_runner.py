"""The pipeline runner: manifests make reruns skip finished stages and redo changed ones; stage selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from inbol_ray import manifest
from inbol_ray import pipeline as P
from inbol_ray.config import load_config
from inbol_ray.methods import METHODS
from inbol_ray.run_layout import RunLayout


def _stages(calls: list[str], fail_at: str | None = None) -> list[P.Stage]:
    def make(name: str):
        def run(ctx: P.Context) -> dict:
            if name == fail_at:
                raise RuntimeError(f"{name} crashed")
            calls.append(name)
            Path(ctx.layout.path(name)).write_text("done")
            return {"rows": len(calls)}

        return run

    return [
        P.Stage("first", ("data",), make("first")),
        P.Stage("second", ("sampling",), make("second"), ("first",)),
        P.Stage("third", ("train",), make("third"), ("second",)),
        P.Stage("side", ("eval",), make("side"), ("first",)),
    ]


def _layout(tmp_path: Path) -> RunLayout:
    return RunLayout(str(tmp_path))


def test_rerun_skips_finished_stages_and_resumes_after_a_crash(tmp_path: Path, monkeypatch) -> None:
    cfg, layout = load_config(None), _layout(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls, fail_at="third"))
    with pytest.raises(RuntimeError, match="third crashed"):
        P.run_pipeline(cfg, layout, log=lambda s: None)
    assert calls == ["first", "second"]
    assert manifest.read_manifest(layout.manifest("third")) is None

    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    lines: list[str] = []
    P.run_pipeline(cfg, layout, log=lines.append)
    assert calls == ["first", "second", "third", "side"]
    assert any("first: up to date, skipped" in line for line in lines)
    assert any("third: done in" in line for line in lines)


def test_changed_config_reruns_exactly_the_stages_downstream(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    layout = _layout(tmp_path)
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    P.run_pipeline(load_config(None), layout, log=lambda s: None)
    calls.clear()
    P.run_pipeline(load_config(None, ["sampling.k=3"]), layout, log=lambda s: None)
    assert calls == ["second", "third"]  # first depends only on `data`, side only on first and `eval`
    calls.clear()
    P.run_pipeline(load_config(None, ["sampling.k=3"]), layout, log=lambda s: None)
    assert calls == []


def test_only_and_until_select_stages_and_check_inputs(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    layout = _layout(tmp_path)
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    cfg = load_config(None)
    with pytest.raises(P.StageError, match="second needs the output of first \\(not run yet\\)"):
        P.run_pipeline(cfg, layout, only=["second"], log=lambda s: None)
    P.run_pipeline(cfg, layout, until="second", log=lambda s: None)
    assert calls == ["first", "second"]
    P.run_pipeline(cfg, layout, only=["side"], log=lambda s: None)
    assert calls == ["first", "second", "side"]
    changed = load_config(None, ["data.max_image_bytes=5"])
    assert P.stale_inputs(changed, layout, P.select(P.stages(changed), ["third"])) == [
        "third needs the output of second (made with another config): run that stage first"
    ]
    with pytest.raises(P.StageError, match="unknown stage"):
        P.select(P.stages(cfg), ["nope"])


def test_manifest_records_counts_and_versions(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    layout = _layout(tmp_path)
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    P.run_pipeline(load_config(None), layout, log=lambda s: None)
    body = manifest.read_manifest(layout.manifest("second"))
    assert body["counts"] == {"rows": 2}
    assert {"torch", "ray", "transformers"} <= set(body["versions"])


def test_stage_list_follows_the_method_table() -> None:
    cfg = load_config("configs/tiny.yaml", ["eval.methods=[base, cadpo]"])
    names = [s.name for s in P.stages(cfg)]
    assert names == [
        "prepare", "base_model", "sample", "construct", "train_idk_it", "reference", "train_cadpo", "evaluate",
        "report",
    ]  # fmt: skip
    by_name = {s.name: s for s in P.stages(cfg)}
    assert by_name["train_cadpo"].inputs == ("reference", "train_idk_it")
    assert by_name["evaluate"].inputs == ("prepare", "base_model", "train_cadpo")
    base = load_config("configs/tiny.yaml", ["eval.methods=[base, dpo1]", "train.dpo_init=base"])
    assert [s.name for s in P.stages(base) if s.name.startswith(("train", "ref"))] == [
        "reference",
        "train_dpo1",
    ]


def test_the_ablation_layer_adds_three_trainings_to_the_default_run() -> None:
    """`make ablation` after `make demo`: the same run directory, so every stage the default made must keep
    its hash (reused), and only dpo1-3 plus evaluate and report are new work."""
    demo = load_config("configs/tiny.yaml")
    ablation = load_config(["configs/tiny.yaml", "configs/ablation.yaml"])
    assert demo.eval.methods == ["base", "refusal_prompt", "sft", "idk_it", "cadpo"]
    assert ablation.eval.methods == list(METHODS)
    hd, ha = P.stage_hashes(demo, P.stages(demo)), P.stage_hashes(ablation, P.stages(ablation))
    assert not any(name.startswith("train_dpo") for name in hd)
    new_work = {"train_dpo1", "train_dpo2", "train_dpo3", "evaluate", "report"}
    assert {name for name in ha if ha[name] != hd.get(name)} == new_work


def test_construct_settings_do_not_touch_the_sample_stage() -> None:
    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml", ["construct.tau_idk=0.3"])
    ha, hb = P.stage_hashes(a, P.stages(a)), P.stage_hashes(b, P.stages(b))
    assert ha["sample"] == hb["sample"] and ha["construct"] != hb["construct"]
    assert ha["train_cadpo"] != hb["train_cadpo"]
    c = load_config("configs/tiny.yaml", ["construct.window_rows=1000"])  # memory, not tables
    assert P.stage_hashes(c, P.stages(c)) == ha


def test_a_model_trained_by_the_train_job_is_the_pipelines_training_stage() -> None:
    """`jobs.train method=sft` sets train.method; the pipeline must still accept its output."""
    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml", ["train.method=sft"])
    c = load_config("configs/tiny.yaml", ["train.lr=0.1"])
    ha, hb, hc = (P.stage_hashes(x, P.stages(x)) for x in (a, b, c))
    assert ha == hb
    assert ha["train_sft"] != hc["train_sft"] and ha["sample"] == hc["sample"]


def _diamond(calls: list[str], started: dict, fail_at: str | None = None) -> list[P.Stage]:
    """a -> (b, c) -> d; b and c each wait until the other has started (so they must overlap)."""
    import threading

    for name in ("b", "c"):
        started.setdefault(name, threading.Event())

    def make(name: str, partner: str | None = None):
        def run(ctx: P.Context) -> dict:
            if partner:
                started[name].set()
                assert started[partner].wait(timeout=20), f"{name} ran without {partner} alongside"
            if name == fail_at:
                raise RuntimeError(f"{name} crashed")
            calls.append(name)
            return {}

        return run

    return [
        P.Stage("a", ("data",), make("a")),
        P.Stage("b", ("train",), make("b", "c"), ("a",)),
        P.Stage("c", ("eval",), make("c", "b"), ("a",)),
        P.Stage("d", ("sampling",), make("d"), ("b", "c")),
    ]


def test_independent_stages_run_concurrently_in_dependency_order(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    cfg = load_config(None, ["ray.concurrent_stages=2", "train.num_workers=1"])
    monkeypatch.setattr(P, "stages", lambda c: _diamond(calls, {}))
    P.run_pipeline(cfg, _layout(tmp_path), log=lambda s: None)
    assert calls[0] == "a" and sorted(calls[1:3]) == ["b", "c"] and calls[3] == "d"


def test_a_failed_concurrent_stage_lets_the_other_finish_and_starts_nothing_after(
    tmp_path: Path, monkeypatch
) -> None:
    calls: list[str] = []
    layout = _layout(tmp_path)
    cfg = load_config(None, ["ray.concurrent_stages=2", "train.num_workers=1"])
    monkeypatch.setattr(P, "stages", lambda c: _diamond(calls, {}, fail_at="c"))
    with pytest.raises(RuntimeError, match="c crashed"):
        P.run_pipeline(cfg, layout, log=lambda s: None)
    assert sorted(calls) == ["a", "b"]  # b finished, d never started
    assert manifest.read_manifest(layout.manifest("b")) is not None
    assert manifest.read_manifest(layout.manifest("c")) is None


def test_local_mode_trainings_never_overlap(tmp_path: Path, monkeypatch) -> None:
    """train.num_workers=0 runs torch in the driver: the pipeline then runs one stage at a time."""
    import threading

    started = {"b": threading.Event(), "c": threading.Event()}
    started["c"].set()  # b would wait for c forever if c had to start alongside; c waits for b: b is first
    cfg = load_config(None, ["ray.concurrent_stages=2", "train.num_workers=0"])
    calls: list[str] = []
    monkeypatch.setattr(P, "stages", lambda c: _diamond(calls, started))
    P.run_pipeline(cfg, _layout(tmp_path), log=lambda s: None)
    assert calls == ["a", "b", "c", "d"]
