"""Benchmark: the model behind Ray Serve (HTTP on 127.0.0.1) vs. the same model called in-process.

    python -m benchmarks.serve                       # ~4 min on 2 CPU cores (tiny untrained checkpoint)
    python -m benchmarks.serve --checkpoint DIR      # a trained checkpoint
    python -m benchmarks.serve --quick               # smoke run; numbers mean nothing

What is compared (DESIGN.md section 4: "direct model calls for Serve overhead"):
- **direct**: the plain `serve.model.RefusalAwareModel` in this process, `clients` asyncio tasks each sending
  greedy `answer` requests back to back. It has the same dynamic batching as a replica, so the ratio
  isolates what Serve adds: HTTP parsing and the proxy, the ingress replica, the handle hop, pickling;
  torch gets the same thread count as a replica (`sampling.cpus_per_actor`).
- **serve**: `POST /v1/answer` over loopback HTTP from `clients` threads, one model replica.
- **autoscale**: min 1 / max 2 replicas, `upscale_delay_s` shortened; 16 clients keep sending until the
  second replica has served for a while; throughput and latency before and after it came up.
Every request is a real ShapesWorld image and question, greedy (mode `answer`); a request's latency is
measured by its client, from send to parsed reply. p99 over few requests is close to the maximum.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests

from benchmarks._measure import environment, format_table
from inbol_ray.config import Config, load_config
from inbol_ray.data.shapes import generate
from inbol_ray.runtime import quiet_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
COLUMNS = [
    "case",
    "clients",
    "replicas",
    "requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "p50 vs direct",
    "req/s vs direct",
]


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def summarise(case: str, clients: int, replicas: str, latencies: list[float], wall: float) -> dict[str, Any]:
    lat = sorted(latencies)
    return {
        "case": case,
        "clients": clients,
        "replicas": replicas,
        "requests": len(lat),
        "req/s": len(lat) / wall,
        "p50 ms": statistics.median(lat) * 1000,
        "p99 ms": percentile(lat, 0.99) * 1000,
    }


def workload(cfg: Config, n: int = 16) -> list[tuple[bytes, str]]:
    shapes = replace(
        cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=n, n_ood_test=0, n_unanswerable_test=n
    )
    return [(it.image, it.text) for it in generate(shapes, cfg.model.image_size)]


# --- direct ------------------------------------------------------------------------------------------


def run_direct(
    checkpoint: str, cfg: Config, cases: list[tuple[int, int]]
) -> tuple[list[dict[str, Any]], str]:
    """One row per (clients, requests per client), and the engine the model chose."""
    import torch

    from serve.model import RefusalAwareModel

    torch.set_num_threads(max(1, int(cfg.sampling.cpus_per_actor)))
    model = RefusalAwareModel(checkpoint, cfg)
    items = workload(cfg)

    async def client(i: int, n: int, out: list[float]) -> None:
        for j in range(n):
            image, question = items[(i * n + j) % len(items)]
            start = time.perf_counter()
            await model.answer(image, question)
            out.append(time.perf_counter() - start)

    async def run(clients: int, per_client: int) -> tuple[list[float], float]:
        latencies: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(client(i, per_client, latencies) for i in range(clients)))
        return latencies, time.perf_counter() - start

    rows = []
    try:
        asyncio.run(run(2, 2))  # warm-up: first generate calls allocate
        for clients, per_client in cases:
            latencies, wall = asyncio.run(run(clients, per_client))
            rows.append(summarise("direct (in-process)", clients, "-", latencies, wall))
    finally:
        model.close()
    return rows, model.engine


# --- serve -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(checkpoint: str, overrides: list[str]) -> None:
    from ray import serve

    from serve.app import APP_NAME, build_app

    serve.run(
        build_app({"checkpoint": checkpoint, "config": str(CONFIG), "overrides": overrides}),
        name=APP_NAME,
        route_prefix="/",
    )


def http_bodies(cfg: Config) -> list[dict[str, str]]:
    return [{"image": base64.b64encode(img).decode(), "question": q} for img, q in workload(cfg)]


def post(session: requests.Session, url: str, body: dict[str, str]) -> float:
    start = time.perf_counter()
    r = session.post(url, json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return time.perf_counter() - start


def run_http(
    url: str, bodies: list[dict[str, str]], clients: int, per_client: int
) -> tuple[list[float], float]:
    def client(i: int) -> list[float]:
        with requests.Session() as session:
            return [post(session, url, bodies[(i * per_client + j) % len(bodies)]) for j in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(client, range(clients)) for t in ts]
    return latencies, time.perf_counter() - start


def running_replicas() -> int:
    from ray import serve

    from serve.app import APP_NAME, DEPLOYMENT_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def run_autoscale(
    url: str, bodies: list[dict[str, str]], clients: int, after_s: float, limit_s: float
) -> list[dict]:
    """Load until 2 replicas have run for `after_s` (or `limit_s` passed); split results at the scale-up."""
    done: list[tuple[float, float]] = []  # (finish time, latency)
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        with requests.Session() as session:
            j = 0
            while not stop.is_set():
                latency = post(session, url, bodies[(i + j) % len(bodies)])
                with lock:
                    done.append((time.perf_counter(), latency))
                j += 1

    t0 = time.perf_counter()
    scaled_at = None
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        while time.perf_counter() - t0 < limit_s:
            if scaled_at is None and running_replicas() >= 2:
                scaled_at = time.perf_counter()
            if scaled_at is not None and time.perf_counter() - scaled_at >= after_s:
                break
            time.sleep(0.5)
        stop.set()
        for f in futures:
            f.result()
    end = time.perf_counter()
    if scaled_at is None:
        lat = [latency for _, latency in done]
        row = summarise("serve autoscale 1->2", clients, f"1 (no scale-up in {limit_s:.0f} s)", lat, end - t0)
        return [row]
    before = [lat for t, lat in done if t < scaled_at]
    after = [lat for t, lat in done if t >= scaled_at]
    took = scaled_at - t0
    return [
        summarise("serve autoscale, before scale-up", clients, f"1 (first {took:.0f} s)", before, took),
        summarise(
            "serve autoscale, after scale-up",
            clients,
            f"2 (last {end - scaled_at:.0f} s)",
            after,
            end - scaled_at,
        ),
    ]


def with_ratios(rows: list[dict[str, Any]], direct: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        base = direct.get(row["clients"])
        if base:
            row["p50 vs direct"] = f"{row['p50 ms'] / base['p50 ms']:.2f}x"
            row["req/s vs direct"] = f"{row['req/s'] / base['req/s']:.2f}x"
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="model to serve (default: build the tiny untrained one)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--per-client", type=int, default=0, help="requests per client (default: 240 / clients, >= 20)"
    )
    p.add_argument("--after-s", type=float, default=15.0, help="autoscale: measure this long with 2 replicas")
    p.add_argument("--limit-s", type=float, default=120.0, help="autoscale: give up waiting for replica 2")
    p.add_argument("--quick", action="store_true", help="smoke run at toy sizes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_env()
    if args.quick:
        args.clients, args.per_client, args.after_s, args.limit_s = [1, 4], 3, 2.0, 30.0
    cfg = load_config(CONFIG)
    scratch = Path(tempfile.mkdtemp(prefix="inbol-bench-serve-"))
    checkpoint = args.checkpoint
    if not checkpoint:
        from inbol_ray.model.tiny import build_tiny_checkpoint

        checkpoint = str(scratch / "tiny")
        build_tiny_checkpoint(Path(checkpoint), cfg.model)

    def per(clients: int) -> int:
        return args.per_client or max(20, 240 // clients)

    print("  direct ...", file=sys.stderr, flush=True)
    direct_rows, engine = run_direct(checkpoint, cfg, [(c, per(c)) for c in args.clients])
    direct = {r["clients"]: r for r in direct_rows}

    import ray
    from ray import serve

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=cfg.ray.num_cpus,
        include_dashboard=False,
        _temp_dir=str(scratch / "ray"),
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        url = f"http://127.0.0.1:{port}/v1/answer"
        bodies = http_bodies(cfg)
        print("  serve, 1 replica ...", file=sys.stderr, flush=True)
        deploy(checkpoint, ["serve.min_replicas=1", "serve.max_replicas=1"])
        run_http(url, bodies, 2, 2)  # warm-up
        serve_rows = []
        for clients in args.clients:
            latencies, wall = run_http(url, bodies, clients, per(clients))
            serve_rows.append(summarise("serve (HTTP)", clients, "1", latencies, wall))
        serve.delete("inbol")
        print("  serve, autoscaling 1 -> 2 ...", file=sys.stderr, flush=True)
        deploy(checkpoint, ["serve.min_replicas=1", "serve.max_replicas=2", "serve.upscale_delay_s=2"])
        run_http(url, bodies, 2, 2)
        scale_rows = run_autoscale(url, bodies, max(args.clients), args.after_s, args.limit_s)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    env = environment()
    print("# Serve benchmark (benchmarks/serve.py)\n")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(
        f"checkpoint: {args.checkpoint or 'tiny untrained (temp dir)'} | engine: {engine} | greedy answers, "
        f"max_new_tokens={cfg.eval.max_new_tokens}, batch <= {cfg.serve.max_batch_size} | "
        f"replica CPUs: {cfg.sampling.cpus_per_actor}\n"
    )
    rows = direct_rows + with_ratios(serve_rows, direct) + with_ratios(scale_rows, direct)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
