"""`jobs.evaluate_checkpoint` resumes from the generation plan, never by the model's name alone.

Its answers live under `eval/predictions/<name>/` and an earlier run's shards are reused only under the
same plan hash (`generation.stage.depends_on`: the checkpoint's location and `checkpoint.stamp`, prompt,
decoding, engine, items); another hash deletes them before anything is asked (`finished_shards`). So the
same `--name` pointed at another checkpoint, a retrained one, other prompts or decoding asks again."""

from __future__ import annotations

from pathlib import Path

from inbol_ray.config import load_config
from inbol_ray.eval.evaluate import eval_job, eval_selection
from inbol_ray.generation.shards import make_plan
from inbol_ray.generation.stage import depends_on
from inbol_ray.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[2]


def checkpoint(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def plan_hash(tmp_path: Path, location: Path, *overrides: str) -> str:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])
    job = eval_job(cfg, RunLayout.of(cfg), "x", str(location), eval_selection(None), refusal=False)
    return make_plan(["a:1", "a:2"], 64, **depends_on(cfg, job)).run_hash


def test_the_same_name_with_another_checkpoint_prompt_or_decoding_is_another_plan(tmp_path: Path) -> None:
    a = checkpoint(tmp_path / "a", b"a" * 10)
    first = plan_hash(tmp_path, a)
    assert plan_hash(tmp_path, a) == first  # unchanged: its answers are reused
    assert plan_hash(tmp_path, checkpoint(tmp_path / "b", b"b" * 11)) != first
    assert plan_hash(tmp_path, a, "eval.max_new_tokens=20") != first
    assert plan_hash(tmp_path, a, "prompt.short_answer=Answer in one word.") != first
    checkpoint(a, b"c" * 12)  # retrained in place
    assert plan_hash(tmp_path, a) != first
