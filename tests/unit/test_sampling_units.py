"""The generation stage's pure pieces: request checks, per-item seeds, vLLM engine arguments, response
cleaning, selection, shard plans and placeholder rows."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from inbol_ray import schema as S
from inbol_ray.config import Config, SamplingConfig
from inbol_ray.generation.grade import placeholders
from inbol_ray.generation.shards import RowGroupKeys, Selection, make_plan, read_units, shard_of
from inbol_ray.model.generation import clean_response, inverse_cdf, stream_seed
from inbol_ray.sampling.base import check_request, check_seeds, item_seed
from inbol_ray.sampling.vllm_engine import CPU_KV_CACHE_BYTES, engine_kwargs


@pytest.mark.parametrize(
    ("n_images", "k", "temperature", "top_p", "words"),
    [
        (2, 1, 0.0, 1.0, "2 images but 3 prompts"),
        (3, 0, 1.0, 0.9, "k must be >= 1"),
        (3, 1, -0.1, 0.9, "temperature must be >= 0"),
        (3, 4, 0.0, 1.0, "use k=1"),
        (3, 4, 1.0, 0.0, "top_p must be in (0, 1]"),
    ],
)
def test_check_request_rejects_with_one_clear_line(n_images, k, temperature, top_p, words) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        check_request([None] * n_images, ["q"] * 3, k, temperature, top_p)


def test_check_request_accepts_greedy_and_sampling() -> None:
    check_request([None] * 3, ["q"] * 3, 1, 0.0, 1.0)
    check_request([None] * 3, ["q"] * 3, 10, 1.0, 0.9)


def test_item_seed_is_a_pure_function_of_run_seed_and_id() -> None:
    assert item_seed(0, "a") == item_seed(0, "a")
    assert len({item_seed(0, f"item-{i}") for i in range(1000)}) == 1000
    assert item_seed(0, "a") != item_seed(1, "a")
    assert all(0 <= item_seed(s, "x") < 2**31 - 1 for s in range(50))
    assert len({stream_seed(item_seed(0, "a"), j) for j in range(10)}) == 10
    check_seeds(None, 3)
    with pytest.raises(ValueError, match="one seed per item"):
        check_seeds([1, 2], 3)


def test_inverse_cdf_draws_only_tokens_with_probability() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.999999])
    assert inverse_cdf(probs, u).tolist() == [1, 1, 1, 3, 3]
    gen = torch.Generator().manual_seed(0)
    draws = inverse_cdf(torch.tensor([[0.2, 0.8]]).expand(20000, 2), torch.rand(20000, generator=gen))
    assert abs(draws.float().mean().item() - 0.8) < 0.02


def test_engine_kwargs_cpu_and_gpu() -> None:
    cfg = SamplingConfig(engine="vllm", max_model_len=512, tensor_parallel_size=2, seed=3)
    cpu = engine_kwargs("/m", cfg, "float32", gpu=False)
    assert cpu["enforce_eager"] and cpu["enable_chunked_prefill"] is False
    assert cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert cpu["enable_prefix_caching"] and cpu["limit_mm_per_prompt"] == {"image": 1}
    assert (cpu["max_model_len"], cpu["tensor_parallel_size"], cpu["seed"]) == (512, 2, 3)
    assert cpu["load_format"] == "safetensors"  # vLLM never unpickles `.bin` weights
    assert (
        cpu["allowed_media_domains"] == ["media fetching disabled"] and cpu["allowed_local_media_path"] == ""
    )
    gpu = engine_kwargs("/m", cfg, "bfloat16", gpu=True)
    assert gpu["gpu_memory_utilization"] == cfg.gpu_memory_utilization and gpu["dtype"] == "bfloat16"
    assert "enforce_eager" not in gpu and "kv_cache_memory_bytes" not in gpu
    sized = engine_kwargs("/m", SamplingConfig(engine="vllm", kv_cache_memory_bytes=1 << 30), "float32", True)
    assert sized["kv_cache_memory_bytes"] == 1 << 30


def test_clean_response_drops_dangling_bytes_and_whitespace() -> None:
    assert clean_response("  red\ufffd\ufffd ") == "red"
    assert clean_response("\ufffd") == ""
    assert clean_response(" I don't know. ") == "I don't know."


def test_selection_by_split_dataset_and_answerable() -> None:
    table = pa.table(
        {S.SPLIT: ["train", "test", "train"], S.DATASET: ["a", "a", "b"], S.ANSWERABLE: [True, True, False]}
    )
    assert Selection().mask(table).to_pylist() == [True, True, True]
    assert Selection(splits=("train",)).mask(table).to_pylist() == [True, False, True]
    assert Selection(splits=("train",), datasets=("b",)).mask(table).to_pylist() == [False, False, True]
    assert Selection(answerable_only=True).mask(table).to_pylist() == [True, True, False]


def test_plan_is_stable_and_rejects_duplicate_ids() -> None:
    cfg = Config()
    ids = [f"item-{i}" for i in range(50)]
    plan = make_plan(ids, 16, model="/m", sampling=cfg.sampling)
    assert plan.n_shards == 4 and sum(plan.expected.values()) == 50
    assert make_plan(list(reversed(ids)), 16, model="/m", sampling=cfg.sampling) == plan
    assert make_plan(ids, 16, model="/other", sampling=cfg.sampling).run_hash != plan.run_hash
    assert make_plan(ids, 8, model="/m", sampling=cfg.sampling).run_hash != plan.run_hash
    with pytest.raises(ValueError, match="duplicate ids"):
        make_plan([*ids, "item-3"], 16)


def test_placeholders_fill_the_output_layout() -> None:
    bad = pa.table({S.ID: ["x"], S.DATASET: ["d"], S.RESPONSES: pa.array([[]], pa.list_(pa.string()))})
    rows = placeholders(bad, S.PREDICTIONS).to_pylist()
    assert rows == [
        {
            S.MODEL: "",
            S.DATASET: "d",
            S.ID: "x",
            S.PROMPT: "",
            S.RESPONSE: "",
            S.CORRECT: False,
            S.REFUSED: False,
        }
    ]
    assert placeholders(bad, S.SAMPLES).to_pylist()[0][S.RESPONSES] == []


def test_read_units_cover_exactly_the_pending_rows() -> None:
    ids = [f"id-{i}" for i in range(40)]
    keys = [RowGroupKeys("f.parquet", 0, 40, [(i, item, "d") for i, item in enumerate(ids) if i % 2 == 0])]
    pending = {0}
    units = read_units(keys, 3, pending, 5)
    slices = [piece for u in units for piece in u["slices"]]
    covered = {i for p in slices for i in range(p["start"], p["start"] + p["length"])}
    wanted = {i for i, item in enumerate(ids) if i % 2 == 0 and shard_of(item, 3) in pending}
    assert wanted and wanted <= covered
    assert all(any(p["start"] <= i < p["start"] + p["length"] for i in wanted) for p in slices)


def test_small_row_groups_are_gathered_into_batch_sized_units() -> None:
    """Prepare writes row groups of a few rows: one unit per row group would be one Ray task per few rows."""
    keys = [
        RowGroupKeys(f"f{f}.parquet", rg, 4, [(i, f"id-{f}-{rg}-{i}", "d") for i in range(4)])
        for f in range(5)
        for rg in range(4)
    ]  # 80 rows in 20 row groups of 4
    units = read_units(keys, 1, {0}, 16)
    assert len(units) == 5
    assert all(len(u["slices"]) == 4 for u in units)
    pieces = [(p["uri"], p["row_group"]) for u in units for p in u["slices"]]
    assert len(pieces) == len(set(pieces)) == 20
