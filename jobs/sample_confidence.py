"""Sample stage: `items` -> `samples` (K responses per item, graded, conf, bucket) + quarantine.

    python -m jobs.sample_confidence --config configs/tiny.yaml [--run-dir DIR] [--model DIR]
        [--split train] [--datasets vqav2,oven] [--items URI] [--out URI] [--shard-rows N]
        [section.key=value ...]

Engine, K, temperature, actors and GPUs per actor come from the `sampling` section (e.g.
`sampling.engine=vllm sampling.num_actors=4 sampling.gpus_per_actor=1`). The model defaults to the one
the pipeline samples: the trained tiny base (`<run_dir>/models/base`) for the embedded default, else
`model.path`. Rerunning resumes: finished shards are kept. Ray is shut down only if this job started it.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.config import ConfigError, load_config
from inbol_ray.data import io as dio
from inbol_ray.pipeline import Context, base_model_dir
from inbol_ray.runtime import ray_session


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.sample_confidence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--run-dir", default="", help="override run_dir (local path or URI)")
    parser.add_argument("--model", default="", help="model directory (default: the pipeline's base model)")
    parser.add_argument("--split", default="train", help="items split to sample ('' = every split)")
    parser.add_argument("--datasets", default="", help="comma-separated data set names ('' = all)")
    parser.add_argument("--items", default="", help="items table (default <run_dir>/items)")
    parser.add_argument("--out", default="", help="samples folder (default <run_dir>/samples)")
    parser.add_argument("--shard-rows", type=int, default=0, help="items per output shard (default 1024)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"sample_confidence: config error: {exc}", file=sys.stderr)
        return 2
    run_dir = dio.absolute(args.run_dir or cfg.run_dir)
    model = args.model or base_model_dir(Context(cfg, run_dir))
    items = args.items or dio.join(run_dir, "items")
    missing = [p for p in (model, items) if not dio.exists(p)]
    if missing:
        print(f"sample_confidence: missing input(s), nothing started: {missing}", file=sys.stderr)
        return 2

    from inbol_ray.sampling.stage import run_sampling

    with ray_session(cfg.ray):
        result = run_sampling(
            cfg,
            run_dir,
            model,
            items_uri=items,
            out_uri=args.out or None,
            split=args.split or None,
            datasets=[d for d in args.datasets.split(",") if d] or None,
            **({"shard_rows": args.shard_rows} if args.shard_rows > 0 else {}),
        )
    print(result.summary_line())
    print(f"sample_confidence: samples -> {result.samples_uri}; quarantine -> {result.quarantine_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
