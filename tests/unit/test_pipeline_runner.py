"""The pipeline runner: manifests make reruns skip finished stages and redo changed ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from inbol_ray import manifest
from inbol_ray import pipeline as P
from inbol_ray.config import load_config


def _stages(calls: list[str], fail_at: str | None = None) -> list[P.Stage]:
    def make(name: str):
        def run(ctx: P.Context) -> dict:
            if name == fail_at:
                raise RuntimeError(f"{name} crashed")
            calls.append(name)
            Path(ctx.path(name)).write_text("done")
            return {"rows": len(calls)}

        return run

    return [
        P.Stage("first", ("data",), make("first")),
        P.Stage("second", ("sampling",), make("second")),
        P.Stage("third", ("train",), make("third")),
    ]


def test_rerun_skips_finished_stages_and_resumes_after_a_crash(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None)
    calls: list[str] = []
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls, fail_at="third"))
    with pytest.raises(RuntimeError, match="third crashed"):
        P.run_pipeline(cfg, str(tmp_path), log=lambda s: None)
    assert calls == ["first", "second"]
    assert manifest.read_manifest(str(tmp_path), "third") is None

    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    lines: list[str] = []
    P.run_pipeline(cfg, str(tmp_path), log=lines.append)
    assert calls == ["first", "second", "third"]
    assert any("first: up to date, skipped" in line for line in lines)
    assert any("third: done in" in line for line in lines)


def test_changed_config_reruns_the_stage_and_everything_after(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    P.run_pipeline(load_config(None), str(tmp_path), log=lambda s: None)
    calls.clear()
    P.run_pipeline(load_config(None, ["sampling.k=3"]), str(tmp_path), log=lambda s: None)
    assert calls == ["second", "third"]  # first depends only on `data`
    calls.clear()
    P.run_pipeline(load_config(None, ["sampling.k=3"]), str(tmp_path), log=lambda s: None)
    assert calls == []


def test_manifest_records_counts_and_versions(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(P, "stages", lambda c: _stages(calls))
    P.run_pipeline(load_config(None), str(tmp_path), log=lambda s: None)
    body = manifest.read_manifest(str(tmp_path), "second")
    assert body["counts"] == {"rows": 2}
    assert {"torch", "ray", "transformers"} <= set(body["versions"])
