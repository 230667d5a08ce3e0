"""ShapesWorld exported as Hugging Face `datasets` releases loads, through format `hf`, into the same items as
the same sets exported in their published formats; from a real hub cache too; and the rehearsal variant
whose evaluation sets come from those releases prepares (configs/rehearsal-hf.yaml, `jobs.rehearse
--variant hf --until prepare`: the full rehearsal is tests/integration/test_rehearsal.py's).

Equal means, per ShapesWorld item: question, answers, choices, metric, category, answerable, split and the
decoded pixels (COCO's 4:3 photos included), whichever format it was read from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inbol_ray import schema as S
from inbol_ray.config import DatasetSpec, ShapesConfig, load_config
from inbol_ray.data import io as dio
from inbol_ray.data import shapes
from inbol_ray.data.export import LAYOUT, RELEASES, export_shapes
from inbol_ray.data.images import decode_image, load_image_bytes
from inbol_ray.data.loaders import hf as hf_loader
from inbol_ray.data.loaders import load, spec_problems
from jobs import rehearse

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMALL = ShapesConfig(n_pretrain=20, n_train=80, n_val=12, n_id_test=16, n_ood_test=24, n_unanswerable_test=12)
COMPARED = (S.QUESTION, S.ANSWERS, S.CHOICES, S.METRIC, S.CATEGORY, S.ANSWERABLE, S.SPLIT, S.DATASET)
COMMIT = "e" * 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("shapes_export")
    return out, export_shapes(shapes.generate_items(SMALL, 48), str(out))


def hf_spec(name: str, entry: dict, path: str | None = None) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        format="hf",
        split=LAYOUT[name][1],
        path=path or entry["path"],
        preset=entry["preset"],
        hf_split=entry["hf_split"],
        hf_config=entry["hf_config"],
    )


def by_shapes_id(items: list[dict], ids: dict[str, str]) -> dict[str, dict]:
    """Loaded items keyed by the ShapesWorld item they were exported from (`ids`: native key -> id)."""
    return {ids[item[S.ID].split(":", 1)[1]]: item for item in items}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_each_release_gives_the_items_of_the_published_format(exported, name: str) -> None:
    out, manifest = exported
    entry, published = manifest["hf"][name], manifest["datasets"][name]
    fmt, split, path, images = LAYOUT[name]
    assert entry["rows"] == published["rows"] > 0
    original = load(
        DatasetSpec(name=name, format=fmt, split=split, path=published["path"], images=published["images"])
    )
    released = load(hf_spec(name, entry))
    assert original.quarantine == [] and released.quarantine == []
    want, got = by_shapes_id(original.items, published["ids"]), by_shapes_id(released.items, entry["ids"])
    assert sorted(got) == sorted(want) and len(got) == entry["rows"]
    for shapes_id, item in got.items():
        assert {c: item[c] for c in COMPARED} == {c: want[shapes_id][c] for c in COMPARED}, shapes_id
        assert item[S.IMAGE] is not None and item[S.IMAGE_PATH] is None  # the release's embedded bytes
        pixels, expected = (np.asarray(decode_image(load_image_bytes(i))) for i in (item, want[shapes_id]))
        assert pixels.shape == expected.shape and np.array_equal(pixels, expected), shapes_id
    if name not in ("scienceqa",):  # releases that keep the publisher's ids keep the item ids too
        assert {i[S.ID] for i in released.items} == {i[S.ID] for i in original.items}


def test_a_release_in_the_hub_cache_loads_by_id_and_revision(exported, tmp_path: Path, monkeypatch) -> None:
    """The exported GQA release (questions and images configs) placed in a real hub cache under its id."""
    out, manifest = exported
    entry = manifest["hf"]["gqa"]
    repo = tmp_path / "hub" / "datasets--lmms-lab--GQA"
    shutil.copytree(entry["path"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_loader, "_COMMITS", {})  # this process resolves the id in this cache
    local = load(hf_spec("gqa", entry)).items
    for path in ("lmms-lab/GQA", f"lmms-lab/GQA@{COMMIT}"):
        spec = DatasetSpec(
            name="gqa", format="hf", split="ood_test", path=path
        )  # preset, config, split: defaults
        assert spec_problems(spec) == []
        items = load(spec).items
        assert [{k: v for k, v in i.items() if k != S.SOURCE} for i in items] == [
            {k: v for k, v in i.items() if k != S.SOURCE} for i in local
        ]
        assert items[0][S.SOURCE].startswith(
            f"hf://datasets/lmms-lab/GQA@{COMMIT}/testdev_balanced_instructions/"
        )
    absent = DatasetSpec(name="gqa", format="hf", split="ood_test", path="lmms-lab/GQA@v9")
    assert spec_problems(absent) == [
        f"gqa (format hf): lmms-lab/GQA@v9: HF_HUB_OFFLINE is set and it is not in the hub cache ({tmp_path / 'hub'}); "
        "fetch it where the Hub is reachable (`hf download lmms-lab/GQA --repo-type dataset`) or point `path` at a "
        "local copy"
    ]


def test_the_hf_variant_keeps_the_7b_data_sets() -> None:
    """configs/rehearsal-hf.yaml repeats the 7B config's list (lists replace when layered): same names,
    roles and sizes; every evaluation set with a release reads it, the others keep their published format."""
    real = load_config([ROOT / "configs" / "llava-1.5-7b.yaml", ROOT / "configs" / "rehearsal.yaml"])
    variant = load_config(
        [*(ROOT / "configs" / f for f in ("llava-1.5-7b.yaml", "rehearsal.yaml", "rehearsal-hf.yaml"))]
    )
    for before, after in zip(real.data.datasets, variant.data.datasets, strict=True):
        assert (before.name, before.split, before.sample_rows) == (after.name, after.split, after.sample_rows)
        released = before.split != "train" and before.name in RELEASES
        assert after.format == ("hf" if released else before.format), before.name
        if not released:
            assert after == before, before.name


def test_the_hf_rehearsal_variant_prepares(ray_local, smoke_run, tmp_path: Path) -> None:
    embedded, smoke = smoke_run
    argv = [
        "--run-dir",
        str(tmp_path),
        "--embedded-run-dir",
        str(embedded),
        *(f"--embedded={o}" for o in smoke),
    ]
    assert rehearse.main([*argv, "--variant", "hf", "--until", "prepare", 'prompt.system=""']) == 0
    hf = json.loads(dio.read_bytes(str(tmp_path / "data" / "shapesworld_export.json")))["hf"]
    items = dio.read_table(str(tmp_path / "run" / "items")).to_pandas()
    for name, entry in hf.items():
        if LAYOUT[name][1] == "train":
            continue
        mine = items[items[S.DATASET] == name]
        assert len(mine) == entry["rows"] > 0, name
        assert mine[S.SOURCE].str.startswith(f"{tmp_path}/data/hf/{entry['preset']}/").all(), name
        assert mine[S.IMAGE].notna().all() and mine[S.IMAGE_PATH].isna().all(), name
