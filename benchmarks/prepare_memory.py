"""Peak memory of the prepare stage's driver as an OVEN JSONL grows: 10k -> 100k -> 1M -> 3M rows.

    python -m benchmarks.prepare_memory [--sizes 10000,100000,1000000,3000000] [--old-max 1000000]
                                        [--stage-max 100000] [--recipe-sizes 10000,100000,1000000]

Each cell is a fresh process (`run_isolated`), its peak RSS read as VmHWM:
- parse: `read_sources` as the stage runs it: the OVEN loader streams the file line by line, rows go to
  Parquet parts under the staging folder in 50k-row chunks, and the k-way merge of sorted id runs checks
  that ids are unique. Goal flat: the largest file within 1.25x of the smallest.
- before: what the previous `read_sources` held for the same file: every row as a Python dict
  (`load`, the whole-list path) plus the one Arrow table made of them.
- stage: the whole stage (`run_prepare`: parse, then the Ray Data image check on 2 local CPUs, items and
  quarantine written), the driver's peak; rows point at 8 small PNG files (`image_storage: path`), so the
  image check opens one file per row. Ray's own driver start-up is in this number.

- recipe (second table, `--recipe-sizes`): `read_sources` with the mismatch recipe on
  (`data.unanswerable_per_answerable` 0.18, the 7B config's share, and its default thresholds): parse, then
  `mismatch_staged.plan_staged` / `fill_staged` (compact rows by shard, one shard's index at a time, a
  second pass for the chosen images). Columns: the driver's peak over the whole call, the peak of the recipe
  phase alone (VmHWM reset when the recipe starts), seconds of each, and the recipe's counts. Goal flat: the
  largest size within 1.25x of the smallest. Its rows differ from the parse cell's (which repeat 8 images
  and one question) so that the recipe has real work: two OVEN-format data sets (`oven` 90%, `oven_b` 10%),
  two rows per image, referents drawn from 5,000 synthetic nouns and 40 adjectives, a quarter of the rows
  yes/no (excluded), a quarter counting questions answered 0 (absence proofs).

Rows are OVEN-like (`data_id`, `image_id`, a ~15-word question, `entity_text`): ~200 bytes of JSON each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._measure import environment, format_table, run_isolated


def _rss_mb() -> float:
    from inbol_ray.train.step_metrics import peak_rss_mb

    return peak_rss_mb()


def write_jsonl(folder: Path, n: int) -> str:
    """An OVEN-format JSONL of `n` rows and 8 16x16 PNGs its rows point at (flat folder)."""
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 30 * i, dtype=np.uint8)).save(images / f"oven_{i:08d}.png")
    path = folder / f"oven_entity_train_{n}.jsonl"
    with path.open("w") as out:
        for i in range(n):
            row = {
                "data_id": f"oven_entity_train_{i:08d}",
                "image_id": f"oven_{i % 8:08d}",
                "question": f"What is the name of the building shown in this photograph, number {i % 97}?",
                "entity_text": f"Entity number {i}",
                "entity_id": f"Q{i}",
                "data_split": "train_entity",
            }
            out.write(json.dumps(row) + "\n")
    return str(path)


NOUNS, ADJECTIVES = 5000, 40


def write_recipe_jsonl(folder: Path, n: int) -> list[str]:
    """Two OVEN-format JSONLs (`oven` with 90% of `n` rows, `oven_b` with the rest) whose questions the
    mismatch recipe can work with (see the module docstring), and one PNG each for the loader's layout
    probe (the other image files do not exist: the recipe never opens an image)."""
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for name, rows in (("oven", n - n // 10), ("oven_b", n // 10)):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / f"{name}_{0:08d}.png")
        nouns, adjectives = rng.integers(NOUNS, size=rows), rng.integers(ADJECTIVES, size=rows)
        path = folder / f"{name}_{n}.jsonl"
        with path.open("w") as out:
            for i in range(rows):
                noun, adjective = f"thing{nouns[i]}", f"hue{adjectives[i]}"
                question, answer = [
                    (f"What is the name of this {noun} shown in the photograph?", f"Entity number {i}"),
                    (f"What material is the {adjective} {noun} made of?", f"stuff{i}"),
                    (f"Is there a {noun} in the picture?", "yes"),
                    (f"How many {noun}s are there?", "0"),
                ][i % 4]
                row = {"data_id": f"{name}_train_{i:08d}", "image_id": f"{name}_{i // 2:08d}",
                       "question": question, "entity_text": answer, "entity_id": f"Q{i}",
                       "data_split": "train_entity"}  # fmt: skip
                out.write(json.dumps(row) + "\n")
        paths.append(str(path))
    return paths


def measure_recipe(paths: list[str], run_dir: str) -> dict:
    """`read_sources` with the recipe on; the recipe phase's own peak and time from a wrapper around it."""
    from pathlib import Path as P

    from inbol_ray.config import Config, DataConfig, DatasetSpec
    from inbol_ray.data import prepare, prepare_sources

    specs = [
        DatasetSpec(name=P(p).name.rsplit("_", 1)[0], format="oven", path=p,
                    images=str(P(p).parent / "images"), split="train")
        for p in paths
    ]  # fmt: skip
    cfg = Config(
        run_dir=run_dir,
        data=DataConfig(
            source="files", datasets=specs, image_storage="path", unanswerable_per_answerable=0.18
        ),
    )
    phase: dict = {}
    inner = prepare_sources._mismatches

    def timed(*args, **kwargs):
        parse_peak = _rss_mb()
        P("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the recipe's own peak from here
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        phase.update(seconds=time.perf_counter() - t0, peak=_rss_mb(), parse_peak=parse_peak)
        return out

    prepare_sources._mismatches = timed
    t0 = time.perf_counter()
    sources = prepare.read_sources(cfg)
    seconds = time.perf_counter() - t0
    return {
        "peak": max(_rss_mb(), phase["parse_peak"]),
        "seconds": seconds,
        "recipe peak": phase["peak"],
        "recipe seconds": phase["seconds"],
        "read": sum(v for k, v in sources.read.items() if not k.endswith("_mismatch")),
        "counts": sources.mismatch,
    }


def _config(path: str, run_dir: str):
    from inbol_ray.config import Config, DataConfig, DatasetSpec

    spec = DatasetSpec(
        name="oven", format="oven", path=path, images=str(Path(path).parent / "images"), split="train"
    )
    return Config(run_dir=run_dir, data=DataConfig(source="files", datasets=[spec], image_storage="path"))


def measure_parse(path: str, run_dir: str) -> dict:
    from inbol_ray.data.prepare import read_sources

    t0 = time.perf_counter()
    sources = read_sources(_config(path, run_dir))
    return {"peak": _rss_mb(), "seconds": time.perf_counter() - t0, "read": sum(sources.read.values())}


def measure_before(path: str) -> dict:
    from inbol_ray.data.loaders import items_table, load

    parsed = load(_config(path, "unused").data.datasets[0])
    table = items_table(parsed.items)
    return {"peak": _rss_mb(), "rows": table.num_rows}


def measure_stage(path: str, run_dir: str) -> dict:
    import ray

    from inbol_ray.data.prepare import run_prepare
    from inbol_ray.run_layout import RunLayout
    from inbol_ray.runtime import init_ray

    init_ray(num_cpus=2)
    cfg = _config(path, run_dir)
    t0 = time.perf_counter()
    result = run_prepare(cfg, RunLayout.of(cfg), batch_size=256, rows_per_block=8192)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"peak": _rss_mb(), "seconds": seconds, "items": result.counts["oven"]["items"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000,3000000")
    parser.add_argument("--old-max", type=int, default=1_000_000, help="largest size for the 'before' cell")
    parser.add_argument(
        "--stage-max", type=int, default=100_000, help="largest size for the whole-stage cell"
    )
    parser.add_argument(
        "--recipe-sizes",
        default="10000,100000,1000000",
        help="sizes for the mismatch recipe table ('' = none)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        for n in sizes:
            folder = Path(tmp) / f"n{n}"
            path = run_isolated(write_jsonl, folder, n)
            parse = run_isolated(measure_parse, path, str(folder / "run"), timeout_s=3600)
            assert parse["read"] == n, parse
            row = {
                "rows": f"{n:,}",
                "JSONL": f"{os.path.getsize(path) / 2**20:.0f} MiB",
                "parse peak": f"{parse['peak']:.0f} MiB",
                "parse s": f"{parse['seconds']:.1f}",
                "before: parse peak": "not run (memory)",
                "stage driver peak": "not run (time)",
                "stage s": "",
            }
            if n <= args.old_max:
                row["before: parse peak"] = (
                    f"{run_isolated(measure_before, path, timeout_s=3600)['peak']:.0f} MiB"
                )
            if n <= args.stage_max:
                stage = run_isolated(measure_stage, path, str(folder / "stage"), timeout_s=3600)
                assert stage["items"] == n, stage
                row["stage driver peak"] = f"{stage['peak']:.0f} MiB"
                row["stage s"] = f"{stage['seconds']:.0f}"
            rows.append(row)
            print(row, flush=True)
    if rows:
        print()
        columns = [
            "rows",
            "JSONL",
            "parse peak",
            "parse s",
            "before: parse peak",
            "stage driver peak",
            "stage s",
        ]
        print(format_table(rows, columns))
        ratio = float(rows[-1]["parse peak"].split()[0]) / float(rows[0]["parse peak"].split()[0])
        print(f"parse peak: {rows[-1]['rows']} rows / {rows[0]['rows']} rows = {ratio:.2f}x (goal <= 1.25x)")
    recipe = [int(s) for s in args.recipe_sizes.split(",") if s]
    table = []
    with tempfile.TemporaryDirectory(prefix="prepare-memory-recipe-") as tmp:
        for n in recipe:
            folder = Path(tmp) / f"n{n}"
            paths = run_isolated(write_recipe_jsonl, folder, n)
            got = run_isolated(measure_recipe, paths, str(folder / "run"), timeout_s=3600)
            assert got["read"] == n, got
            c = got["counts"]
            table.append(
                {
                    "rows": f"{n:,}",
                    "driver peak": f"{got['peak']:.0f} MiB",
                    "recipe peak": f"{got['recipe peak']:.0f} MiB",
                    "read_sources s": f"{got['seconds']:.1f}",
                    "recipe s": f"{got['recipe seconds']:.1f}",
                    "built / wanted": f"{c['built']:,} / {c['wanted']:,}",
                    "cross": f"{c['cross_dataset']:,}",
                    "by proof": f"{c['built_by_proof']:,}",
                    "shards": c["shards"],
                }
            )
            print(table[-1], flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    if table:
        print()
        print(format_table(table, list(table[0])))
        ratio = float(table[-1]["driver peak"].split()[0]) / float(table[0]["driver peak"].split()[0])
        print(f"recipe on, driver peak: {table[-1]['rows']} rows / {table[0]['rows']} rows = {ratio:.2f}x "
              f"(goal <= 1.25x)")  # fmt: skip
    for k, v in environment().items():
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
