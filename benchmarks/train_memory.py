"""Peak memory of training as the table grows: driver and one Ray Train worker, 10k -> 100k -> 1M rows.

    python -m benchmarks.train_memory [--sizes 10000,100000,1000000] [--steps 3]

Each size is a fresh process that runs `run_training` (IDK-IT, LoRA, one Ray Train worker, a few steps) on a
synthetic SFT table of that many rows: LLaVA-like rows (a 576-token image, a ~25-word question with the
short-answer instruction, image paths to real PNG files, as the LLaVA configs store them). The driver's peak
RSS is the process's own; the worker's is what the loop records (`rss_peak_mb`); both are VmHWM. The goal is flat:
1M rows within 1.25x of 10k.

Beside it, what the previous design cost, measured the same way (a fresh process): read the whole table
and tokenise every row with the image tokens expanded (what each worker did), and the driver's whole-table
read (what `ray.data.from_arrow(read_table(...))` held). At 1M rows the tokenised table does not fit this
machine's memory, so that cell is skipped (`--old-max` rows).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks._measure import environment, format_table, run_isolated

IMAGE_SIZE, PATCH = 336, 14  # 576 image tokens, as LLaVA-1.5
QUESTION = "what colour is the large object left of the small red circle near the top edge of the picture"
WORDS = QUESTION.split()  # noqa: SIM905


def _rss_mb() -> float:
    from inbol_ray.train.step_metrics import peak_rss_mb

    return peak_rss_mb()  # VmHWM: ru_maxrss would start at the spawning parent's peak


def build_model(workdir: Path) -> str:
    from inbol_ray.config import ModelConfig
    from inbol_ray.model.tiny import build_tiny_checkpoint

    cfg = ModelConfig(image_size=IMAGE_SIZE, patch_size=PATCH, vision_hidden=64, vision_layers=1)
    return str(build_tiny_checkpoint(workdir / "model", cfg))


def write_table(workdir: Path, n: int) -> str:
    """A synthetic idk_it table of `n` rows under `<workdir>/run-<n>/tables/idk_it`; returns the run dir."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from inbol_ray import schema as S
    from inbol_ray.data import io as dio
    from inbol_ray.model.prompt import render_prompt

    images = workdir / "images"
    images.mkdir(exist_ok=True)
    paths = []
    for i in range(8):
        path = images / f"{i}.png"
        if not path.exists():
            Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 30 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    run = workdir / f"run-{n}"
    rng = np.random.default_rng(0)
    chunk = 100_000
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        lengths = rng.integers(15, 30, m)
        prompts = [
            render_prompt(" ".join(WORDS[: int(k) % len(WORDS)] + WORDS[: int(k) - len(WORDS)]) + "?")
            for k in lengths
        ]
        parts.append(
            pa.table(
                {
                    S.ID: [f"vqav2-{start + i:08d}" for i in range(m)],
                    S.IMAGE: pa.nulls(m, pa.binary()),
                    S.IMAGE_PATH: [paths[(start + i) % len(paths)] for i in range(m)],
                    S.PROMPT: prompts,
                    S.TARGET: ["red" if (start + i) % 3 else "I don't know." for i in range(m)],
                    S.TARGET_KIND: ["answer" if (start + i) % 3 else "refusal" for i in range(m)],
                },
                schema=S.SFT,
            )
        )
    dio.write_table(pa.concat_tables(parts), str(run / "tables" / "idk_it" / "part-0.parquet"))
    return str(run)


def measure_new(model: str, run: str, steps: int) -> dict:
    """Fresh process: the real training path on that table; driver and worker peak RSS."""
    from inbol_ray.config import Config, ModelConfig, TrainConfig
    from inbol_ray.run_layout import RunLayout
    from inbol_ray.runtime import init_ray
    from inbol_ray.train.trainer import run_training

    init_ray(num_cpus=2)
    cfg = Config(
        model=ModelConfig(path=model, build_tiny=False),
        train=TrainConfig(num_workers=1, max_steps=steps, batch_size=8, lora=True, checkpoint_every=1000),
    )
    layout = RunLayout(root=run, model_path=model)
    t0 = time.perf_counter()
    result = run_training(cfg, "idk_it", layout, log=lambda _: None)
    import ray

    ray.shutdown()
    return {
        "driver": _rss_mb(),
        "worker": float(result.final_metrics["rss_peak_mb"]),
        "seconds": time.perf_counter() - t0,
    }


def measure_old(model: str, run: str) -> dict:
    """Fresh process: what each worker held before (the whole table, every row tokenised)."""
    from inbol_ray.checkpoint import load_processor
    from inbol_ray.data import io as dio
    from inbol_ray.train.data import SFT_KINDS, encode_table

    processor = load_processor(model)
    base = _rss_mb()
    table = dio.read_table(f"{run}/tables/idk_it")
    after_read = _rss_mb()
    enc = encode_table(table, processor, SFT_KINDS)
    assert len(enc) == table.num_rows
    return {"read": after_read, "worker": _rss_mb(), "base": base}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--old-max", type=int, default=100_000, help="largest size for the old-path cells")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        work = Path(tmp)
        model = build_model(work)
        for n in sizes:
            run = run_isolated(write_table, work, n)  # the parent stays small: children inherit nothing
            size_mb = sum(f.stat().st_size for f in Path(run).rglob("*.parquet")) / 2**20
            new = run_isolated(measure_new, model, run, args.steps, timeout_s=1800)
            row = {
                "rows": f"{n:,}",
                "table (Parquet)": f"{size_mb:.0f} MiB",
                "driver peak": f"{new['driver']:.0f} MiB",
                "worker peak": f"{new['worker']:.0f} MiB",
                "train s": f"{new['seconds']:.0f}",
            }
            if n <= args.old_max:
                old = run_isolated(measure_old, model, run, timeout_s=1800)
                row["before: driver read"] = f"+{old['read'] - old['base']:.0f} MiB"
                row["before: worker read+tokenise"] = f"+{old['worker'] - old['base']:.0f} MiB"
            else:
                row["before: driver read"] = row["before: worker read+tokenise"] = "not run (memory)"
            rows.append(row)
            print(row, flush=True)
    first = rows[0]
    print()
    print(
        format_table(
            rows,
            [
                "rows",
                "table (Parquet)",
                "driver peak",
                "worker peak",
                "train s",
                "before: driver read",
                "before: worker read+tokenise",
            ],
        )
    )
    for key in ("driver peak", "worker peak"):
        ratio = float(rows[-1][key].split()[0]) / float(first[key].split()[0])
        print(f"{key}: {rows[-1]['rows']} rows / {first['rows']} rows = {ratio:.2f}x (goal <= 1.25x)")
    for k, v in environment().items():
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
