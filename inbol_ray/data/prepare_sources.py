"""The prepare stage's driver side: check the inputs, parse them, stage them (steps 1 and 2 of
`inbol_ray.data.prepare`, which runs step 3, the Ray Data image check, on what this module stages).

1. `input_problems` (driver, no Ray): every configured path exists, so a typo fails in a second.
2. `read_sources` (driver, no Ray): the loaders parse annotation files into item rows, streamed in chunks
   (`loaders.load_streaming`) to Parquet parts under the run's `staging/prepare` folder, so the driver
   holds one chunk, never the data set: a JSONL of millions of rows (OVEN) parses in bounded memory. Only
   text is parsed here; a file in the wrong format raises `DataFormatError` before any Ray work. Ids must be
   unique (later stages join on them): each chunk's ids are also staged sorted, and a k-way merge of those
   runs finds repeats holding one batch per chunk; the first row (input order) wins, the others are
   quarantined. With `data.unanswerable_per_answerable` > 0 it then adds mismatched unanswerable training
   rows (a training question on another training image, `inbol_ray.data.mismatch`) as data sets
   `<name>_mismatch`; they reuse an existing image's bytes or path, so step 3 checks them like any row.
   The recipe holds one shard of compact per-row data at a time (`mismatch_staged.plan_staged`), never the
   answerable rows; with fewer than `data.mismatch_min_fill` of its target built, the stage fails.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import Config, DataConfig
from inbol_ray.data import io as dio
from inbol_ray.data.coco_categories import read_instances
from inbol_ray.data.loaders import items_table, load_streaming, spec_problems
from inbol_ray.data.loaders.common import CHUNK_ROWS
from inbol_ray.data.mismatch import check_fill, common_image_root
from inbol_ray.data.mismatch_staged import fill_staged, plan_staged
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import DATASET, ID, ITEMS, REASON, ROW_KEY, SOURCE, conform

STAGE_NAME = "prepare"

SEQ = "_seq"
"""Staged rows' position in input order: which of two rows with one id came first."""
STAGED = ITEMS.append(pa.field(SEQ, pa.int64()))
_STAGED_IDS = pa.schema([(ID, pa.string()), (SEQ, pa.int64()), (SOURCE, pa.string()), (DATASET, pa.string())])
_LOADER_BAD = pa.schema(
    [(SOURCE, pa.string()), (ROW_KEY, pa.string()), (REASON, pa.string()), (DATASET, pa.string())]
)


@dataclass
class Sources:
    """Parsed input of the stage, staged under `root` (Parquet parts): item rows still to be image-checked
    (`root/items`, with their input position), the loaders' and the id check's rejects (`root/quarantine`)."""

    root: str
    read: dict[str, int] = field(default_factory=dict)
    """Rows read per data set (items + loader rejects; mismatched rows: what was built)."""
    duplicates: frozenset[int] = frozenset()
    """Input positions of rows whose id an earlier row already has (quarantined, not image-checked)."""
    mismatch: dict[str, int] = field(default_factory=dict)
    """Counts of the mismatched rows (`MismatchResult.counts`: wanted, built, short, why); empty when none
    were asked for."""
    not_sampled: dict[str, int] = field(default_factory=dict)
    """Usable rows left out of a data set's `sample_rows` subset, per data set (counted in `read`)."""

    @property
    def items_parts(self) -> str:
        return dio.join(self.root, "items")

    @property
    def quarantine_parts(self) -> str:
        return dio.join(self.root, "quarantine")

    @property
    def items(self) -> pa.Table:
        """The usable staged rows as one ITEMS table (for tests and small exports: this one is whole)."""
        staged = dio.read_table(self.items_parts)
        return (
            staged.filter(first_rows(staged, positions(self.duplicates)))
            .sort_by(SEQ)
            .select(ITEMS.names)
            .cast(ITEMS)
        )

    @property
    def quarantine(self) -> list[dict[str, Any]]:
        """The staged rejects (loaders' and repeated ids'), in the order they were found."""
        if not dio.exists(self.quarantine_parts):
            return []
        return dio.read_table(self.quarantine_parts).to_pylist()


def input_problems(data: DataConfig) -> list[str]:
    """One line per missing or misconfigured input; empty when the stage can start."""
    if data.source == "shapes":
        return []
    if not data.datasets:
        return ["data.datasets is empty (data.source is 'files')"]
    problems = []
    names = Counter(spec.name for spec in data.datasets)
    for i, spec in enumerate(data.datasets):
        problems += [f"data.datasets[{i}] {line}" for line in spec_problems(spec)]
        if spec.name and names[spec.name] > 1:
            problems.append(f"data.datasets[{i}] {spec.name}: name used by {names[spec.name]} data sets")
        used = spec.instances and data.unanswerable_per_answerable and spec.split == "train"
        if used and not dio.exists(spec.instances):
            problems.append(f"data.datasets[{i}] {spec.name}: instances file not found: {spec.instances}")
    return problems


def shapes_items(cfg: Config) -> pa.Table:
    """ShapesWorld's items as `data.source: shapes` prepares them (synthetic: small by design)."""
    from inbol_ray.data.shapes import generate_items

    return conform(generate_items(cfg.data.shapes, cfg.model.image_size), ITEMS, "shapes")


class _Stager:
    """Writes parsed rows to Parquet parts as they arrive and counts them; numbers rows in input order."""

    def __init__(self, root: str) -> None:
        self.root, self.seq, self.parts = root, 0, 0
        self.read: Counter[str] = Counter()

    def _part(self, kind: str) -> str:
        self.parts += 1
        return dio.join(self.root, kind, f"part-{self.parts:06d}.parquet")

    def items(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        table = rows if isinstance(rows, pa.Table) else items_table(rows)
        if not table.num_rows:
            return
        seq = pa.array(range(self.seq, self.seq + table.num_rows), pa.int64())
        self.seq += table.num_rows
        table = table.select(ITEMS.names).cast(ITEMS).append_column(SEQ, seq)
        self.read.update(table[DATASET].to_pylist())
        part = self._part("items")
        dio.write_table(table, part)
        ids = table.select([ID, SEQ, SOURCE, DATASET]).sort_by([(ID, "ascending"), (SEQ, "ascending")])
        dio.write_table(ids, part.replace("/items/", "/ids/"))

    def bad(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.read.update(r[DATASET] for r in rows)
            self.quarantined(rows)

    def quarantined(self, rows: list[dict[str, Any]]) -> None:
        """Rows rejected after being read (repeated ids): quarantine, without counting them read twice."""
        if rows:
            dio.write_table(pa.Table.from_pylist(rows, schema=_LOADER_BAD), self._part("quarantine"))


def _id_runs(uri: str) -> Iterator[tuple[str, int, str, str]]:
    for batch in dio.iter_batches(uri, batch_rows=256):
        yield from zip(*(batch[name].to_pylist() for name in _STAGED_IDS.names), strict=True)


def _repeated_ids(stager: _Stager) -> frozenset[int]:
    """Input positions of rows whose id an earlier row has; each quarantined naming the first row's file.

    A k-way merge of the per-part sorted id runs: memory is one batch per part, however many rows."""
    folder = dio.join(stager.root, "ids")
    runs = [_id_runs(uri) for uri in dio.list_files(folder, suffix=".parquet")] if dio.exists(folder) else []
    repeated: list[int] = []
    bad: list[dict[str, Any]] = []
    first: tuple[str, str] | None = None
    for key, seq, source, dataset in heapq.merge(*runs):  # (id, seq) order: the first row of an id leads
        if first is not None and key == first[0]:
            reason = f"duplicate field '{ID}' (first row with this id came from {first[1]})"
            bad.append({SOURCE: source, ROW_KEY: key, REASON: reason, DATASET: dataset})
            repeated.append(seq)
            if len(bad) >= CHUNK_ROWS:
                stager.quarantined(bad)
                bad = []
        else:
            first = (key, source)
    stager.quarantined(bad)
    return frozenset(repeated)


def positions(seqs: frozenset[int]) -> pa.Array:
    """Input positions as the Arrow array `first_rows` filters by (built once per stage, not per batch)."""
    return pa.array(sorted(seqs), pa.int64())


def first_rows(table: pa.Table, repeated: pa.Array) -> pa.Array:
    """Mask of the staged rows that are not a later row of an id an earlier row has."""
    return pc.invert(pc.is_in(table[SEQ], value_set=repeated))


def _mismatches(cfg: Config, stager: _Stager, repeated: frozenset[int]) -> dict[str, int]:
    """Build the mismatched unanswerable rows from the staged answerable training rows, and stage them.

    Bounded memory (`mismatch_staged.plan_staged`): compact per-row data by shard, one shard's index at a
    time, then one more pass over the staged parts for the chosen images. Fails (`MismatchShortfall`) when
    fewer than `data.mismatch_min_fill` of the wanted rows were built."""
    data = cfg.data
    train = [spec for spec in data.datasets if spec.split == "train"]
    instances = {spec.name: read_instances(spec.instances) for spec in train if spec.instances}
    items, work = dio.join(stager.root, "items"), dio.join(stager.root, "mismatch")
    plan = plan_staged(
        items,
        work,
        data.unanswerable_per_answerable,
        seq_column=SEQ,
        skip=positions(repeated),
        seed=data.mismatch_seed,
        max_referent_share=data.mismatch_max_referent_share,
        max_image_uses=data.mismatch_max_image_uses,
        instances=instances,
        image_root=common_image_root(spec.images for spec in train),
    )  # ids are `mismatch:<question id>@<image id>`, one per question: unique, and unlike any loader's id
    check_fill(
        plan.counts, data.mismatch_min_fill, [spec.name for spec in train], data.unanswerable_per_answerable
    )
    fill_staged(plan, items, stager.items, seq_column=SEQ)  # parts of 8192 rows: a few MB of dicts each
    return plan.counts


def staging_root(layout: RunLayout) -> str:
    """Where parsed rows wait for the image check: under the run, so every Ray worker can read them."""
    return layout.path("staging", STAGE_NAME)


def read_sources(cfg: Config, staging: str | None = None, chunk_rows: int = CHUNK_ROWS) -> Sources:
    """Parse every configured data set on the driver (text only), or generate ShapesWorld, and stage the
    rows under `staging` (default: `staging_root` of `cfg.run_dir`, replaced), `chunk_rows` at a time."""
    root = staging or staging_root(RunLayout.of(cfg))
    dio.remove(root)
    stager = _Stager(root)
    not_sampled: Counter[str] = Counter()
    if cfg.data.source == "shapes":
        stager.items(shapes_items(cfg))
    else:
        for spec in cfg.data.datasets:
            load_streaming(
                spec,
                stager.items,
                stager.bad,
                chunk_rows,
                sample_seed=cfg.data.sample_seed,
                max_line_bytes=cfg.data.max_line_bytes,
                not_sampled=not_sampled,
            )
        stager.read.update(not_sampled)  # read: every row, subset or not
    repeated = _repeated_ids(stager)
    mismatch = _mismatches(cfg, stager, repeated) if cfg.data.unanswerable_per_answerable else {}
    return Sources(root, dict(stager.read), repeated, mismatch, dict(not_sampled))
