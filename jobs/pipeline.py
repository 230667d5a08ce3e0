"""The main job: every stage in order on one run directory, resuming where a previous run stopped.

    python -m jobs.pipeline --config configs/tiny.yaml --run-dir runs/tiny [section.key=value ...]

Also submittable to a cluster: `ray job submit --working-dir . -- python -m jobs.pipeline --config ...`.
"""

from __future__ import annotations

import argparse
import sys
import time

from inbol_ray.config import ConfigError, load_config
from inbol_ray.pipeline import run_pipeline
from inbol_ray.runtime import ray_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--run-dir", default="", help="override run_dir (local path or URI)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"pipeline: config error: {exc}", file=sys.stderr)
        return 2
    if args.run_dir:
        cfg.run_dir = args.run_dir
    from inbol_ray.data.prepare import input_problems

    problems = input_problems(cfg.data)
    if problems:
        print(f"pipeline: {len(problems)} input problem(s), nothing started:", file=sys.stderr)
        print("\n".join(f"  - {line}" for line in problems), file=sys.stderr)
        return 2
    t0 = time.time()
    with ray_session(cfg.ray):
        run_pipeline(cfg, cfg.run_dir)
    print(f"pipeline: finished in {time.time() - t0:.0f}s; outputs under {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
