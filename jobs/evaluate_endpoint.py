"""Evaluate a model behind an OpenAI-compatible chat endpoint on a run's evaluation sets.

    python -m jobs.evaluate_endpoint --config configs/tiny.yaml --run-dir runs/tiny \\
        --name served-cadpo --base-url http://127.0.0.1:8000/v1 --model cadpo [--datasets a,b] \\
        [--api-key-env VAR] [--concurrency 8] [--timeout-s 60] [--max-attempts 6]

Same prompts and grading as the run's own methods (`inbol_ray/eval/endpoint.py`); the model's rows land
in the run's `predictions` and `metrics` under `--name`, so `jobs.compare RUN RUN --methods cadpo:NAME`
compares it with any method. Answers are stored as they arrive, in a journal of their own for each
(endpoint, model, prompt, decoding): rerunning after an interruption or after failures asks only what is
still unanswered, and a run against another model or endpoint, or with other prompts or decoding, under
the same `--name` asks everything again (`inbol_ray/eval/endpoint_journal.py`). Exit 1 when some items
still have no answer (listed in the `evaluate_<name>` quarantine); no Ray is needed.

No key is sent unless `--api-key-env VAR` names the variable holding it (no default: a key in the
environment for one service is not handed to whatever `--base-url` says). A named key goes over https, or
over plain http to a loopback address (127.0.0.0/8, ::1, localhost) only; anything else, or a named
variable that is not set, exits 2 before anything is asked.
"""

from __future__ import annotations

import sys

from inbol_ray.cli import finish_model_job, held, model_job


def endpoint_arguments(parser) -> None:
    parser.add_argument("--base-url", required=True, help="endpoint up to /v1, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the endpoint's model field")
    parser.add_argument("--api-key-env", default="",
                        help="environment variable holding the key (none: no key is sent); https or loopback "
                             "http only")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--max-attempts", type=int, default=6)


def main(argv: list[str] | None = None) -> int:
    parsed = model_job("evaluate_endpoint", __doc__, argv, endpoint_arguments)
    if isinstance(parsed, int):
        return parsed
    cfg, args = parsed
    return held("evaluate_endpoint", cfg, lambda: _evaluate(cfg, args))


def _evaluate(cfg, args) -> int:
    from inbol_ray.eval.endpoint import EndpointSpec, evaluate_endpoint
    from inbol_ray.eval.evaluate import eval_selection
    from inbol_ray.run_layout import RunLayout

    spec = EndpointSpec(args.name, args.base_url, args.model, args.api_key_env, args.concurrency, args.timeout_s,
                        args.max_attempts)  # fmt: skip
    layout = RunLayout.of(cfg)
    try:
        _, run = evaluate_endpoint(cfg, layout, spec, eval_selection(args.datasets).mask)
    except ValueError as exc:
        print(f"evaluate_endpoint: {exc}", file=sys.stderr)
        return 2
    finish_model_job(cfg, layout)
    if run.failed:
        print(f"evaluate_endpoint: {len(run.failed)} item(s) without an answer (rerun to ask them again), "
              f"e.g. {next(iter(run.failed.items()))}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
