"""The construct stage's I/O: `items` + `samples` -> `idk_it`, `sft_baseline`, `cadpo_pairs` tables.

The builders in `construct` are pure and batch-wise; this module joins the two input tables, streams
the joined rows through the builders in batches (text only, so the driver handles hundreds of
thousands of rows in seconds — image bytes are re-attached by id at the end rather than copied through
Python objects), and writes each table with its quarantine rows. Input rows = output + quarantined is
checked per table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray import schema as S
from inbol_ray.boundary.construct import (
    Built,
    build_cadpo_pairs,
    build_idk_it,
    build_sft_baseline,
    merge_built,
)
from inbol_ray.config import Config, ConstructConfig
from inbol_ray.data import io as dio
from inbol_ray.generation.shards import write_quarantine
from inbol_ray.run_layout import RunLayout

BUILDERS: dict[str, tuple[Callable[..., Built], pa.Schema]] = {
    "idk_it": (build_idk_it, S.SFT),
    "sft_baseline": (build_sft_baseline, S.SFT),
    "cadpo_pairs": (build_cadpo_pairs, S.CADPO_PAIRS),
}


@dataclass
class ConstructResult:
    uris: dict[str, str]
    counts: dict[str, dict[str, int]]

    def summary_line(self) -> str:
        parts = []
        for name, c in self.counts.items():
            parts.append(f"{name} {c.get('output', 0)} rows ({c.get('quarantined', 0)} quarantined)")
        return "construct: " + "; ".join(parts)


def _take_by_id(table: pa.Table, ids: pa.Array) -> pa.Table:
    """Rows of `table` in the order of `ids` (Arrow's hash join cannot carry list columns)."""
    return table.take(pc.index_in(ids, value_set=table[S.ID]))


def join_items_samples(items: pa.Table, samples: pa.Table) -> pa.Table:
    """Items (without image bytes) beside their samples; a sample without its item is an upstream bug."""
    found = pc.is_in(samples[S.ID], value_set=items[S.ID])
    if not pc.all(found).as_py():
        missing = samples.filter(pc.invert(found))[S.ID].to_pylist()
        raise ValueError(f"construct: {len(missing)} sample id(s) have no item, e.g. {sorted(missing)[:3]}")
    text = _take_by_id(items.drop_columns([S.IMAGE]), samples[S.ID])
    for name in samples.column_names:
        if name != S.ID:
            text = text.append_column(name, samples[name])
    return text


def _attach_images(table: pa.Table, items: pa.Table) -> pa.Table:
    """Put the image bytes back by id (null where the item keeps an image_path instead)."""
    images = _take_by_id(items.select([S.ID, S.IMAGE]), table[S.ID])[S.IMAGE]
    return table.set_column(table.schema.get_field_index(S.IMAGE), S.IMAGE, images)


def build_tables(
    items: pa.Table, samples: pa.Table, cfg: ConstructConfig, batch_rows: int = 4096
) -> dict[str, tuple[pa.Table, pa.Table, dict[str, int]]]:
    """Every construct table with its quarantine table and counts; pure (no I/O) for tests."""
    joined = join_items_samples(items, samples)
    out: dict[str, tuple[pa.Table, pa.Table, dict[str, int]]] = {}
    for name, (builder, table_schema) in BUILDERS.items():
        parts = [
            builder(pa.Table.from_batches([b]), cfg) for b in joined.to_batches(max_chunksize=batch_rows)
        ]
        built = merge_built(parts) if parts else builder(joined.slice(0, 0), cfg)
        table = pa.Table.from_pandas(built.table, preserve_index=False)
        table = _attach_images(S.conform(table, table_schema, f"construct/{name}"), items)
        out[name] = (
            S.conform(table, table_schema, f"construct/{name}"),
            S.conform(pa.Table.from_pandas(built.quarantine, preserve_index=False), S.QUARANTINE, name),
            dict(built.counts, output=len(built.table), quarantined=len(built.quarantine)),
        )
    return out


def run_construct(cfg: Config, layout: RunLayout) -> ConstructResult:
    """`layout.items` + `layout.samples` -> every table under `layout.table(name)`, buckets from conf under
    `cfg.construct` (the samples carry no bucket, so a threshold change needs no new samples)."""
    items = dio.read_table(layout.items)
    samples = dio.read_table(layout.samples, columns=S.SAMPLES.names)
    items = items.filter(pc.is_in(items[S.ID], samples[S.ID]))
    built = build_tables(items, samples, cfg.construct)
    uris, counts = {}, {}
    for name, (table, quarantine, tally) in built.items():
        folder = layout.table(name)
        # In id order on disk: rows are addressed by position when training streams a big table.
        dio.write_table(table.sort_by(S.ID), dio.join(folder, "part-0.parquet"))
        write_quarantine(quarantine.to_pylist(), layout.quarantine(f"construct_{name}"), f"construct_{name}")
        uris[name] = folder
        counts[name] = tally
    return ConstructResult(uris=uris, counts=counts)
