"""Training end to end on ShapesWorld tables with a real local Ray: every method in local mode, the
reference pass, the tiny default through a real Ray Train worker, 2-worker DDP with a worker killed mid-run,
FSDP on CPU, a run directory on a non-local filesystem, and the `jobs.train` entry point.

Budget: one reference pass, seven short local runs, one 1-worker and two 2-worker runs (~20-40 s each for
worker start-up on 2 shared cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from train_helpers import (
    EPOCHS,
    ROWS,
    _cfg,
    _copy_run,
    _history,
    _layout,
    _probe_from_saved_model,
    _run_beside,
    _samples,
    _table_for,
)
from transformers import AutoProcessor, LlavaForConditionalGeneration

from inbol_ray import methods as M
from inbol_ray import schema as S
from inbol_ray.boundary.construct import build_cadpo_pairs, build_idk_it, build_sft_baseline
from inbol_ray.checkpoint import follow_export
from inbol_ray.config import Config, ShapesConfig
from inbol_ray.data import io as dio
from inbol_ray.data.shapes import generate_items
from inbol_ray.model.batching import encode_prompt_response, pixel_values
from inbol_ray.run_layout import RunLayout
from inbol_ray.train.data import DPO_KINDS
from inbol_ray.train.response_logprobs import response_logprobs
from inbol_ray.train.trainer import TrainResult, needs_reference, run_reference_pass, run_training

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: Config) -> Path:
    """`<run_dir>/tables/{idk_it,sft_baseline,cadpo_pairs}` built by the real construction code."""
    out = tmp_path_factory.mktemp("train_run")
    shapes = ShapesConfig(
        seed=3, n_pretrain=0, n_train=48, n_val=0, n_id_test=0, n_ood_test=0, n_unanswerable_test=0
    )
    items = generate_items(shapes, tiny_config.model.image_size)
    joined = _samples(items.filter(pa.compute.equal(items[S.SPLIT], "train")), seed=3)
    for name, build, schema in (
        ("idk_it", build_idk_it, S.SFT),
        ("sft_baseline", build_sft_baseline, S.SFT),
        ("cadpo_pairs", build_cadpo_pairs, S.CADPO_PAIRS),
    ):
        table = pa.Table.from_pandas(build(joined, tiny_config.construct).table, preserve_index=False)
        table = S.conform(table, schema, name)
        assert table.num_rows >= ROWS, name
        dio.write_table(table.slice(0, ROWS), str(out / "tables" / name))
    return out


@pytest.fixture(scope="module")
def pairs_with_ref(ray_local, run_dir: Path, tiny_config: Config, tiny_checkpoint: Path) -> str:
    layout = _layout(run_dir, tiny_checkpoint)
    assert needs_reference("cadpo", layout) and not needs_reference("idk_it", layout)
    counts = run_reference_pass(_cfg(tiny_config), layout)
    assert counts["rows"] == ROWS and counts["scored_refusal"] == ROWS
    assert not needs_reference("dpo2", layout)
    return layout.reference_table()


@pytest.fixture(scope="module")
def local_runs(ray_local) -> dict:
    """One local-mode run per method, made on first use and shared (the DDP tests compare against them)."""
    return {}


METHOD_OVERRIDES = {"dpo3": {"sft_weight": 0.1}}  # one DPO run also covers the optional NLL term


def _local(
    method: str, local_runs: dict, run_dir: Path, pairs: str, tiny_config: Config, ckpt: Path
) -> TrainResult:
    if method not in local_runs:
        assert pairs  # the DPO methods train on the reference table
        local_runs[method] = run_training(
            _cfg(tiny_config, **METHOD_OVERRIDES.get(method, {})), method, _layout(run_dir, ckpt)
        )
    return local_runs[method]


def _probe(result: TrainResult) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in result.probe["logps"]])


def test_reference_pass_matches_separate_forwards(pairs_with_ref: str, tiny_checkpoint: Path) -> None:
    """The stored ref_logp_* equal log π_base(response | image, prompt) from one plain forward per response."""
    table = dio.read_table(pairs_with_ref).slice(0, 6).to_pylist()
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    for kind in DPO_KINDS:
        rows = [r for r in table if r[kind] is not None]
        assert all(r[S.REF_LOGP[kind]] is None for r in table if r[kind] is None)
        batch = encode_prompt_response(
            processor,
            pixel_values(processor, [r[S.IMAGE] for r in rows]),
            [r[S.PROMPT] for r in rows],
            [r[kind] for r in rows],
        )
        with torch.no_grad():
            want = response_logprobs(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["pixel_values"],
                batch["response_mask"],
            ).per_sequence
        got = torch.tensor([r[S.REF_LOGP[kind]] for r in rows], dtype=torch.float32)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), kind


@pytest.mark.parametrize("method", ["idk_it", "sft", "cadpo", "dpo1", "dpo2", "dpo3"])
def test_each_method_trains_and_its_checkpoint_reloads(
    method: str,
    local_runs: dict,
    run_dir: Path,
    pairs_with_ref: str,
    tiny_config: Config,
    tiny_checkpoint: Path,
) -> None:
    result = _local(method, local_runs, run_dir, pairs_with_ref, tiny_config, tiny_checkpoint)
    steps_per_epoch = ROWS // 8
    assert result.steps == EPOCHS * steps_per_epoch and result.resumed_from == []
    history = _history(result)
    assert [h["step"] for h in history] == list(range(1, result.steps + 1))
    losses = np.array([h["loss"] for h in history]).reshape(EPOCHS, steps_per_epoch)
    assert losses[-1].mean() < losses[0].mean() - 0.01, losses  # the same rows, seen again, cost less
    for epoch in range(EPOCHS):  # every row exactly once per epoch
        ids = [i for h in history[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch] for i in h["ids"]]
        assert len(ids) == len(set(ids)) == ROWS
    first = history[0]
    assert all(math.isfinite(first[k]) for k in ("loss", "grad_norm", "tokens_per_s"))
    if M.method(method).objective == "dpo":
        # LoRA starts at the base (B = 0) and the base is the reference: f = log σ(0) for every pair.
        if "sft_weight" in METHOD_OVERRIDES.get(method, {}):
            assert (
                first["loss"] > math.log(2) + 0.05
            )  # plus 0.1 x NLL of the chosen responses (~5 nats/token)
        else:
            assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert {"loss/known", "loss/mixed", "loss/unknown", "refusal>incorrect/margin"} <= first.keys()
    else:
        assert {"loss/answer", "loss/refusal"} <= first.keys()
    # Reloaded from disk (merged HF checkpoint), the model gives the log-probs the trained policy gave.
    assert result.adapter_dir and (Path(result.adapter_dir) / "adapter_config.json").exists()
    reloaded = _probe_from_saved_model(
        result.checkpoint_dir, _table_for(method, run_dir, pairs_with_ref), result.probe["ids"]
    )
    np.testing.assert_allclose(reloaded, _probe(result), atol=1e-4, rtol=0)


def test_ddp_two_workers_resume_after_a_worker_failure(
    local_runs: dict, run_dir: Path, pairs_with_ref: str, tiny_config: Config, tiny_checkpoint: Path
) -> None:
    """A worker raises after step 6; Ray Train restarts the group from the step-4 checkpoint; the run ends
    at the same step count, with the same rows per step and (up to float rounding) the same model as an
    uninterrupted single-process run."""
    local = _local("cadpo", local_runs, run_dir, pairs_with_ref, tiny_config, tiny_checkpoint)
    cfg = _cfg(tiny_config, num_workers=2, cpus_per_worker=0.5, max_failures=1)
    layout = _run_beside(run_dir, "ddp", tiny_checkpoint)
    out = Path(layout.model("cadpo"))
    result = run_training(cfg, "cadpo", layout, fail_after_step=6)
    assert list(out.glob("ray/*/fault_injected")), "the injected failure did not fire"
    assert result.resumed_from == [4]
    assert result.steps == local.steps
    ddp, ref = _history(result), _history(local)
    assert [h["step"] for h in ddp] == [h["step"] for h in ref]
    assert [h["ids"] for h in ddp] == [h["ids"] for h in ref]  # nothing skipped, nothing repeated
    np.testing.assert_allclose([h["loss"] for h in ddp], [h["loss"] for h in ref], atol=1e-5)
    np.testing.assert_allclose(_probe(result), _probe(local), atol=1e-4)
    assert len(list(out.glob("ray/*/checkpoint_[0-9]*"))) == cfg.train.num_to_keep
    # the adapter reloads onto the base model with the same outputs as the merged checkpoint
    from peft import PeftModel

    base = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, result.adapter_dir).merge_and_unload()
    merged = LlavaForConditionalGeneration.from_pretrained(result.checkpoint_dir, dtype=torch.float32)
    for name, p in merged.state_dict().items():
        assert torch.allclose(peft_model.state_dict()[name], p, atol=1e-6), name


def test_fsdp_two_workers_on_cpu_matches_local(
    local_runs: dict, run_dir: Path, pairs_with_ref: str, tiny_config: Config, tiny_checkpoint: Path
) -> None:
    local = _local("idk_it", local_runs, run_dir, pairs_with_ref, tiny_config, tiny_checkpoint)
    cfg = _cfg(tiny_config, num_workers=2, cpus_per_worker=0.5, strategy="fsdp", grad_accum=2)
    result = run_training(cfg, "idk_it", _run_beside(run_dir, "fsdp", tiny_checkpoint))
    assert result.steps == local.steps
    # 2 workers x 2 accumulation steps x 2 rows = the local 8-row step: same loss curve
    np.testing.assert_allclose(
        [h["loss"] for h in _history(result)], [h["loss"] for h in _history(local)], atol=1e-5
    )
    np.testing.assert_allclose(_probe(result), _probe(local), atol=1e-4)


def test_train_job_entry_point(ray_local, tmp_path: Path, run_dir: Path, tiny_checkpoint: Path) -> None:
    """`python -m jobs.train` wiring: reads tables/ and models/base, computes missing reference log-probs."""
    from jobs.train import main

    job_dir = tmp_path / "run"
    shutil.copytree(run_dir / "tables", job_dir / "tables", ignore=shutil.ignore_patterns("cadpo_pairs_ref"))
    shutil.copytree(tiny_checkpoint, job_dir / "models" / "base")
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    overrides = [
        "train.method=dpo2",
        "train.batch_size=16",
        "train.max_steps=2",
        "train.merge=false",
        "train.lora=true",
        "train.dpo_init=base",  # this run has no models/idk_it
        # The job's wiring, in local mode: Ray Train workers train LoRA to an adapter in the S3 pipeline
        # test, full fine-tuning in test_tiny_default_trains_through_ray_train_workers (each ~20 s to start).
        "train.num_workers=0",
    ]
    # The job runs only its own stages: vouch for the upstream ones (base model, tables) as a run would.
    from inbol_ray import manifest
    from inbol_ray.config import load_config
    from inbol_ray.pipeline import stage_hashes, stages

    cfg = load_config(config, overrides)
    cfg.run_dir = str(job_dir)
    hashes = stage_hashes(cfg, stages(cfg))
    layout = RunLayout.of(cfg)
    by_name = {s.name: s for s in stages(cfg)}
    for stage in ("base_model", "construct"):  # made from inputs this run never had (tokens None)
        inputs = {name: manifest.token(layout.manifest(name)) for name in by_name[stage].inputs}
        manifest.write_manifest(layout.manifest(stage), stage, hashes[stage], {}, inputs=inputs)
    rc = main(["--config", str(config), "--run-dir", str(job_dir), "method=dpo2", *overrides[1:]])
    assert rc == 0
    assert (job_dir / "tables" / "cadpo_pairs_ref").exists()
    published = Path(follow_export(str(job_dir / "models" / "dpo2")))
    assert (published / "adapter" / "adapter_config.json").exists()
    assert not (published / "config.json").exists()  # merge=false: adapter only
    assert len((job_dir / "models" / "dpo2" / "metrics.jsonl").read_text().splitlines()) == 2


def _assert_outputs(out: Path, result: TrainResult, steps: int) -> Path:
    """Checks a method's folder; returns its published export (`checkpoint.publish_export`)."""
    published = Path(follow_export(str(out)))
    assert published.parent == out and published.name.startswith("export-")
    assert (published / "config.json").exists() and (published / "model.safetensors").exists()
    assert (published / "preprocessor_config.json").exists() or (published / "processor_config.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == steps == result.steps
    assert json.loads((out / "train_result.json").read_text())["steps"] == steps
    return published


def test_tiny_default_trains_through_ray_train_workers(
    ray_local, tmp_path: Path, monkeypatch, run_dir: Path, tiny_config: Config, tiny_checkpoint: Path
) -> None:
    """The embedded default's path: TorchTrainer with a real (gloo) worker, full fine-tuning as tiny.yaml
    sets it, on a run directory given as a `file://` URI. Everything lands in that directory; nothing in
    the working directory (a `Path("file:///x")` would have made a relative `file:` folder)."""
    root = tmp_path / "run"
    _copy_run(run_dir, root, ("idk_it",))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    train = dataclasses.replace(tiny_config.train, num_workers=1, cpus_per_worker=1.0, max_steps=2)
    cfg = dataclasses.replace(tiny_config, train=train)
    layout = _layout(f"file://{root}", tiny_checkpoint)
    result = run_training(cfg, "idk_it", layout)
    out = root / "models" / "idk_it"
    published = _assert_outputs(out, result, 2)
    assert result.checkpoint_dir == f"file://{published}" and result.adapter_dir is None  # full fine-tuning
    assert len(list(out.glob("ray/idk_it-*/checkpoint_[0-9]*"))) == 1
    assert list(cwd.iterdir()) == []
    from safetensors.torch import load_file

    saved = load_file(str(published / "model.safetensors"))  # llava-hf layout, as vLLM loads it
    assert any("vision_tower.vision_model." in k for k in saved)
    assert not any(k.startswith("vision_tower.embeddings") for k in saved)
    LlavaForConditionalGeneration.from_pretrained(published, dtype=torch.float32)


def test_run_dir_on_a_non_local_filesystem(
    ray_local, tmp_path: Path, monkeypatch, run_dir: Path, tiny_config: Config, tiny_checkpoint: Path
) -> None:
    """A run on object storage: `store://` resolves to a pyarrow filesystem that is not `LocalFileSystem`
    (a SubTree over a local folder standing in for S3). Local mode runs in the driver, so the patched
    resolver is seen everywhere: the start model is fetched, Ray Train gets the filesystem, the model is
    exported locally and uploaded, and nothing is written to a relative folder named after the scheme."""
    store = tmp_path / "store"
    _copy_run(run_dir, store / "run", ("idk_it",))
    shutil.copytree(tiny_checkpoint, store / "base")
    real_resolve = dio.resolve

    def resolve(location: str):
        if location.startswith("store://"):
            return pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem()), location[len("store://") :]
        return real_resolve(location)

    monkeypatch.setattr(dio, "resolve", resolve)
    monkeypatch.setenv("INBOL_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = _cfg(tiny_config, max_steps=2, lora=True, merge=True)
    layout = RunLayout(root="store://run", model_path="store://base", dpo_init="base")
    result = run_training(cfg, "idk_it", layout)
    out = store / "run" / "models" / "idk_it"
    published = _assert_outputs(out, result, 2)
    assert (published / "adapter" / "adapter_config.json").exists()
    assert result.checkpoint_dir == f"store://run/models/idk_it/{published.name}"
    assert result.adapter_dir == f"store://run/models/idk_it/{published.name}/adapter"
    assert list(cwd.iterdir()) == []
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("store:")]


def test_reference_pass_streams_row_groups(
    pairs_with_ref: str, run_dir: Path, tiny_config: Config, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A pairs table of many row groups: each comes back as its own output file, in input order, with the
    values the one-block pass gave (the driver never holds the table)."""
    import pyarrow.parquet as pq

    other = tmp_path / "run"
    pairs = dio.read_table(str(run_dir / "tables" / "cadpo_pairs"))
    (other / "tables" / "cadpo_pairs").mkdir(parents=True)
    pq.write_table(pairs, other / "tables" / "cadpo_pairs" / "part-0.parquet", row_group_size=5)
    layout = _layout(other, tiny_checkpoint)
    counts = run_reference_pass(_cfg(tiny_config), layout)
    assert counts["rows"] == pairs.num_rows
    out = Path(layout.reference_table())
    parts = sorted(p.name for p in out.iterdir())
    assert parts == [f"part-{b:06d}.parquet" for b in range(-(-pairs.num_rows // 5))]  # no hidden leftovers
    got = dio.read_table(str(out))
    assert got[S.ID].to_pylist() == pairs[S.ID].to_pylist()  # input order
    want = dio.read_table(pairs_with_ref)
    want = want.take(pa.array([want[S.ID].to_pylist().index(i) for i in got[S.ID].to_pylist()]))
    for kind in DPO_KINDS:
        a = np.array(got[S.REF_LOGP[kind]].to_pylist(), dtype=float)
        b = np.array(want[S.REF_LOGP[kind]].to_pylist(), dtype=float)
        np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)
