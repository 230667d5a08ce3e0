"""The main job: every stage in order on one run directory, resuming where a previous run stopped.

    python -m jobs.pipeline --config configs/tiny.yaml --run-dir runs/tiny [section.key=value ...]
    python -m jobs.pipeline --config configs/llava-1.5-7b.yaml --config site.yaml --until construct
    python -m jobs.pipeline --config configs/tiny.yaml --only evaluate,report

Also submittable to a cluster: `ray job submit --working-dir . -- python -m jobs.pipeline --config ...`.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.cli import run_job


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default="", help="run only these stages (comma-separated)")
    parser.add_argument("--until", default="", help="run every stage up to and including this one")


def main(argv: list[str] | None = None) -> int:
    def choose(cfg, args):
        return [s for s in args.only.split(",") if s], args.until

    return run_job("pipeline", __doc__, argv, choose, add_arguments=_arguments)


if __name__ == "__main__":
    sys.exit(main())
