"""Loaders: one parse function per published data set format, raw files -> `items` rows + quarantine rows.

Each loader reads the files exactly as their publishers distribute them, through pyarrow filesystems (so
`path`/`images` may be local paths or URIs such as `s3://bucket/vqa/...`), and sets `metric`, `answerable`,
`choices` and `category` for its data set. Loaders only parse text: image files are opened and validated
later, in the prepare stage's Ray Data map (`inbol_ray.data.prepare`).

`data.datasets[*].format` names and what `path` / `images` mean:

| format | path | images | metric | answerable |
|---|---|---|---|---|
| `vqav2` | `v2_OpenEnded_mscoco_<sub>_questions.json` (annotations `v2_mscoco_<sub>_annotations.json` beside it) | COCO 2014 folder, `COCO_<sub>_<id:012d>.jpg` | vqa_soft | true |
| `scienceqa` | `problems.json` (split `train` for spec split train, else `test`) | ScienceQA `images/` (`<split>/<pid>/image.png`) | mc_letter | true |
| `oven` | `oven_entity_<split>.jsonl` or `oven_query_<split>.jsonl` | `oven_images/` (`<2 digits>/<image_id>.jpg` or flat) | exact | true |
| `aokvqa` | `aokvqa_v1p0_<split>.json` (direct answers) | COCO 2017 folder, `<id:012d>.jpg` | vqa_soft | true |
| `aokvqa_mc` | same file, multiple-choice task | COCO 2017 folder | mc_letter | true |
| `gqa` | questions JSON, e.g. `testdev_balanced_questions.json` | GQA `images/`, `<imageId>.jpg` | exact | true |
| `mmmu` | MMMU Parquet file, or folder (its `validation-*.parquet`) | unused (embedded) | mc_letter | true |
| `mmbench` | MMBench TSV, e.g. `MMBench_DEV_EN.tsv` | unused (base64 in the TSV) | mc_letter | true |
| `vizwiz` | VizWiz annotations `val.json` / `train.json` | VizWiz image folder (`val/`) | vqa_soft | from `answerable` |
| `unanswerable_jsonl` | our JSONL (see `parse_unanswerable_jsonl`) | optional base for relative images (default: JSONL folder) | mc_letter with choices, else exact | false |
| `items` | Parquet file or folder already in the `items` schema | unused | as stored | as stored |

Item ids are `<spec name>:<native key>` (question_id, pid, data_id, index, ...) so they stay unique when
several data sets share one `items` table. Errors: a file not in its format raises `DataFormatError` naming
the file and field; a bad row becomes a quarantine row whose reason names the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import DataFormatError, Parsed
from inbol_ray.data.loaders.embedded import items_table, parse_items, parse_mmbench, parse_mmmu
from inbol_ray.data.loaders.evaluation import (
    parse_aokvqa,
    parse_aokvqa_mc,
    parse_gqa,
    parse_unanswerable_jsonl,
    parse_vizwiz,
)
from inbol_ray.data.loaders.training import parse_oven, parse_scienceqa, parse_vqav2, vqav2_annotations_path

LOADERS: dict[str, Callable[[DatasetSpec], Parsed]] = {
    "vqav2": parse_vqav2,
    "scienceqa": parse_scienceqa,
    "oven": parse_oven,
    "aokvqa": parse_aokvqa,
    "aokvqa_mc": parse_aokvqa_mc,
    "gqa": parse_gqa,
    "mmmu": parse_mmmu,
    "mmbench": parse_mmbench,
    "vizwiz": parse_vizwiz,
    "unanswerable_jsonl": parse_unanswerable_jsonl,
    "items": parse_items,
}

# Formats whose images live in a separate folder that must be given.
NEEDS_IMAGES = frozenset({"vqav2", "scienceqa", "oven", "aokvqa", "aokvqa_mc", "gqa", "vizwiz"})

__all__ = ["LOADERS", "NEEDS_IMAGES", "DataFormatError", "Parsed", "items_table", "load", "spec_problems"]


def spec_problems(spec: DatasetSpec) -> list[str]:
    """Everything wrong with a spec's inputs that can be seen without reading them: one line each.

    Checked before any Ray work starts, so a typo in a path costs a second, not a cluster start-up.
    """
    label = f"{spec.name or '<no name>'} (format {spec.format or '<none>'})"
    if spec.format not in LOADERS:
        return [f"{label}: unknown format; known: {', '.join(LOADERS)}"]
    problems = [f"{label}: 'name' is empty"] if not spec.name else []
    wanted = [("path", spec.path)]
    if spec.format == "vqav2" and spec.path:
        try:
            wanted.append(("annotations", vqav2_annotations_path(spec.path)))
        except DataFormatError as exc:
            problems.append(f"{label}: {exc}")
    if spec.format in NEEDS_IMAGES or spec.images:
        wanted.append(("images", spec.images))
    for what, uri in wanted:
        if not uri:
            problems.append(f"{label}: '{what}' is not set")
        elif not dio.exists(uri):
            problems.append(f"{label}: {what} not found: {uri}")
    return problems


def load(spec: DatasetSpec) -> Parsed:
    """Parse one data set spec with its format's loader (file-level problems raise DataFormatError).

    Local paths are made absolute first: `source` columns and image paths must mean the same file to every
    Ray worker, whatever its working directory.
    """
    if spec.format not in LOADERS:
        raise DataFormatError(f"{spec.name}: unknown format {spec.format!r}; known: {', '.join(LOADERS)}")
    images = dio.absolute(spec.images) if spec.images else ""
    return LOADERS[spec.format](dataclasses.replace(spec, path=dio.absolute(spec.path), images=images))
