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
| `oven` | `oven_entity_<split>.jsonl` or `oven_query_<split>.jsonl` | `oven_images/` (`<2 digits>/<image_id>.jpg` or flat) | exact (entity title, note 1) | true |
| `aokvqa` | `aokvqa_v1p0_<split>.json` (direct answers) | COCO 2017 folder, `<id:012d>.jpg` | vqa_soft over the 10 direct answers (note 2) | true |
| `aokvqa_mc` | same file, multiple-choice task | COCO 2017 folder | mc_letter (4 options) | true |
| `gqa` | questions JSON, e.g. `testdev_balanced_questions.json` | GQA `images/`, `<imageId>.jpg` | exact | true |
| `mmmu` | MMMU Parquet file, or folder (its `validation-*.parquet`) | unused (embedded) | mc_letter | true |
| `mmbench` | MMBench TSV, e.g. `MMBench_DEV_EN.tsv` | unused (base64 in the TSV) | mc_letter | true |
| `vizwiz` | VizWiz annotations `val.json` / `train.json` | VizWiz image folder (`val/`) | vqa_soft | from `answerable`; split `unanswerable_test` keeps only unanswerable rows (note 3) |
| `unanswerable_jsonl` | our JSONL (see `parse_unanswerable_jsonl`) | optional base for relative images (default: JSONL folder) | mc_letter with choices (BeyondVisQA, note 4), else exact | false |
| `items` | Parquet file or folder already in the `items` schema | unused | as stored | as stored |
| `hf` | a Hugging Face `datasets` release: Hub id `org/name[@rev]`, a folder in the Hub's layout, a `save_to_disk` folder or one Parquet file; `preset` names its column map, `hf_split` / `hf_config` what to read (note 5) | unused (embedded); GQA: optional folder of its images config | the preset's (as the set's own format) | true (VizWiz-VQA refused: no flag) |

Notes on grading (each loader's docstring has the details and the reasons):
1. OVEN: the response and the Wikipedia title `entity_text`, both VQA-normalised, must be equal. OVEN itself
   links free text to one of ~6M entities and scores the entity id (accuracy on seen / unseen entities and
   their harmonic mean); without that list there are no aliases here, so this is stricter.
2. A-OKVQA direct answers: official VQA accuracy (leave-one-out over the 10 answers, both sides
   normalised), correct at `grading.vqa_correct_at` (0.5 = at least 2 of 10 annotators). Our Acc is that
   share of right calls, not the A-OKVQA leaderboard's soft DA accuracy (min(1, exact matches / 3)
   averaged); the MC task is the `aokvqa_mc` format.
3. VizWiz as `unanswerable_test`: the paper reports its refusal rate on the unanswerable questions only, so
   `answerable` 0 rows form `<name>` and the `answerable` 1 rows form a second set `<name>_answerable`
   with split `ood_test` (blind users' photos are out of domain). Ids stay `<name>:<image>` in both; other
   splits keep every row in `<name>`. `dataset_names` lists the names a spec writes.
4. BeyondVisQA: choosing its refusal option ("Sorry, I can't help with it", at any letter) is a refusal,
   because the chosen option's text is one (`grading.is_refusal_response`).
5. `hf` (`loaders.hf`, maps in `loaders.hf_presets`, each citing the release's card and lmms-eval task):
   `lmms-lab/VQAv2`, `lmms-lab/GQA`, `lmms-lab/MMMU`, `lmms-lab/MMBench` (`_EN`), `HuggingFaceM4/A-OKVQA`
   (`:direct_answers` for the DA task), `lmms-lab/ScienceQA-IMG` (`lmms-lab/ScienceQA`) give the same
   items as the set's published format. Splits without answers (VQAv2 test/testdev, GQA test, MMMU and
   MMBench test, A-OKVQA test) and lmms-lab/VizWiz-VQA (no `answerable` flag) are refused with the reason.
   A Hub id is fetched by `huggingface_hub` into its cache (only the split's files), `HF_HUB_OFFLINE`
   honoured; `preset` defaults to the id.

Item ids are `<spec name>:<native key>` (question_id, pid, data_id, index, ...) so they stay unique when
several data sets share one `items` table. Errors: a file not in its format raises `DataFormatError` naming
the file and field (so does a JSONL line longer than `data.max_line_bytes`); a bad row becomes a quarantine
row whose reason names the field. Image paths built from a file's values (`image`, `imageId`, a problem id,
`image_id`) must stay under `images`: a value with a `..` component, an absolute path, a URI or a NUL byte
quarantines its row (`common.path_problem`; `unanswerable_jsonl` and `items` keep their documented
absolute paths and URIs, but not `..`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import CHUNK_ROWS, MAX_LINE_BYTES, DataFormatError, Parsed, Sink
from inbol_ray.data.loaders.embedded import items_table, parse_items, parse_mmbench, parse_mmmu
from inbol_ray.data.loaders.evaluation import (
    parse_aokvqa,
    parse_aokvqa_mc,
    parse_gqa,
    parse_unanswerable_jsonl,
    parse_vizwiz,
    vizwiz_answerable_set,
)
from inbol_ray.data.loaders.hf import hf_problems, parse_hf
from inbol_ray.data.loaders.sampling import RowSample
from inbol_ray.data.loaders.training import parse_oven, parse_scienceqa, parse_vqav2, vqav2_annotations_path

LOADERS: dict[str, Callable[[DatasetSpec, Parsed | None], Parsed]] = {
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
    "hf": parse_hf,
}

# Formats whose images live in a separate folder that must be given.
NEEDS_IMAGES = frozenset({"vqav2", "scienceqa", "oven", "aokvqa", "aokvqa_mc", "gqa", "vizwiz"})

__all__ = [
    "LOADERS",
    "NEEDS_IMAGES",
    "DataFormatError",
    "Parsed",
    "dataset_names",
    "items_table",
    "load",
    "load_streaming",
    "spec_problems",
]


def dataset_names(spec: DatasetSpec) -> tuple[str, ...]:
    """The `dataset` names a spec's rows are written under: its name, and `<name>_answerable` for VizWiz
    as an unanswerable set. (`items` keeps the names stored in its file; only reading it tells them.)

    Why it matters: two specs writing one name would merge two sets in every count and table, silently.
    """
    if spec.format == "vizwiz" and (answerable := vizwiz_answerable_set(spec)):
        return (spec.name, answerable)
    return (spec.name,)


def spec_problems(spec: DatasetSpec) -> list[str]:
    """Everything wrong with a spec's inputs that can be seen without reading them: one line each.

    Checked before any Ray work starts, so a typo in a path costs a second, not a cluster start-up.
    """
    label = f"{spec.name or '<no name>'} (format {spec.format or '<none>'})"
    if spec.format not in LOADERS:
        return [f"{label}: unknown format; known: {', '.join(LOADERS)}"]
    problems = [f"{label}: 'name' is empty"] if not spec.name else []
    if spec.format == "hf":  # a Hub id is not a file to stat: hf_problems checks what can be checked
        problems += [f"{label}: {line}" for line in hf_problems(spec)]
        if spec.images and not dio.exists(spec.images):
            problems.append(f"{label}: images not found: {spec.images}")
        return problems
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


def _absolute(spec: DatasetSpec) -> DatasetSpec:
    """Local paths made absolute: `source` columns and image paths must mean the same file to every Ray
    worker, whatever its working directory."""
    if spec.format not in LOADERS:
        raise DataFormatError(f"{spec.name}: unknown format {spec.format!r}; known: {', '.join(LOADERS)}")
    images = dio.absolute(spec.images) if spec.images else ""
    return dataclasses.replace(spec, path=dio.absolute(spec.path), images=images)


def load(spec: DatasetSpec, sample_seed: int = 0, *, max_line_bytes: int = MAX_LINE_BYTES) -> Parsed:
    """Parse one data set spec with its format's loader (file-level problems raise DataFormatError); with
    `spec.sample_rows`, its items are the seeded subset (`loaders.sampling`), in input order."""
    if not spec.sample_rows:
        return LOADERS[spec.format](_absolute(spec), Parsed(max_line_bytes=max_line_bytes))
    parsed = Parsed()
    load_streaming(
        spec,
        parsed.items.extend,
        parsed.quarantine.extend,
        sample_seed=sample_seed,
        max_line_bytes=max_line_bytes,
    )
    return parsed


def load_streaming(
    spec: DatasetSpec,
    on_items: Sink,
    on_bad: Sink,
    chunk_rows: int = CHUNK_ROWS,
    *,
    sample_seed: int = 0,
    not_sampled: Counter[str] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> int:
    """`load`, handing rows to `on_items` / `on_bad` in chunks of at most `chunk_rows` instead of returning
    them; returns the rows read. What the caller holds is one chunk: JSONL formats (OVEN's millions of rows)
    are read line by line; a JSON document (VQAv2, GQA, ...) is parsed whole by nature, then released. With
    `spec.sample_rows` the items are the seeded subset, handed over at the end (the sample holds
    `sample_rows` rows at most), and the usable rows left out are added to `not_sampled` per data set name:
    the caller counts them, so read = items + quarantined + not sampled accounts for every row.
    `max_line_bytes` (`data.max_line_bytes`) bounds what a JSONL reader buffers of one line.
    """
    sample = RowSample(spec.sample_rows, sample_seed) if spec.sample_rows else None
    out = Parsed.streaming(sample.add if sample else on_items, on_bad, chunk_rows, max_line_bytes)
    LOADERS[spec.format](_absolute(spec), out)
    out.flush()
    if sample is not None:
        for chunk in sample.chunks(chunk_rows):
            on_items(chunk)
        if not_sampled is not None:
            not_sampled.update(sample.dropped)
    return out.n_input
