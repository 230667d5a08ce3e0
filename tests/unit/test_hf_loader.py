"""Format `hf`: Hugging Face `datasets` releases read from their files (Parquet, `save_to_disk` Arrow streams,
a real hub cache), through the presets' column maps: where the files of a split are, what is refused and
why, row problems quarantined by field, rows streamed in bounded chunks.

The releases here are small hand-made files in each release's schema (`export.hf_formats` holds the
schemas); tests/integration/test_hf_formats.py checks whole ShapesWorld sets against their published formats.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import ConfigError, DataConfig, DatasetSpec
from inbol_ray.data.export.hf_formats import (
    AOKVQA_SCHEMA,
    GQA_IMAGES,
    GQA_QUESTIONS,
    MMBENCH_SCHEMA,
    VQAV2_SCHEMA,
)
from inbol_ray.data.loaders import DataFormatError, load, load_streaming, spec_problems
from inbol_ray.data.loaders import hf as hf_loader

COMMITS = ("c" * 40, "d" * 40)


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (shade, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def vqav2_rows(n: int, start: int = 0) -> list[dict]:
    answers = [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
    return [
        {
            "question_type": "what colour is",
            "multiple_choice_answer": "red",
            "answers": answers,
            "image_id": i,
            "answer_type": "other",
            "question_id": i * 1000,
            "question": f"What colour is shape {i}?",
            "image": {"bytes": png(i), "path": f"COCO_val2014_{i:012d}.jpg"},
        }
        for i in range(start, start + n)
    ]


def write(table_rows: list[dict], schema: pa.Schema, path: Path, row_group_size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), path, row_group_size=row_group_size)
    return path


def hf_spec(path: Path | str, preset: str = "lmms-lab/VQAv2", **kw) -> DatasetSpec:
    kw = {"name": "set", "split": "id_test", **kw}
    return DatasetSpec(format="hf", path=str(path), preset=preset, **kw)


def keys(parsed) -> list[str]:
    return [row[S.ID].split(":", 1)[1] for row in parsed.items]


# --- config: what a path is -----------------------------------------------------------------------------


def test_hub_ids_become_hf_uris_that_data_root_leaves_alone() -> None:
    data = DataConfig(
        source="files",
        root="/data",
        datasets=[
            DatasetSpec(name="a", format="hf", path="lmms-lab/VQAv2", split="id_test"),
            DatasetSpec(name="b", format="hf", path="lmms-lab/GQA@refs/convert/parquet", split="ood_test"),
            DatasetSpec(
                name="c", format="hf", path="hf/lmms-lab/MMMU", preset="lmms-lab/MMMU", split="ood_test"
            ),
            DatasetSpec(name="d", format="hf", path="./org/name", preset="lmms-lab/MMMU", split="ood_test"),
        ],
    )
    assert [d.path for d in data.datasets] == [
        "hf://datasets/lmms-lab/VQAv2",
        "hf://datasets/lmms-lab/GQA@refs/convert/parquet",
        "/data/hf/lmms-lab/MMMU",  # two components: a folder, under data.root
        "/data/./org/name",
    ]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"format": "hf", "path": "hf/lmms-lab/VQAv2"}, "needs `preset`"),
        ({"format": "hf", "path": "hf://models/org/x"}, "is not a data set"),
        ({"format": "vqav2", "path": "q.json", "hf_split": "validation"}, "hf_split apply to format hf only"),
        ({"format": "mmmu", "path": "mmmu", "preset": "lmms-lab/MMMU"}, "preset apply to format hf only"),
    ],
)
def test_spec_fields_that_cannot_work_are_config_errors(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DatasetSpec(name="x", **kw)


def test_unknown_preset_is_named_before_reading(tmp_path: Path) -> None:
    (problem,) = spec_problems(hf_spec(tmp_path, preset="lmms-lab/NoSuch"))
    assert "no built-in column map 'lmms-lab/NoSuch'" in problem and "lmms-lab/VQAv2" in problem


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "kw", "reason"),
    [
        ("lmms-lab/VizWiz-VQA", {"split": "unanswerable_test"}, "drops VizWiz's `answerable` flag"),
        ("lmms-lab/VizWiz-VQA", {"split": "val"}, "drops VizWiz's `answerable` flag"),
        ("lmms-lab/VQAv2", {"hf_split": "testdev"}, "'testdev' split has no answers"),
        ("lmms-lab/VQAv2", {"hf_split": "test"}, "'test' split has no answers"),
        ("lmms-lab/GQA", {"hf_split": "test"}, "'test_balanced_instructions' questions carry no answers"),
        ("lmms-lab/GQA", {"hf_config": "testdev_balanced_images"}, "not a questions config"),
        ("lmms-lab/MMMU", {"hf_split": "test"}, "MMMU's test answers are hidden"),
        ("lmms-lab/MMBench", {"hf_split": "test"}, "MMBench's test answers are withheld"),
        ("HuggingFaceM4/A-OKVQA", {"hf_split": "test"}, "test split has no correct_choice_idx"),
    ],
)
def test_releases_that_drop_what_grading_needs_are_refused(
    tmp_path: Path, preset: str, kw: dict, reason: str
) -> None:
    split = kw.pop("split", "ood_test")
    spec = DatasetSpec(name="s", format="hf", path=str(tmp_path), preset=preset, split=split, **kw)
    (problem,) = spec_problems(spec)  # before any Ray work
    assert reason in problem
    with pytest.raises(DataFormatError, match=reason.replace("(", r"\(")):
        load(spec)


def test_a_release_with_one_answer_per_question_is_refused_for_vqa_accuracy(tmp_path: Path) -> None:
    one_answer = pa.schema([f for f in VQAV2_SCHEMA if f.name != "answers"])
    rows = [{k: v for k, v in r.items() if k != "answers"} for r in vqav2_rows(2)]
    write(rows, one_answer, tmp_path / "data" / "validation-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match=r"missing field\(s\) \['answers'\].*needs the ten answers"):
        load(hf_spec(tmp_path))


# --- rows -----------------------------------------------------------------------------------------------


def test_bad_rows_are_quarantined_naming_the_field(tmp_path: Path) -> None:
    rows = vqav2_rows(4)
    rows[1]["image"] = {"bytes": None, "path": "COCO_val2014_000000000001.jpg"}
    rows[2]["answers"] = []
    rows[3]["question"] = " "
    write(rows, VQAV2_SCHEMA, tmp_path / "data" / "validation-00000-of-00001.parquet")
    parsed = load(hf_spec(tmp_path))
    assert keys(parsed) == ["0"]
    reasons = {row[S.ROW_KEY]: row[S.REASON] for row in parsed.quarantine}
    assert reasons == {
        "set:1000": "missing field 'image' (only a path, 'COCO_val2014_000000000001.jpg': the release must "
        "embed the bytes)",
        "set:2000": "field 'answers' must be a non-empty list of {answer: ...}",
        "set:3000": "missing field 'question'",
    }
    (item,) = parsed.items
    assert item[S.ANSWERS] == ["red"] * 10 and item[S.METRIC] == "vqa_soft" and item[S.IMAGE] == png(0)
    assert item[S.SOURCE] == f"{tmp_path}/data/validation-00000-of-00001.parquet"


def test_multiple_choice_rows_map_options_and_letters(tmp_path: Path) -> None:
    base = {"category": "c", "source": "s", "L2-category": "l", "comment": "", "split": "dev", "image": {"bytes": png(1), "path": None}}  # fmt: skip
    mmbench = [
        {
            **base,
            "index": "0",
            "question": "Q?",
            "hint": "nan",
            "answer": "B",
            "A": "x",
            "B": "y",
            "C": "nan",
            "D": None,
        },  # fmt: skip
        {
            **base,
            "index": "1",
            "question": "Q?",
            "hint": "Look.",
            "answer": "C",
            "A": "x",
            "B": "y",
            "C": "z",
            "D": "w",
        },  # fmt: skip
        {
            **base,
            "index": "2",
            "question": "Q?",
            "hint": None,
            "answer": "C",
            "A": "x",
            "B": "y",
            "C": None,
            "D": None,
        },  # fmt: skip
    ]
    write(mmbench, MMBENCH_SCHEMA, tmp_path / "mmb" / "en" / "dev-00000-of-00001.parquet")
    parsed = load(hf_spec(tmp_path / "mmb", preset="lmms-lab/MMBench"))
    first, second = parsed.items
    assert (first[S.QUESTION], first[S.CHOICES], first[S.ANSWERS]) == (
        "Q?",
        ["x", "y"],
        ["B"],
    )  # "nan" = absent
    assert (second[S.QUESTION], second[S.CHOICES], second[S.ANSWERS]) == (
        "Look.\nQ?",
        ["x", "y", "z", "w"],
        ["C"],
    )
    assert [row[S.REASON] for row in parsed.quarantine] == [
        "field 'answer' ('C') is not one of the 2 option letters"
    ]

    aok = [
        {"image": {"bytes": png(2), "path": None}, "question_id": "q1", "question": "Why?", "choices": ["a", "b", "c", "d"],
         "correct_choice_idx": 3, "direct_answers": ["d"] * 10, "difficult_direct_answer": True, "rationales": []},
        {"image": {"bytes": png(2), "path": None}, "question_id": "q2", "question": "Why?", "choices": ["a", "b", "c", "d"],
         "correct_choice_idx": 4, "direct_answers": ["d"] * 10, "difficult_direct_answer": False, "rationales": []},
    ]  # fmt: skip
    write(aok, AOKVQA_SCHEMA, tmp_path / "aok" / "data" / "validation-00000-of-00001.parquet")
    mc = load(hf_spec(tmp_path / "aok", preset="HuggingFaceM4/A-OKVQA"))
    assert [(r[S.ANSWERS], r[S.METRIC]) for r in mc.items] == [(["D"], "mc_letter")]
    assert mc.quarantine[0][S.REASON] == "field 'correct_choice_idx' (4) is not an index into 4 choices"
    da = load(hf_spec(tmp_path / "aok", preset="HuggingFaceM4/A-OKVQA:direct_answers"))
    assert [(r[S.ANSWERS], r[S.CATEGORY], r[S.CHOICES]) for r in da.items] == [
        (["d"] * 10, "direct_answer_difficult", None),
        (["d"] * 10, "direct_answer", None),
    ]


# --- where a split's files are --------------------------------------------------------------------------


def test_a_split_is_found_in_each_hub_layout(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    write(vqav2_rows(2, 0), VQAV2_SCHEMA, hub / "data" / "validation-00000-of-00002.parquet")
    write(vqav2_rows(2, 2), VQAV2_SCHEMA, hub / "data" / "validation-00001-of-00002.parquet")
    write(vqav2_rows(1, 9), VQAV2_SCHEMA, hub / "data" / "testdev-00000-of-00001.parquet")
    assert keys(load(hf_spec(hub))) == ["0", "1000", "2000", "3000"]  # both shards, in order; no testdev
    converted = tmp_path / "converted"  # the Hub's parquet conversion: <config>/<split>/NNNN.parquet
    write(vqav2_rows(1, 5), VQAV2_SCHEMA, converted / "default" / "validation" / "0000.parquet")
    assert keys(load(hf_spec(converted))) == ["5000"]
    bare = tmp_path / "bare"  # a folder of one split's shards, no split names
    write(vqav2_rows(1, 6), VQAV2_SCHEMA, bare / "0000.parquet")
    write(vqav2_rows(1, 7), VQAV2_SCHEMA, bare / "0001.parquet")
    assert keys(load(hf_spec(bare))) == ["6000", "7000"]
    assert keys(load(hf_spec(bare / "0001.parquet"))) == ["7000"]
    with pytest.raises(
        DataFormatError, match=r"no Parquet files .*split 'train'.*splits seen: \['testdev', 'validation'\]"
    ):
        load(hf_spec(hub, hf_split="train"))


def test_the_cards_configs_say_where_a_split_is(tmp_path: Path) -> None:
    """A card's `configs:` YAML (how `datasets` finds splits) wins over the naming conventions."""
    write(vqav2_rows(1, 1), VQAV2_SCHEMA, tmp_path / "data" / "validation-00000-of-00001.parquet")
    write(vqav2_rows(1, 2), VQAV2_SCHEMA, tmp_path / "odd" / "place" / "val-part0.parquet")
    write(vqav2_rows(1, 3), VQAV2_SCHEMA, tmp_path / "odd" / "place" / "deeper" / "val-part1.parquet")
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: validation\n    path: odd/**/val-*\n---\n# card\n"
    (tmp_path / "README.md").write_text(card)
    assert keys(load(hf_spec(tmp_path))) == ["3000", "2000"]  # sorted paths: odd/place/deeper/... first
    (tmp_path / "README.md").write_text(card.replace("odd/**/val-*", "odd/place/val-*"))
    assert keys(load(hf_spec(tmp_path))) == ["2000"]  # `*` stays inside a folder
    (tmp_path / "README.md").write_text(card.replace("config_name: default", "config_name: only"))
    assert keys(load(hf_spec(tmp_path))) == ["3000", "2000"]  # a card's only config is its default
    two = card.replace("config_name: default", "config_name: one").replace(
        "---\n#", "- config_name: two\n---\n#"
    )
    (tmp_path / "README.md").write_text(two)
    assert keys(load(hf_spec(tmp_path))) == ["1000"]  # the card names no default config: conventions


def save_to_disk(table: pa.Table, folder: Path, split: str, batch_rows: int = 2) -> Path:
    """What `Dataset.save_to_disk` writes: Arrow IPC stream files listed in state.json."""
    folder.mkdir(parents=True)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split, "_fingerprint": "f"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_save_to_disk_folders_read_like_the_parquet_release(tmp_path: Path) -> None:
    rows = vqav2_rows(5)
    rows[3]["image"] = None
    parquet = load(
        hf_spec(write(rows, VQAV2_SCHEMA, tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet"))
    )
    table = pa.Table.from_pylist(rows, schema=VQAV2_SCHEMA)
    single = load(hf_spec(save_to_disk(table, tmp_path / "one", "validation")))
    save_to_disk(table, tmp_path / "dict" / "validation", "validation")
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    in_dict = load(hf_spec(tmp_path / "dict"))

    def comparable(parsed):
        return [{k: v for k, v in r.items() if k != S.SOURCE} for r in parsed.items], len(parsed.quarantine)

    assert comparable(single) == comparable(in_dict) == comparable(parquet)
    assert len(parquet.items) == 4 and parquet.quarantine[0][S.ROW_KEY] == "set:3000"
    assert single.items[0][S.SOURCE] == f"{tmp_path}/one/data-00000-of-00001.arrow"
    with pytest.raises(
        DataFormatError, match=r"no split 'train' in this save_to_disk folder \(splits: \['validation'\]\)"
    ):
        load(hf_spec(tmp_path / "dict", hf_split="train"))


# --- GQA: images in a config of their own ---------------------------------------------------------------


def gqa_release(root: Path, n: int, missing: str = "") -> Path:
    questions = [
        {"id": f"q{i}", "imageId": f"img{i % 5}", "question": f"Is it {i}?", "answer": "yes",
         "types": {"structural": "verify", "semantic": "obj", "detailed": "x"}}
        for i in range(n)
    ]  # fmt: skip
    questions.append({"id": "qx", "imageId": missing or "nowhere", "question": "?", "answer": "no"})
    images = [{"id": f"img{k}", "image": {"bytes": png(k), "path": None}} for k in reversed(range(5))]
    write(questions, GQA_QUESTIONS, root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet")
    write(
        images,
        GQA_IMAGES,
        root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        row_group_size=2,
    )
    return root


def test_gqa_questions_are_joined_with_their_images_by_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hf_loader, "QUESTION_BATCH", 3)  # several fetches, each reading only its row groups
    parsed = load(hf_spec(gqa_release(tmp_path / "gqa", 8), preset="lmms-lab/GQA", split="ood_test"))
    assert [r[S.IMAGE] for r in parsed.items] == [png(i % 5) for i in range(8)]
    assert {(r[S.METRIC], r[S.CATEGORY], tuple(r[S.ANSWERS])) for r in parsed.items} == {
        ("exact", "verify", ("yes",))
    }
    assert [(r[S.ROW_KEY], r[S.REASON]) for r in parsed.quarantine] == [
        ("set:qx", "imageId 'nowhere' has no image in the images config")
    ]


def test_gqa_images_may_come_from_a_folder_of_their_own(tmp_path: Path) -> None:
    release = gqa_release(tmp_path / "gqa", 4)
    images = pq.read_table(release / "testdev_balanced_images" / "testdev-00000-of-00001.parquet")
    folder = save_to_disk(images, tmp_path / "gqa_images_saved", "testdev")
    spec = hf_spec(release, preset="lmms-lab/GQA", split="ood_test", images=str(folder))
    assert [r[S.IMAGE] for r in load(spec).items] == [png(i) for i in range(4)]


# --- streaming ------------------------------------------------------------------------------------------


def test_rows_reach_the_sink_in_bounded_chunks(tmp_path: Path, monkeypatch) -> None:
    write(
        vqav2_rows(7), VQAV2_SCHEMA, tmp_path / "data" / "validation-00000-of-00001.parquet", row_group_size=3
    )
    chunks: list[int] = []
    assert (
        load_streaming(hf_spec(tmp_path), lambda c: chunks.append(len(c)), lambda c: None, chunk_rows=3) == 7
    )
    assert chunks == [3, 3, 1]
    monkeypatch.setattr(hf_loader, "FLUSH_BYTES", 1)  # photos are handed on by their bytes, not only by count
    chunks.clear()
    load_streaming(hf_spec(tmp_path), lambda c: chunks.append(len(c)), lambda c: None, chunk_rows=3)
    assert chunks == [1] * 7


# --- Hub ids, through a real huggingface_hub cache --------------------------------------------------------


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch):
    """`<cache>/datasets--lmms-lab--VQAv2/snapshots/<commit>/data/...` for two commits, `refs/main` -> the
    first and a branch `v2` -> the second, as `huggingface_hub` lays out what it downloads; offline."""
    cache = tmp_path / "hub"
    folder = cache / "datasets--lmms-lab--VQAv2"
    for n, commit in enumerate(COMMITS):
        write(
            vqav2_rows(n + 1),
            VQAV2_SCHEMA,
            folder / "snapshots" / commit / "data" / "validation-00000-of-00001.parquet",
        )
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMITS[0])
    (folder / "refs" / "v2").write_text(COMMITS[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hf_loader.forget()
    yield cache
    hf_loader.forget()


def test_hub_ids_and_revisions_load_from_the_cache(hub_cache: Path) -> None:
    main = DatasetSpec(name="v", format="hf", path="lmms-lab/VQAv2", split="id_test")  # preset: the id's
    assert spec_problems(main) == []
    parsed = load(main)
    assert keys(parsed) == ["0"]
    assert (
        parsed.items[0][S.SOURCE]
        == f"hf://datasets/lmms-lab/VQAv2@{COMMITS[0]}/data/validation-00000-of-00001.parquet"
    )
    assert keys(
        load(hub_spec := DatasetSpec(name="v", format="hf", path="lmms-lab/VQAv2@v2", split="id_test"))
    ) == ["0", "1000"]
    assert hub_spec.path == "hf://datasets/lmms-lab/VQAv2@v2"
    pinned = DatasetSpec(name="v", format="hf", path=f"lmms-lab/VQAv2@{COMMITS[1]}", split="id_test")
    assert keys(load(pinned)) == ["0", "1000"]


def test_a_hub_ids_identity_is_its_commit(hub_cache: Path) -> None:
    """For stage hashes: a branch that moves is a changed input (only the card is fetched to learn it)."""
    assert hf_loader.hub_identity("hf://datasets/lmms-lab/VQAv2@v2") == {
        "hub": "lmms-lab/VQAv2@v2",
        "commit": COMMITS[1],
    }
    assert hf_loader.hub_identity("hf://datasets/lmms-lab/VQAv2") == {
        "hub": "lmms-lab/VQAv2",
        "commit": COMMITS[0],
    }
    assert hf_loader.hub_identity(str(hub_cache)) is None


def test_an_uncached_hub_id_offline_fails_naming_it(hub_cache: Path) -> None:
    spec = DatasetSpec(name="v", format="hf", path="org/absent", preset="lmms-lab/VQAv2", split="id_test")
    message = r"org/absent: HF_HUB_OFFLINE is set and it is not in the hub cache"
    (problem,) = spec_problems(spec)
    assert "org/absent: HF_HUB_OFFLINE is set and it is not in the hub cache" in problem
    with pytest.raises(hf_loader.HubDatasetError, match=message):
        load(spec)
    with pytest.raises(hf_loader.HubDatasetError, match=r"lmms-lab/VQAv2@nope: HF_HUB_OFFLINE is set"):
        load(DatasetSpec(name="v", format="hf", path="lmms-lab/VQAv2@nope", split="id_test"))
