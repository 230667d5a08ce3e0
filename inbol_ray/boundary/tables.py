"""The construct stage's I/O: `items` + `samples` -> `idk_it`, `sft_baseline`, `cadpo_pairs` tables.

The builders in `construct` are pure and batch-wise; this module joins the two input tables, streams
the joined rows through the builders in batches (text only, so the driver handles hundreds of
thousands of rows in seconds — image bytes are re-attached by id at the end rather than copied through
Python objects), and writes each table with its quarantine rows. Input rows = output + quarantined is
checked per table.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
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


def _split_points(samples_uri: str, n_rows: int, buckets: int) -> list[str]:
    """Ids cutting the samples into `buckets` id ranges of about equal size, from a stride sample of the id
    column (~64 ids per bucket). Any cut gives the same tables: it only sets how much one bucket holds."""
    stride = max(1, n_rows // (buckets * 64))
    picked: list[str] = []
    seen = 0
    for batch in dio.iter_batches(samples_uri, columns=[S.ID]):
        picked += batch[S.ID].to_pylist()[(-seen) % stride :: stride]
        seen += batch.num_rows
    picked.sort()
    return sorted({picked[len(picked) * b // buckets] for b in range(1, buckets)})


def _partition(uri: str, columns: list[str] | None, splits: list[str], folder: str) -> list[str]:
    """A table cut into the id ranges `splits` defines, one Parquet file per range, read a batch at a time."""
    bounds = np.array(splits, dtype=object)
    writers: dict[int, dio.TableFile] = {}
    paths = [dio.join(folder, f"bucket-{b:05d}.parquet") for b in range(len(splits) + 1)]
    try:
        for batch in dio.iter_batches(uri, columns=columns):
            table = pa.Table.from_batches([batch])
            ids = np.array(table[S.ID].to_pylist(), dtype=object)
            bucket = np.searchsorted(bounds, ids, side="right")
            for b in np.unique(bucket).tolist():
                if b not in writers:
                    writers[b] = dio.TableFile(paths[b], table.schema)
                writers[b].write(table.filter(pa.array(bucket == b)))
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def _buckets(layout: RunLayout, window_rows: int, scratch: str) -> Iterator[tuple[pa.Table | None, pa.Table]]:
    """(items, samples) per id range: the whole tables when the samples fit `window_rows`, else ranges of
    about that many rows cut to local scratch files, yielded one range at a time."""
    n_rows = dio.row_count(layout.samples)
    if n_rows <= window_rows:
        yield dio.read_table(layout.items), dio.read_table(layout.samples, columns=S.SAMPLES.names)
        return
    splits = _split_points(layout.samples, n_rows, -(-n_rows // window_rows))
    samples = _partition(layout.samples, S.SAMPLES.names, splits, dio.join(scratch, "samples"))
    items = _partition(layout.items, None, splits, dio.join(scratch, "items"))
    for items_b, samples_b in zip(items, samples, strict=True):
        if dio.exists(samples_b):  # a range with no samples builds nothing
            yield (dio.read_table(items_b) if dio.exists(items_b) else None), dio.read_table(samples_b)


def run_construct(cfg: Config, layout: RunLayout) -> ConstructResult:
    """`layout.items` + `layout.samples` -> every table under `layout.table(name)`, buckets from conf under
    `cfg.construct` (the samples carry no bucket, so a threshold change needs no new samples).

    Bounded memory: samples beyond `construct.window_rows` rows are cut into id ranges (items likewise) on
    local scratch disk and built one range at a time; ranges are written in id order, each sorted, so the
    tables come out in id order whatever the cut (rows are addressed by position when training streams)."""
    window = cfg.construct.window_rows
    for name in BUILDERS:
        dio.remove(layout.table(name))
    tables = {
        name: dio.TableFile(dio.join(layout.table(name), "part-0.parquet"), schema)
        for name, (_, schema) in BUILDERS.items()
    }
    quarantines = {
        name: dio.TableFile(layout.quarantine(f"construct_{name}"), S.QUARANTINE) for name in BUILDERS
    }
    counts: dict[str, Counter[str]] = {name: Counter() for name in BUILDERS}
    with tempfile.TemporaryDirectory(prefix="construct-") as scratch:
        for items, samples in _buckets(layout, window, scratch):
            if items is None:
                raise ValueError(
                    f"construct: {samples.num_rows} sample id(s) have no item, e.g. {samples[S.ID][0]}"
                )
            items = items.filter(pc.is_in(items[S.ID], samples[S.ID]))
            for name, (table, quarantine, tally) in build_tables(items, samples, cfg.construct).items():
                tables[name].write(table.sort_by(S.ID))
                stage = pa.array([f"construct_{name}"] * quarantine.num_rows, pa.string())
                quarantines[name].write(
                    quarantine.set_column(quarantine.schema.get_field_index(S.STAGE), S.STAGE, stage)
                )
                counts[name].update(tally)
    uris = {}
    for name in BUILDERS:
        tables[name].close()
        quarantines[name].close()
        uris[name] = layout.table(name)
    return ConstructResult(uris=uris, counts={name: dict(c) for name, c in counts.items()})
