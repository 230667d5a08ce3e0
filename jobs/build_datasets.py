"""Construct stage: `items` + `samples` -> `idk_it`, `sft_baseline`, `cadpo_pairs` tables (+ quarantine).

    python -m jobs.build_datasets --config configs/tiny.yaml [--run-dir DIR] [section.key=value ...]

Reads `<run_dir>/items` and `<run_dir>/samples`, writes `<run_dir>/tables/<name>/` and
`<run_dir>/quarantine/construct_<name>.parquet`. Text-only work on the driver: no Ray needed.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.boundary.tables import run_construct
from inbol_ray.config import ConfigError, load_config
from inbol_ray.data import io as dio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.build_datasets", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--run-dir", default="", help="override run_dir (local path or URI)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"build_datasets: config error: {exc}", file=sys.stderr)
        return 2
    run_dir = dio.absolute(args.run_dir or cfg.run_dir)
    items_uri, samples_uri = dio.join(run_dir, "items"), dio.join(run_dir, "samples")
    missing = [u for u in (items_uri, samples_uri) if not dio.exists(u)]
    if missing:
        print(f"build_datasets: missing input(s), run the earlier stages first: {missing}", file=sys.stderr)
        return 2
    result = run_construct(cfg.construct, run_dir, items_uri, samples_uri)
    print(result.summary_line())
    for name, uri in result.uris.items():
        print(f"  {name} -> {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
