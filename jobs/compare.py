"""Compare two runs (or two methods): s_trust differences with paired bootstrap 95% confidence intervals.

    python -m jobs.compare RUN_A RUN_B [--samples 1000] [--seed 0] [--out FILE]
    python -m jobs.compare RUN RUN --methods base:cadpo        # two methods of one run

Prints a Markdown table; `--out` also writes it (and a `.parquet` beside it when the name ends in .md).
"""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa

from inbol_ray.data import io as dio
from inbol_ray.eval.compare import compare_runs, comparison_markdown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="baseline run directory (A)")
    parser.add_argument("run_b", help="run directory compared against A (B)")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    parser.add_argument(
        "--methods", nargs="*", default=[], help="A_METHOD:B_METHOD pairs (default: same names)"
    )
    parser.add_argument("--out", default="", help="also write the table to this Markdown file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bad = [m for m in args.methods if m.count(":") != 1]
    if bad:
        print(f"compare: --methods expects A_METHOD:B_METHOD, got {bad}", file=sys.stderr)
        return 2
    methods = dict(m.split(":") for m in args.methods) or None
    for run in (args.run_a, args.run_b):
        if not dio.exists(dio.join(dio.absolute(run), "predictions.parquet")):
            print(f"compare: no predictions.parquet in {run} (run jobs.evaluate first)", file=sys.stderr)
            return 2
    try:
        frame = compare_runs(
            args.run_a, args.run_b, samples=args.samples, seed=args.seed, level=args.level, methods=methods
        )
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    text = comparison_markdown(frame, args.run_a, args.run_b, args.level)
    print(text)
    if args.out:
        dio.write_bytes(args.out, (text + "\n").encode())
        if args.out.endswith(".md"):
            dio.write_table(pa.Table.from_pandas(frame, preserve_index=False), args.out[:-3] + ".parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
