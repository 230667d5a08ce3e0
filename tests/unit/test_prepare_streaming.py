"""The prepare stage's parse step streams: a loader hands rows over in chunks, `read_sources` stages them as
Parquet parts, so the driver's memory does not grow with the file (OVEN's JSONL has millions of rows).

No Ray here: parsing and staging run on the driver before any Ray work. The memory test measures Python
allocations (tracemalloc) while 3k and then 30k rows are parsed with 2k-row chunks; the whole-list `load`
of the same 30k rows is measured beside it, so the test shows it can see growth when there is some.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from inbol_ray.config import Config, DataConfig, DatasetSpec
from inbol_ray.data.loaders import DataFormatError, load, load_streaming
from inbol_ray.data.prepare import read_sources
from inbol_ray.schema import DATASET, ID, REASON, ROW_KEY


def oven_file(folder: Path, rows: int, *, start: int = 0, name: str = "oven_entity_train.jsonl") -> Path:
    """An OVEN-format JSONL (the loader's fields, LLaVA-like question lengths), one image per 50 rows."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w") as out:
        for i in range(start, start + rows):
            row = {
                "data_id": f"oven_entity_train_{i:08d}",
                "image_id": f"oven_{i // 50:08d}",
                "question": f"What is the name of the building shown in this photograph, number {i % 97}?",
                "entity_text": f"Entity number {i}",
                "entity_id": f"Q{i}",
                "data_split": "train_entity",
            }
            out.write(json.dumps(row) + "\n")
    return path


def oven_spec(path: Path, name: str = "oven") -> DatasetSpec:
    return DatasetSpec(
        name=name, format="oven", path=str(path), images=str(path.parent / "images"), split="train"
    )


def config(tmp_path: Path, specs: list[DatasetSpec]) -> Config:
    return Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=specs))


def test_loader_hands_rows_over_in_chunks(tmp_path: Path) -> None:
    path = oven_file(tmp_path, 2500)
    with path.open("a") as out:
        out.write("{not json\n\n[1, 2]\n")
    chunks: list[int] = []
    bad: list[dict] = []
    read = load_streaming(oven_spec(path), lambda rows: chunks.append(len(rows)), bad.extend, chunk_rows=1000)
    assert chunks == [1000, 1000, 500]
    assert [r[ROW_KEY] for r in bad] == ["oven:line2501", "oven:line2503"]  # the blank line is not a row
    assert read == 2502
    assert load(oven_spec(path)).n_input == read  # the same rows as the whole-list path


def test_streamed_file_without_a_field_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "oven_entity_train.jsonl"
    path.write_text("".join(json.dumps({"data_id": f"d{i}", "image_id": "i", "question": "q?", "entity": "x"}) + "\n"
                            for i in range(30)))  # fmt: skip
    with pytest.raises(DataFormatError, match="missing field 'entity_text' \\(no row has it"):
        load_streaming(oven_spec(path), lambda rows: None, lambda rows: None, chunk_rows=7)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_parse_memory_stays_flat_as_the_file_grows(tmp_path: Path) -> None:
    small = oven_file(tmp_path / "small", 3_000)
    large = oven_file(tmp_path / "large", 30_000)
    streamed = {
        n: _peak_mib(
            lambda p=p, n=n: read_sources(config(tmp_path, [oven_spec(p)]), str(tmp_path / f"s{n}"), 2_000)
        )
        for n, p in ((3_000, small), (30_000, large))
    }
    whole = _peak_mib(lambda: load(oven_spec(large)))
    assert streamed[30_000] <= 1.25 * streamed[3_000], streamed
    assert whole >= 4 * streamed[30_000], (whole, streamed)  # the measurement does see a growing driver
    sources = read_sources(config(tmp_path, [oven_spec(large)]), str(tmp_path / "check"), 2_000)
    assert sources.read == {"oven": 30_000} and not sources.duplicates
    assert sources.items.num_rows == 30_000


def test_repeated_ids_across_chunks_keep_the_first_row(tmp_path: Path) -> None:
    path = oven_file(tmp_path, 2_500)
    again = oven_file(tmp_path / "b", 1_000, start=2_000)  # ids 2000..2999: 500 of them repeat earlier rows
    with path.open("a") as out:
        out.write(again.read_text())
    sources = read_sources(config(tmp_path, [oven_spec(path)]), str(tmp_path / "staging"), 700)
    items = sources.items
    assert items.num_rows == 3_000 and len(set(items[ID].to_pylist())) == 3_000
    assert items[ID][2_000].as_py() == "oven:oven_entity_train_00002000"  # the first of each id, in place
    repeated = [r for r in sources.quarantine if r[REASON].startswith("duplicate")]
    assert len(repeated) == len(sources.duplicates) == 500
    assert sorted(sources.duplicates) == list(range(2_500, 3_000))  # the later rows, by input position
    assert all(str(path) in r[REASON] and r[DATASET] == "oven" for r in repeated)
    assert sources.read == {"oven": 3_500}  # read = items + quarantined, as the stage checks
