"""The fixture data sets as the loader tests name them: a `DatasetSpec` for a folder under tests/fixtures/,
and the loaded rows keyed the way the assertions read them (items by id, quarantine reasons by row key).

Shared by test_loaders.py (row-level mapping per format) and test_loader_files.py (whole-file problems).
"""

from __future__ import annotations

from pathlib import Path

from inbol_ray.config import DatasetSpec
from inbol_ray.schema import ID, REASON, ROW_KEY

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def spec(name: str, fmt: str, path: str, images: str = "", **kw) -> DatasetSpec:
    return DatasetSpec(
        name=name, format=fmt, path=str(FIX / path), images=str(FIX / images) if images else "", **kw
    )


VQAV2 = spec("vqav2", "vqav2", "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", "vqav2/val2014")


def by_id(items: list[dict]) -> dict[str, dict]:
    return {row[ID]: row for row in items}


def reasons(parsed) -> dict[str, str]:
    return {row[ROW_KEY]: row[REASON] for row in parsed.quarantine}
