"""Train one method on a run directory's tables with Ray Train (local mode, DDP or FSDP; LoRA or full).

    python -m jobs.train --config configs/tiny.yaml [--run-dir DIR] method=cadpo [section.key=value ...]

method: idk_it | sft | cadpo | dpo1 | dpo2 | dpo3. Reads `<run_dir>/tables/<idk_it|sft_baseline|cadpo_pairs>`
and `<run_dir>/models/base` (DPO methods: `<run_dir>/models/idk_it`, train.dpo_init); writes `<run_dir>/models/<method>` (merged HF checkpoint, adapter/, metrics.jsonl).
DPO methods need reference log-probs: if the pairs table has none they are computed first (one Ray Data pass)
into `<run_dir>/tables/cadpo_pairs_ref`. Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.config import ConfigError, load_config
from inbol_ray.data import io as dio
from inbol_ray.runtime import ray_session
from inbol_ray.train.trainer import METHOD_TABLES, needs_reference, run_reference_pass, run_training


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--run-dir", default="", help="override run_dir (local path or URI)")
    parser.add_argument("overrides", nargs="*", help="method=NAME and section.key=value overrides")
    args = parser.parse_args(argv)
    # `method=cadpo` is shorthand for `train.method=cadpo`
    overrides = [f"train.{o}" if o.startswith("method=") else o for o in args.overrides]
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"train: config error: {exc}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or cfg.run_dir
    method = cfg.train.method
    table = dio.join(run_dir, "tables", METHOD_TABLES[method])
    # the embedded default trains its own base into the run; at real scale the base is model.path
    base = dio.join(run_dir, "models", "base")
    if not dio.exists(base) and not cfg.model.build_tiny:
        base = cfg.model.path
    if method in ("cadpo", "dpo1", "dpo2", "dpo3") and cfg.train.dpo_init == "idk_it":
        base = dio.join(run_dir, "models", "idk_it")  # InBoL: DPO starts from (and is anchored to) IDK-IT
    missing = [p for p in (table, base) if not dio.exists(p)]
    if missing:
        print(f"train: missing input(s), nothing started: {', '.join(missing)}", file=sys.stderr)
        return 2
    with ray_session(cfg.ray):
        if needs_reference(method, table):
            ref_table = dio.join(run_dir, "tables", "cadpo_pairs_ref")
            counts = run_reference_pass(cfg, table, base, ref_table)
            print(f"train: reference log-probs -> {ref_table} {counts}")
            table = ref_table
        result = run_training(cfg, method, table, base, dio.join(run_dir, "models", method))
    print(f"train: {result.summary_line()}; metrics -> {result.metrics_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
