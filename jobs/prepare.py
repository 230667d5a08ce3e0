"""Prepare stage: data sets in their published formats (or ShapesWorld) -> `<run_dir>/items` + quarantine.

    python -m jobs.prepare --config configs/llava-1.5-7b.yaml [--run-dir DIR] [section.key=value ...]

Inputs are checked before Ray starts: every missing path is listed in one message (exit code 2), and files in
the wrong format fail while parsing, also before Ray (exit code 2). Ray is shut down only if this job started it.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.config import ConfigError, load_config
from inbol_ray.data.loaders import DataFormatError
from inbol_ray.data.prepare import input_problems, read_sources, run_prepare
from inbol_ray.runtime import ray_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--run-dir", default="", help="override run_dir (local path or URI)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"prepare: config error: {exc}", file=sys.stderr)
        return 2
    if args.run_dir:
        cfg.run_dir = args.run_dir
    problems = input_problems(cfg.data)
    if problems:
        print(f"prepare: {len(problems)} input problem(s), nothing started:", file=sys.stderr)
        print("\n".join(f"  - {line}" for line in problems), file=sys.stderr)
        return 2
    try:
        sources = read_sources(cfg)
    except DataFormatError as exc:
        print(f"prepare: data format error, nothing started: {exc}", file=sys.stderr)
        return 2

    with ray_session(cfg.ray):
        result = run_prepare(cfg, sources)
    print(result.summary_line())
    print(f"prepare: items -> {result.items_uri}; quarantine -> {result.quarantine_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
