"""`jobs.seeds` end to end at smoke size: two seeds of the main job, then the mean ± sd table from their runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from inbol_ray import schema as S
from inbol_ray.data import io as dio
from jobs import seeds as seeds_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_seeds_give_two_runs_and_one_table(
    ray_local, smoke_run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    smoke_dir, smoke = smoke_run
    # Seed 0 is the smoke run itself (every seed key of tiny.yaml is 0): the stages the pipeline test made
    # are reused from the shared run, as a rerun of `jobs.seeds` reuses finished seeds; only its evaluation
    # (other methods) runs again. Seed 1 runs in full.
    smoke_dir.mkdir(parents=True, exist_ok=True)
    (tmp_path / "seed-0").symlink_to(smoke_dir, target_is_directory=True)
    argv = [
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path), "--seeds", "0,1",
        *smoke, "eval.methods=[base,idk_it]",
    ]  # fmt: skip
    assert seeds_job.main(argv) == 0
    out = capsys.readouterr().out
    for seed in (0, 1):  # each seed is an ordinary run with every seed key set
        manifest = tmp_path / f"seed-{seed}" / "manifests" / "prepare.json"
        assert manifest.exists() and (tmp_path / f"seed-{seed}" / "report.md").exists()
    items = [
        dio.read_table(str(tmp_path / f"seed-{s}" / "items"), columns=[S.ID, S.QUESTION]) for s in (0, 1)
    ]
    questions = [t.sort_by(S.ID)[S.QUESTION].to_pylist() for t in items]
    assert questions[0] != questions[1]  # another seed, another world

    stacked = dio.read_table(str(tmp_path / "seeds.parquet")).to_pandas()
    assert sorted(stacked["seed"].unique()) == [0, 1]
    assert set(stacked[S.METHOD]) == {"base", "idk_it"}
    assert {"val", "id_test", "ood_test", "unanswerable_test"} == set(stacked["split"])
    for seed in (0, 1):  # the table's rows are the runs' own metrics
        own = dio.read_table(str(tmp_path / f"seed-{seed}" / "metrics.parquet")).to_pandas()
        mine = stacked[stacked["seed"] == seed].set_index([S.METHOD, S.DATASET])[S.S_TRUST]
        assert mine.to_dict() == own.set_index([S.METHOD, S.DATASET])[S.S_TRUST].to_dict()
    text = (tmp_path / "seeds.md").read_text()
    assert "seeds 0, 1" in text and " ± " in text and "## Out-of-domain" in text and "## Validation" in text
    assert "## Training recipe" in text and text.strip() in out

    # a second call finds both runs finished: nothing is trained again
    assert seeds_job.main(argv) == 0
    again = capsys.readouterr().out
    assert ": running" not in again and again.count("up to date, skipped") >= 2 * 6
