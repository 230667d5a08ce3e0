"""An annotation file corrected in place (same size) reruns prepare, and its items carry the new answers
(issue 31: before, 40 of 40 items kept their old answers). Real files, a real local Ray, the real runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inbol_ray.config import Config, DataConfig, DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.pipeline import run_pipeline, stage_hashes, stages
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import ANSWERS, ID

pytestmark = pytest.mark.integration

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_an_annotation_edited_in_place_reruns_prepare_and_downstream(ray_local, tmp_path: Path) -> None:
    shutil.copytree(FIX / "vqav2", tmp_path / "vqav2")
    questions = tmp_path / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json"
    spec = DatasetSpec(
        name="vqav2", format="vqav2", path=str(questions), images=str(tmp_path / "vqav2/val2014")
    )
    cfg = Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=[spec]))
    layout = RunLayout.of(cfg)
    lines: list[str] = []

    def prepare() -> dict[str, list[str]]:
        run_pipeline(cfg, layout, only=["prepare"], log=lines.append)
        return {r[ID]: r[ANSWERS] for r in dio.read_table(layout.items).to_pylist()}

    before = prepare()
    assert "red" in before["vqav2:1001"]
    prepare()
    assert lines[-1] == "[1/1] prepare: up to date, skipped", lines

    hashes = stage_hashes(cfg, stages(cfg))
    text = annotations.read_text()
    annotations.write_text(text.replace('"red"', '"tan"'))  # same size: names and sizes cannot tell
    assert annotations.stat().st_size == len(text.encode())
    seen = len(lines)
    after = prepare()
    assert lines[seen] == "[1/1] prepare: running", lines[seen:]
    assert "tan" in after["vqav2:1001"] and "red" not in after["vqav2:1001"]
    changed = stage_hashes(cfg, stages(cfg))
    assert all(changed[name] != hashes[name] for name in hashes), "every stage reads prepare's items"
