"""Run one config under several seeds and write the mean ± sd table, with which orderings exceed seed noise.

    python -m jobs.seeds --config configs/tiny.yaml --run-dir runs/seeds [--seeds 0,1,2] [key=value ...]

Each seed is an ordinary main-job run under `<run-dir>/seed-<s>` with every seed of the config set to s
(SEED_KEYS: the world, the tiny model's initialisation, base training, sampling, construction, training,
the mismatch builder), so a finished seed is reused when the command is run again. Then
`<run-dir>/seeds.md` (and `seeds.parquet`: the per-seed metrics rows) holds, per split, each method's
s_trust (RefR on unanswerable sets) as mean ± sd, and the paper's orderings (`inbol_ray.eval.seeds`) with
their paired differences per seed.
"""

from __future__ import annotations

import argparse
import json
import sys

from inbol_ray.eval.reference_band import SEED_KEYS  # one list: the band covers a config at any seed


def _seed_list(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2] (one argument, so the overrides after it stay overrides)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.seeds", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config", action="append", required=True, help="YAML config; repeat to layer files")
    parser.add_argument(
        "--run-dir", default="runs/seeds", help="parent of the per-seed run dirs (local or URI)"
    )
    parser.add_argument(
        "--seeds", type=_seed_list, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every seed")
    return parser


def seed_overrides(seed: int) -> list[str]:
    return [f"{key}={seed}" for key in SEED_KEYS]


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa

    from inbol_ray import methods as M
    from inbol_ray.config import ConfigError, load_config
    from inbol_ray.data import io as dio
    from inbol_ray.eval.recipe import recipe_section
    from inbol_ray.eval.reference_band import band_from_summary
    from inbol_ray.eval.report import dataset_splits, read_item_keys
    from inbol_ray.eval.seeds import seeds_markdown, stack, summary
    from inbol_ray.run_layout import RunLayout
    from jobs import pipeline

    args = _parser().parse_args(argv)
    bad = [o for o in args.overrides if o.split("=", 1)[0] in SEED_KEYS]
    if bad:
        print(f"seeds: {bad} would be overwritten per seed; drop them", file=sys.stderr)
        return 2
    if len(set(args.seeds)) != len(args.seeds):
        print(f"seeds: --seeds repeats a seed: {args.seeds}", file=sys.stderr)
        return 2
    root = dio.absolute(args.run_dir)
    configs = [a for c in args.config for a in ("--config", c)]
    metrics, splits, cfg = {}, {}, None
    for n, seed in enumerate(args.seeds, 1):
        run_dir = dio.join(root, f"seed-{seed}")
        print(f"seeds [{n}/{len(args.seeds)}]: seed {seed} under {run_dir}", flush=True)
        overrides = [*args.overrides, *seed_overrides(seed)]
        if pipeline.main([*configs, "--run-dir", run_dir, *overrides]) != 0:
            print(f"seeds: the run of seed {seed} failed ({run_dir})", file=sys.stderr)
            return 2
        try:
            cfg = load_config(args.config, overrides)
        except ConfigError as exc:  # already reported by the run
            print(f"seeds: config error: {exc}", file=sys.stderr)
            return 2
        layout = RunLayout.of(cfg, run_dir)
        metrics[seed] = dio.read_table(layout.metrics).to_pandas()
        splits[seed] = dataset_splits(read_item_keys(layout.items))
    stacked = stack(metrics, splits)
    assert cfg is not None
    recipe = recipe_section(cfg, M.training_order(cfg.eval.methods, cfg.train.dpo_init))
    text = seeds_markdown(stacked, recipe)
    dio.write_table(pa.Table.from_pandas(stacked, preserve_index=False), dio.join(root, "seeds.parquet"))
    dio.write_bytes(dio.join(root, "seeds.md"), (text + "\n").encode())
    source = f"make seeds over {', '.join(str(s) for s in args.seeds)} with {', '.join(args.config)}"
    band = band_from_summary(summary(stacked), args.seeds, source)
    dio.write_bytes(dio.join(root, "band.json"), json.dumps(band, indent=1).encode())  # the report's band
    print(text)
    print(f"seeds: table written to {dio.join(root, 'seeds.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
