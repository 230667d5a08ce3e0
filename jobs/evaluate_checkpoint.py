"""Score a local checkpoint of any image-text-to-text architecture on a run's evaluation sets.

    python -m jobs.evaluate_checkpoint --config configs/tiny.yaml --run-dir runs/tiny \\
        --name qwen2-vl-2b --checkpoint /models/Qwen2-VL-2B-Instruct [--datasets a,b] [section.key=value ...]

Same items, prompts (`render_prompt`), greedy decoding and grading as the run's own methods; a LLaVA-1.5
checkpoint is asked in the methods' format, any other architecture (Qwen2-VL, LLaVA-NeXT, ...) through its
own chat template and processor, by the engine `sampling.engine` names (vLLM, or transformers where vLLM
cannot run it). The model's answers land under `eval/predictions/<name>/`, the model in the run's registry
(`eval/models.json`), and the run's predictions, metrics and report are rewritten with it beside the
methods, so `jobs.compare RUN RUN --methods cadpo:NAME` compares it with any method. Rerunning reuses its
answers while the checkpoint (its location and `checkpoint.stamp`), the items, prompts, decoding and
engine are unchanged: they are the generation plan's hash (`generation.stage.depends_on`), so the same
`--name` pointed at another checkpoint, or at a retrained one, asks everything again.
"""

from __future__ import annotations

import sys

from inbol_ray.cli import finish_model_job, held, model_job


def main(argv: list[str] | None = None) -> int:
    parsed = model_job(
        "evaluate_checkpoint",
        __doc__,
        argv,
        lambda p: p.add_argument("--checkpoint", required=True, help="checkpoint directory or URI"),
    )
    if isinstance(parsed, int):
        return parsed
    cfg, args = parsed
    return held("evaluate_checkpoint", cfg, lambda: _evaluate(cfg, args))


def _evaluate(cfg, args) -> int:
    from inbol_ray.checkpoint import model_location
    from inbol_ray.data import io as dio
    from inbol_ray.eval.evaluate import evaluate_checkpoint
    from inbol_ray.run_layout import RunLayout
    from inbol_ray.runtime import ray_session

    layout = RunLayout.of(cfg)
    if not dio.exists(layout.items):
        print(f"evaluate_checkpoint: no items in {layout.root} (run jobs.prepare first)", file=sys.stderr)
        return 2
    try:
        with ray_session(cfg.ray, cfg.checkpoint):
            evaluate_checkpoint(
                cfg, layout, args.name, model_location(args.checkpoint), datasets=args.datasets
            )
    except (ValueError, FileNotFoundError) as exc:
        print(f"evaluate_checkpoint: {exc}", file=sys.stderr)
        return 2
    finish_model_job(cfg, layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
