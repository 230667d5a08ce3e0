"""The prepare stage end to end on a real local Ray: every fixture format -> `items` + `quarantine`.

Counts below are the deliberate faults of tests/fixtures (see make_fixtures.py): parse-level rows are
quarantined by the loaders, image-level rows (truncated JPEG, missing file, undecodable bytes) by the Ray
Data map stage, and every data set must satisfy read = items + quarantined.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml

from inbol_ray.config import Config, DataConfig, DatasetSpec, ShapesConfig
from inbol_ray.data import io as dio
from inbol_ray.data.images import decode_image
from inbol_ray.data.prepare import PrepareResult, Sources, read_sources, run_prepare
from inbol_ray.eval.report import read_item_keys, render_report
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import (
    ACC,
    ANSWERABLE,
    ANSWERS,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    ITEMS,
    METHOD,
    METRIC,
    REASON,
    REFR,
    ROW_KEY,
    S_TRUST,
    SPLIT,
    STAGE,
    N,
    conform,
)
from jobs import prepare as prepare_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"


def spec(name: str, fmt: str, path: str, images: str = "", split: str = "id_test", **kw) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        format=fmt,
        path=str(FIX / path),
        images=str(FIX / images) if images else "",
        split=split,
        **kw,
    )


ALL_SPECS = [
    spec("vqav2", "vqav2", "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", "vqav2/val2014", "train"),
    spec("scienceqa", "scienceqa", "scienceqa/problems.json", "scienceqa/images", "train"),
    spec("oven", "oven", "oven/oven_entity_val.jsonl", "oven/oven_images", "train"),
    spec("aokvqa", "aokvqa", "aokvqa/aokvqa_v1p0_val.json", "aokvqa/val2017", "ood_test"),
    spec("aokvqa_mc", "aokvqa_mc", "aokvqa/aokvqa_v1p0_val.json", "aokvqa/val2017", "ood_test"),
    spec("gqa", "gqa", "gqa/testdev_balanced_questions.json", "gqa/images", "ood_test"),
    spec("mmmu", "mmmu", "mmmu", split="ood_test"),
    spec("mmbench", "mmbench", "mmbench/MMBench_DEV_EN.tsv", split="ood_test"),
    spec("vizwiz", "vizwiz", "vizwiz/val.json", "vizwiz/val", "unanswerable_test"),
    spec("beyondvisqa", "unanswerable_jsonl", "unanswerable/beyondvisqa.jsonl", split="unanswerable_test"),
    spec("shapes", "items", "items/items.parquet"),
    spec("scienceqa_test", "scienceqa", "scienceqa/problems.json", "scienceqa/images", text_only=True),
]

# data set -> (read, items, quarantined)
EXPECTED = {
    "vqav2": (6, 2, 4),  # no annotation, no question | truncated JPEG, missing file
    "scienceqa": (4, 1, 3),  # text-only, answer out of range | image.png is text
    "scienceqa_test": (2, 2, 0),  # an image problem and a text-only one (text_only: true)
    "oven": (4, 2, 2),  # malformed line, no entity_text
    "aokvqa": (3, 2, 1),
    "aokvqa_mc": (3, 2, 1),
    "gqa": (3, 2, 1),
    "mmmu": (5, 2, 3),  # open, two images | corrupt embedded PNG
    "mmbench": (5, 2, 3),  # bad base64, answer E | undecodable bytes
    # VizWiz as unanswerable_test: unanswerable rows only, its answerable rows are a set of their own
    "vizwiz": (3, 1, 2),  # answerable=2, answers not a list
    "vizwiz_answerable": (3, 1, 2),  # no question | missing file
    "beyondvisqa": (4, 2, 2),
    "shapes_id_test": (2, 1, 1),  # unknown metric
    "shapes_unanswerable": (1, 1, 0),
}

IMAGE_STAGE_REASONS = {
    "vqav2:2001": "field 'image_path': not a decodable image",
    "vqav2:3001": "field 'image_path': image file not found",
    "scienceqa:5": "field 'image_path': not a decodable image",
    "mmmu:validation_Accounting_4": "field 'image': not a decodable image",
    "mmbench:4": "field 'image': not a decodable image",
    "vizwiz:VizWiz_val_00000002.jpg": "field 'image_path': image file not found",
}


def config(tmp_path: Path, specs: list[DatasetSpec], **data) -> Config:
    return Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=specs, **data))


def prepare(cfg: Config, sources: Sources | None = None, run_dir: str | None = None, **kw) -> PrepareResult:
    """The stage as the pipeline runs it: paths from the run layout of `cfg` (or of `run_dir`)."""
    return run_prepare(cfg, RunLayout.of(cfg, run_dir), sources, **kw)


def test_every_format_through_ray_data(ray_local, tmp_path: Path) -> None:
    result = prepare(config(tmp_path, ALL_SPECS), rows_per_block=8)
    assert {k: (c["read"], c["items"], c["quarantined"]) for k, c in result.counts.items()} == EXPECTED

    items = conform(dio.read_table(result.items_uri), ITEMS, "items")
    rows = {r[ID]: r for r in items.to_pylist()}
    assert len(rows) == items.num_rows == sum(e[1] for e in EXPECTED.values())
    for row in rows.values():  # bytes mode: every kept image is stored and decodes
        assert row[ID] == "scienceqa_test:6" or decode_image(row[IMAGE]).mode == "RGB"
    assert rows["scienceqa_test:6"][IMAGE] is None and rows["scienceqa_test:6"][IMAGE_PATH] is None
    vqa = rows["vqav2:1001"]
    assert (
        vqa[METRIC] == "vqa_soft" and len(vqa[ANSWERS]) == 10 and vqa[IMAGE_PATH].endswith("000000000001.jpg")
    )
    assert decode_image(vqa[IMAGE]).size == (16, 16)
    assert rows["vizwiz:VizWiz_val_00000001.jpg"][ANSWERABLE] is False
    assert rows["vizwiz:VizWiz_val_00000000.jpg"][DATASET] == "vizwiz_answerable"
    assert rows["mmbench:0"][METRIC] == "mc_letter"
    assert all(r[ANSWERABLE] is False for r in rows.values() if r[DATASET] == "beyondvisqa")

    quarantine = dio.read_table(result.quarantine_uri).to_pylist()
    assert len(quarantine) == sum(e[2] for e in EXPECTED.values())
    assert {q[STAGE] for q in quarantine} == {"prepare"}
    got = {q[ROW_KEY]: q[REASON] for q in quarantine}
    for key, reason in IMAGE_STAGE_REASONS.items():
        assert got[key].startswith(reason), (key, got[key])
    assert all(q[REASON] for q in quarantine)

    again = prepare(config(tmp_path, ALL_SPECS), rows_per_block=8)  # rerun overwrites, never appends
    assert dio.read_table(again.items_uri).num_rows == items.num_rows
    assert dio.read_table(again.quarantine_uri).num_rows == len(quarantine)
    layout = RunLayout.of(config(tmp_path, ALL_SPECS))
    assert (again.items_uri, again.quarantine_uri) == (layout.items, layout.quarantine("prepare"))


def test_vizwiz_unanswerable_set_keeps_its_answerable_rows_apart(ray_local, tmp_path: Path) -> None:
    """The paper's VizWiz number is a refusal rate on unanswerable questions: `vizwiz` holds only those,
    the answerable ones are `vizwiz_answerable` (ood_test, so the report's OOD table shows them), and
    every row of val.json is in exactly one of the two sets' items or quarantine."""
    vizwiz = next(s for s in ALL_SPECS if s.name == "vizwiz")
    result = prepare(config(tmp_path, [vizwiz]))
    assert result.counts == {
        "vizwiz": {"read": 3, "items": 1, "quarantined": 2},
        "vizwiz_answerable": {"read": 3, "items": 1, "quarantined": 2},
    }
    assert sum(c["read"] for c in result.counts.values()) == 6  # the six rows of val.json
    items = dio.read_table(result.items_uri).to_pylist()
    assert {(r[DATASET], r[SPLIT], r[ANSWERABLE]) for r in items} == {
        ("vizwiz", "unanswerable_test", False),
        ("vizwiz_answerable", "ood_test", True),
    }
    quarantine = dio.read_table(result.quarantine_uri).to_pylist()
    keys = sorted([r[ID] for r in items] + [q[ROW_KEY] for q in quarantine])
    assert keys == [f"vizwiz:VizWiz_val_{n:08d}.jpg" for n in range(6)]  # each row once, same ids as before

    # The report finds a set's table by the `split` of its items (as write_report reads them), so the set
    # that no config line names still gets its Acc / RefR / s_trust columns in the out-of-domain table.
    keys_table = read_item_keys(result.items_uri)
    splits = keys_table.drop_duplicates(DATASET).set_index(DATASET)[SPLIT].to_dict()
    metrics = pd.DataFrame(
        [
            {METHOD: "base", DATASET: d, N: 1, ACC: 0.0, REFR: r, S_TRUST: r - 1.0}
            for d, r in (("vizwiz", 1.0), ("vizwiz_answerable", 0.0))
        ]
    )
    report = render_report(metrics, splits, ["base"])
    ood = report.split("## Out-of-domain")[1].split("## ")[0]
    unanswerable = report.split("## Unanswerable")[1].split("## ")[0]
    assert "`vizwiz_answerable` (n=1)" in ood and "`vizwiz` (n=1)" in unanswerable

    everything = prepare(
        config(tmp_path, [dataclasses.replace(vizwiz, split="ood_test")]), run_dir=str(tmp_path / "o")
    )
    assert everything.counts == {"vizwiz": {"read": 6, "items": 2, "quarantined": 4}}  # other splits: one set


def test_path_storage_and_size_limits(ray_local, tmp_path: Path) -> None:
    """Path mode keeps file images lazy and embedded ones as bytes; limits quarantine what exceeds them."""
    specs = [ALL_SPECS[0], ALL_SPECS[7], ALL_SPECS[5]]
    cfg = config(tmp_path, specs, image_storage="path")
    result = prepare(cfg)
    rows = {r[ID]: r for r in dio.read_table(result.items_uri).to_pylist()}
    assert rows["vqav2:1001"][IMAGE] is None and Path(rows["vqav2:1001"][IMAGE_PATH]).is_file()
    assert rows["mmbench:0"][IMAGE] is not None and rows["mmbench:0"][IMAGE_PATH] is None
    assert result.counts["gqa"]["items"] == 2

    tiny = config(tmp_path, [ALL_SPECS[5]], max_image_pixels=100)  # fixture images are 16x16 = 256 pixels
    limited = prepare(tiny, run_dir=str(tmp_path / "tiny"))
    assert limited.counts["gqa"] == {"read": 3, "items": 0, "quarantined": 3}
    reasons = [q[REASON] for q in dio.read_table(limited.quarantine_uri).to_pylist()]
    assert sum("16x16 pixels > max_image_pixels 100" in r for r in reasons) == 2
    assert dio.read_table(limited.items_uri).schema.names == ITEMS.names  # empty, but readable


def test_shapes_source(ray_local, tmp_path: Path, monkeypatch) -> None:
    """data.source=shapes takes generate_items' table through the same image check (module faked here)."""
    sample = dio.read_table(str(FIX / "items" / "items.parquet"))
    calls = []

    def generate_items(shapes_cfg, image_size: int) -> pa.Table:
        calls.append(image_size)
        return sample.slice(0, 2)

    fake = types.ModuleType("inbol_ray.data.shapes")
    fake.generate_items = generate_items
    monkeypatch.setitem(sys.modules, "inbol_ray.data.shapes", fake)
    cfg = Config(run_dir=str(tmp_path / "run"))
    result = prepare(cfg, read_sources(cfg))
    assert calls == [cfg.model.image_size]
    assert result.counts == {
        "shapes_id_test": {"read": 1, "items": 1, "quarantined": 0},
        "shapes_unanswerable": {"read": 1, "items": 1, "quarantined": 0},
    }


def test_real_shapes_generator(ray_local, tmp_path: Path) -> None:
    """The lead's ShapesWorld generator, shrunk, through the same stage: nothing may be quarantined."""
    from inbol_ray.data import shapes

    small = {
        "n_pretrain": 20,
        "n_train": 20,
        "n_val": 8,
        "n_id_test": 8,
        "n_ood_test": 8,
        "n_unanswerable_test": 8,
    }
    names = {f.name for f in dataclasses.fields(ShapesConfig)}
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.data.shapes = ShapesConfig(**{k: v for k, v in small.items() if k in names})
    result = prepare(cfg, rows_per_block=16)
    expected = shapes.generate_items(cfg.data.shapes, cfg.model.image_size).num_rows
    assert sum(c["items"] for c in result.counts.values()) == expected
    assert all(c["quarantined"] == 0 for c in result.counts.values())


def test_duplicate_ids_are_quarantined(tmp_path: Path) -> None:
    """Later stages join on id, so a repeated id keeps its first row and quarantines the others."""
    (tmp_path / "u.jsonl").write_text(
        '{"id": "a", "image": "x.png", "question": "q1?"}\n{"id": "a", "image": "y.png", "question": "q2?"}\n'
    )
    cfg = config(
        tmp_path, [DatasetSpec(name="u", format="unanswerable_jsonl", path=str(tmp_path / "u.jsonl"))]
    )
    sources = read_sources(cfg)
    assert sources.items.column(ID).to_pylist() == ["u:a"]
    assert [q[REASON] for q in sources.quarantine] == [
        f"duplicate field 'id' (first row with this id came from {tmp_path / 'u.jsonl'})"
    ]


# --- the job ------------------------------------------------------------------------------------------


def write_config(path: Path, datasets: list[dict], run_dir: Path) -> Path:
    cfg = {"run_dir": str(run_dir), "data": {"source": "files", "datasets": datasets}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_job_fails_fast_listing_every_missing_path(tmp_path: Path) -> None:
    datasets = [
        {"name": "vqav2", "format": "vqav2", "path": "/nope/v2_OpenEnded_mscoco_train2014_questions.json",
         "images": "/nope/train2014"},
        {"name": "mmbench", "format": "mmbench", "path": "/nope/MMBench_DEV_EN.tsv"},
        {"name": "gqa", "format": "gqa", "path": str(FIX / "gqa/testdev_balanced_questions.json")},
    ]  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", datasets, tmp_path / "run")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 30
    for line in [
        "5 input problem(s), nothing started",
        "data.datasets[0] vqav2 (format vqav2): path not found: /nope/v2_OpenEnded_mscoco_train2014_questions.json",
        "data.datasets[0] vqav2 (format vqav2): annotations not found: /nope/v2_mscoco_train2014_annotations.json",
        "data.datasets[0] vqav2 (format vqav2): images not found: /nope/train2014",
        "data.datasets[1] mmbench (format mmbench): path not found: /nope/MMBench_DEV_EN.tsv",
        "data.datasets[2] gqa (format gqa): 'images' is not set",
    ]:
        assert line in proc.stderr
    assert not (tmp_path / "run").exists()


def test_shipped_real_scale_config_fails_fast_without_data(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--config", "configs/llava-1.5-7b.yaml", "--run-dir",
         str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode == 0:
        pytest.skip("the real data sets are present on this machine")
    assert proc.returncode == 2 and "input problem(s), nothing started" in proc.stderr, proc.stderr


def test_job_reports_a_wrong_schema_before_ray(tmp_path: Path, capsys) -> None:
    datasets = [{"name": "gqa", "format": "gqa", "path": str(FIX / "broken/gqa_renamed_questions.json"),
                 "images": str(FIX / "gqa/images")}]  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", datasets, tmp_path / "run")
    assert prepare_job.main(["--config", str(cfg)]) == 2
    assert "gqa_renamed_questions.json: missing field 'imageId'" in capsys.readouterr().err


def test_job_runs_on_an_existing_ray(ray_local, tmp_path: Path, capsys) -> None:
    datasets = [{"name": "vizwiz", "format": "vizwiz", "path": str(FIX / "vizwiz/val.json"),
                 "images": str(FIX / "vizwiz/val"), "split": "unanswerable_test"}]  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", datasets, tmp_path / "ignored")
    assert (
        prepare_job.main(
            ["--config", str(cfg), "--run-dir", str(tmp_path / "run"), "data.max_image_bytes=100000"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "prepare: items 2, quarantined 4 | vizwiz 1/3, vizwiz_answerable 1/3 (items/read)" in out
    assert ray_local.is_initialized()  # the job did not start Ray, so it left it running
    assert (tmp_path / "run" / "items").is_dir() and not (tmp_path / "ignored").exists()
