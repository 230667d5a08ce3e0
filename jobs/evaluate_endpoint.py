"""Evaluate a model behind an OpenAI-compatible chat endpoint on a run's evaluation sets.

    python -m jobs.evaluate_endpoint --config configs/tiny.yaml --run-dir runs/tiny \\
        --name served-cadpo --base-url http://127.0.0.1:8000/v1 --model cadpo [--datasets a,b] \\
        [--api-key-env OPENAI_API_KEY] [--concurrency 8] [--timeout-s 60] [--max-attempts 6]

Same prompts and grading as the run's own methods (`inbol_ray/eval/endpoint.py`); the model's rows land
in the run's `predictions` and `metrics` under `--name`, so `jobs.compare RUN RUN --methods cadpo:NAME`
compares it with any method. Answers are stored as they arrive: rerunning after an interruption or after
failures asks only what is still unanswered. Exit 1 when some items still have no answer (listed in the
`evaluate_<name>` quarantine); no Ray is needed.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate_endpoint", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", action="append", required=True, help="YAML config; repeat to layer files")
    parser.add_argument(
        "--run-dir", default=None, help="the run whose items are asked (default: the config's)"
    )
    parser.add_argument("--name", required=True, help="the model's name in the run's tables")
    parser.add_argument("--base-url", required=True, help="endpoint up to /v1, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the endpoint's model field")
    parser.add_argument(
        "--datasets", default="", help="comma-separated data sets (default: every evaluation set)"
    )
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--max-attempts", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"run_dir={args.run_dir}"] if args.run_dir else [])]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"evaluate_endpoint: config error: {exc}", file=sys.stderr)
        return 2
    from inbol_ray import schema as S
    from inbol_ray.eval.endpoint import EndpointSpec, evaluate_endpoint
    from inbol_ray.eval.evaluate import eval_selection
    from inbol_ray.metrics import metrics_table
    from inbol_ray.run_layout import RunLayout

    spec = EndpointSpec(args.name, args.base_url, args.model, args.api_key_env, args.concurrency, args.timeout_s,
                        args.max_attempts)  # fmt: skip
    datasets = [d for d in args.datasets.split(",") if d] or cfg.eval.datasets or None
    graded, run = evaluate_endpoint(cfg, RunLayout.of(cfg), spec, eval_selection(datasets).mask)
    for row in metrics_table(graded).to_dict("records"):
        print(f"    {row[S.DATASET]:<28} n={row['n']:<5} acc={row[S.ACC]:6.1%} refr={row[S.REFR]:6.1%} "
              f"s_trust={100 * row[S.S_TRUST]:+7.2f}")  # fmt: skip
    if run.failed:
        print(f"evaluate_endpoint: {len(run.failed)} item(s) without an answer (rerun to ask them again), "
              f"e.g. {next(iter(run.failed.items()))}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
