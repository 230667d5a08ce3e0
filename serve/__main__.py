"""`python -m serve`: a run's models, or one checkpoint, behind one OpenAI-compatible endpoint plus the demo.

    python -m serve --config configs/tiny.yaml --run-dir runs/tiny  # base + every trained method
    python -m serve --checkpoint runs/tiny/models/cadpo             # one checkpoint
    python -m serve --checkpoint DIR --engine transformers          # without vLLM's engine

Only builds and runs (setup -> serve -> cleanup): refuses a non-loopback `--host` without an API key
(`serve/auth.py`; `--insecure` overrides, with a warning), starts a local Ray (or connects to `ray.address`),
starts Serve's HTTP proxy on `--host`/`--port` (default `serve.host`/`serve.port` from the config:
127.0.0.1:8000, loopback only unless asked), deploys the one app (`serve/llm_app.py`: the same ingress in
front of vLLM or transformers, `--engine`), and blocks until Ctrl-C or SIGTERM (what Kubernetes, systemd
and Docker send): both shut Serve down, and the Ray this command started, so no process is left behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from inbol_ray.config import load_config
from inbol_ray.runtime import init_ray, quiet_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", default=None, help="run directory (local path or URI; default: the config's)"
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated names to serve (default: base + trained methods)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="serve this one checkpoint (HF dir, training output or adapter)"
    )
    parser.add_argument(
        "--base", default=None, help="base model dir of an adapter checkpoint (default: from adapter_config)"
    )
    parser.add_argument("--config", action="append", default=None, help="YAML config; repeat to layer files")
    parser.add_argument("--host", default=None, help="HTTP bind address (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port, 8000)")
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "transformers", "vllm"],
        help="auto: vLLM where it is installed (transformers for an architecture it lacks)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --host without an API key (the key's variable: serve.api_key_env)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    if args.checkpoint and (args.run_dir or args.models):
        parser.error("--checkpoint serves one model: leave out --run-dir and --models")
    if args.base and not args.checkpoint:
        parser.error("--base is an adapter checkpoint's base: pass --checkpoint too")
    return args


def build_args(args: argparse.Namespace) -> dict[str, Any]:
    """`build_llm_app`'s args for the command line."""
    out: dict[str, Any] = {"config": args.config, "overrides": list(args.overrides), "engine": args.engine}
    if args.checkpoint:
        out.update(checkpoint=args.checkpoint, base=args.base)
    else:
        out.update(
            run_dir=args.run_dir, models=[m.strip() for m in args.models.split(",")] if args.models else None
        )
    return out


def build(args: argparse.Namespace) -> tuple[Any, str]:
    """The Serve application and what it serves (for the banner). Call after Ray is up."""
    from serve.llm_app import bind_app, plan_app

    plan = plan_app(build_args(args))
    where = args.checkpoint or f"the run {plan.cfg.run_dir}"
    return bind_app(plan), f"{', '.join(m.name for m in plan.served)} from {where} ({plan.engine})"


class Stop(Exception):
    """Raised in the main thread by SIGTERM / SIGINT: the `finally` below then shuts everything down."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_env()
    cfg = load_config(args.config, args.overrides)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    from serve.auth import check_exposure

    check_exposure(host, cfg.serve.api_key_env, insecure=args.insecure)  # before anything starts

    import ray
    from ray import serve

    started = init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.temp_dir, cfg.checkpoint)
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
    ):  # after ray.init: its core worker installs an aborting handler
        signal.signal(sig, _raise_stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        app, what = build(args)
        from serve.llm_app import APP_NAME

        serve.run(app, name=APP_NAME, route_prefix="/")
        base = f"http://{host}:{port}"
        print(
            f"serving {what}\n  demo:   {base}/demo/\n  API:    {base}/v1 (OpenAI: models, chat/completions), "
            f"POST {base}/v1/answer\n  health: {base}/healthz, {base}/readyz\nCtrl-C or SIGTERM stops.",
            flush=True,
        )
        threading.Event().wait()  # until a signal raises Stop
    except Stop as stop:
        print(f"serve: {stop}: shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
