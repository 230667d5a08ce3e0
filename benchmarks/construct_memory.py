"""Peak memory of the construct stage as the samples grow: 10k -> 100k -> 1M rows, id ranges vs one window.

    python -m benchmarks.construct_memory [--sizes 10000,100000,1000000] [--window 100000]

Each cell is a fresh process (`run_isolated`) running `run_construct`, its peak RSS read as VmHWM:
- ranges: the stage as shipped (`construct.window_rows` = `--window`): samples beyond the window are cut
  into id ranges on local scratch disk and built one range at a time. Goal flat: the largest within 1.25x
  of the first size at or above the window.
- one window: `construct.window_rows` = the table size, i.e. what the stage did before: both tables read
  whole, joined, built and written at once.

Rows are VQAv2-like: items with an image path, ten answers, a ~15-word question; samples with K = 10
responses (half correct), their prompt rendered as the stage renders it. Both cells must write the same
tables (checked by row counts and a hash of the idk_it ids).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._measure import environment, format_table, run_isolated

K = 10


def _rss_mb() -> float:
    from inbol_ray.train.step_metrics import peak_rss_mb

    return peak_rss_mb()


def write_run(root: Path, n: int) -> str:
    """`items` and `samples` of `n` rows under `root` (written in chunks: the writer stays small too)."""
    import numpy as np
    import pyarrow as pa

    from inbol_ray import schema as S
    from inbol_ray.data import io as dio
    from inbol_ray.model.prompt import render_prompt

    rng = np.random.default_rng(0)
    chunk = 100_000
    for part, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        ids = [f"vqav2:{(start + i) * 7919 % 10**9:09d}" for i in range(m)]  # not in id order on disk
        questions = [
            f"What colour is the object number {i % 977} left of the small red circle?" for i in range(m)
        ]
        items = pa.table(
            {
                S.ID: ids,
                S.DATASET: ["vqav2"] * m,
                S.SPLIT: ["train"] * m,
                S.IMAGE: pa.nulls(m, pa.binary()),
                S.IMAGE_PATH: [f"/data/coco/train2014/COCO_train2014_{i:012d}.jpg" for i in range(m)],
                S.QUESTION: questions,
                S.ANSWERS: [["red"] * 7 + ["blue"] * 3] * m,
                S.CHOICES: pa.nulls(m, pa.list_(pa.string())),
                S.METRIC: ["vqa_soft"] * m,
                S.ANSWERABLE: [True] * m,
                S.CATEGORY: ["other"] * m,
                S.SOURCE: ["v2_OpenEnded_mscoco_train2014_questions.json"] * m,
            }
        )
        dio.write_table(S.conform(items, S.ITEMS, "items"), str(root / "items" / f"part-{part:04d}.parquet"))
        n_correct = rng.integers(0, K + 1, m)
        responses = [["red"] * int(c) + ["blue"] * (K - int(c)) for c in n_correct]
        samples = pa.table(
            {
                S.ID: ids,
                S.PROMPT: [render_prompt(q) for q in questions],
                S.RESPONSES: responses,
                S.CORRECT: [[x == "red" for x in r] for r in responses],
                S.REFUSED: [[False] * K] * m,
                S.CONF: (n_correct / K).tolist(),
            }
        )
        dio.write_table(
            S.conform(samples, S.SAMPLES, "samples"), str(root / "samples" / f"part-{part:04d}.parquet")
        )
    return str(root)


def measure(root: str, out: str, window: int) -> dict:
    import hashlib
    import shutil

    from inbol_ray.boundary.tables import run_construct
    from inbol_ray.config import Config
    from inbol_ray.data import io as dio
    from inbol_ray.run_layout import RunLayout

    for name in ("items", "samples"):  # the stage's inputs in a run of this cell's own
        shutil.copytree(f"{root}/{name}", f"{out}/{name}")
    cfg = Config()
    cfg.construct.window_rows = window
    t0 = time.perf_counter()
    result = run_construct(cfg, RunLayout(out))
    seconds = time.perf_counter() - t0
    ids = dio.read_table(result.uris["idk_it"], columns=["id"])["id"].to_pylist()
    return {
        "peak": _rss_mb(),
        "seconds": seconds,
        "rows": {k: c["output"] for k, c in result.counts.items()},
        "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--window", type=int, default=100_000)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="construct-memory-") as tmp:
        for n in sizes:
            root = run_isolated(write_run, Path(tmp) / f"n{n}", n)
            ranges = run_isolated(measure, root, f"{tmp}/ranges-{n}", args.window, timeout_s=3600)
            whole = run_isolated(measure, root, f"{tmp}/whole-{n}", max(n, 1), timeout_s=3600)
            assert ranges["rows"] == whole["rows"] and ranges["ids"] == whole["ids"], (ranges, whole)
            rows.append(
                {
                    "rows": f"{n:,}",
                    "ranges peak": f"{ranges['peak']:.0f} MiB",
                    "ranges s": f"{ranges['seconds']:.0f}",
                    "one window peak": f"{whole['peak']:.0f} MiB",
                    "one window s": f"{whole['seconds']:.0f}",
                    "same tables": "yes",
                }
            )
            print(rows[-1], flush=True)
    print()
    print(
        format_table(
            rows, ["rows", "ranges peak", "ranges s", "one window peak", "one window s", "same tables"]
        )
    )
    at_window = [r for r, n in zip(rows, sizes, strict=True) if n >= args.window] or rows
    ratio = float(rows[-1]["ranges peak"].split()[0]) / float(at_window[0]["ranges peak"].split()[0])
    print(
        f"ranges peak: {rows[-1]['rows']} rows / {at_window[0]['rows']} rows = {ratio:.2f}x (goal <= 1.25x)"
    )
    for k, v in environment().items():
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
