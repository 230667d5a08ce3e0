"""`python -m serve --checkpoint DIR`: the model API and the Gradio demo on Ray Serve, on 127.0.0.1.

Only builds and runs (setup -> serve -> cleanup): starts a local Ray (or connects to `ray.address`),
starts Serve's HTTP proxy on `--host`/`--port` (default `serve.host`/`serve.port` from the config:
127.0.0.1:8000, loopback only unless asked), deploys `serve.app:build_app`, and blocks until Ctrl-C.
"""

from __future__ import annotations

import argparse
import time

from inbol_ray.config import load_config
from inbol_ray.runtime import init_ray, quiet_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="merged HF model dir, training output or peft adapter dir (local path or URI)",
    )
    parser.add_argument(
        "--base", default=None, help="base model dir of an adapter (default: from adapter_config)"
    )
    parser.add_argument(
        "--config", default=None, help="YAML config (serve/sampling/eval sections); defaults otherwise"
    )
    parser.add_argument("--host", default=None, help="HTTP bind address (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port, 8000)")
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "transformers", "vllm"],
        help="auto: vLLM on a GPU when installed, transformers otherwise",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_env()
    cfg = load_config(args.config, args.overrides)
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port

    import ray
    from ray import serve

    from serve.app import APP_NAME, build_app

    started = init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.temp_dir)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(
            {
                "checkpoint": args.checkpoint,
                "config": args.config,
                "base": args.base,
                "engine": args.engine,
                "overrides": args.overrides,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        base = f"http://{host}:{port}"
        print(
            f"serving {args.checkpoint}\n  demo:   {base}/demo/\n  API:    POST {base}/v1/answer, "
            f"POST {base}/v1/chat/completions\n  health: {base}/healthz, {base}/readyz\nCtrl-C stops."
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


if __name__ == "__main__":
    main()
