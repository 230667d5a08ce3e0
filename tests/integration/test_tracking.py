"""Experiment tracking against the real trackers: an MLflow tracking server on loopback (SQLite store) and
W&B in offline mode, read back from what they stored.

- The session's smoke pipeline (tests/conftest.py `smoke_pipeline`, the ablation layer: 13 stages, six
  trainings) reports to the session's MLflow server; read back with `MlflowClient`: the parent run, a child
  per stage and per training, the per-step training metrics with the DPO reward metrics, the evaluation
  metrics, report.md and the run's files as artifacts. No second pipeline is run for this.
- W&B offline: one short CA-DPO training in local mode with the tracking module around it; the run folders'
  transaction logs (`run-<id>.wandb`) hold the same keys.
- The tracker dies mid-run (the test's own server, stopped after the first stage): the pipeline finishes,
  with exactly one warning, and its files are complete.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
from train_helpers import ROWS, _cfg, _layout, _samples

from inbol_ray import schema as S
from inbol_ray.boundary.construct import build_cadpo_pairs
from inbol_ray.config import Config, ShapesConfig, TrackingConfig, load_config
from inbol_ray.data import io as dio
from inbol_ray.data.shapes import generate_items
from inbol_ray.pipeline import run_pipeline, stage_hashes, stages
from inbol_ray.run_layout import RunLayout
from inbol_ray.tracking import TrackingWarning, open_tracking
from inbol_ray.tracking.params import step_metrics
from inbol_ray.train.trainer import run_training

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ["sft", "idk_it", "dpo1", "dpo2", "dpo3", "cadpo"]
TRL_KEYS = {"loss", "lr", "grad_norm", "tokens_per_s", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected"}  # fmt: skip
PAIR_STATS = ("margin", "accuracy", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
PAIRS = {"correct>refusal": "correct_vs_refusal", "refusal>incorrect": "refusal_vs_incorrect",
         "correct>incorrect": "correct_vs_incorrect"}  # fmt: skip
DPO_KEYS = TRL_KEYS | {f"{pair}/{stat}" for pair in PAIRS.values() for stat in PAIR_STATS}
"""What a DPO-family training reports per step: TRL's DPO names, and the same per pair type."""


def _runs(client, experiment_id: str, where: str) -> list:
    return client.search_runs([experiment_id], filter_string=where, max_results=1000)


def test_smoke_pipeline_reads_back_from_mlflow(smoke_pipeline, mlflow_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    run_dir, smoke, out = smoke_pipeline
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("inbol-ray")
    root = dio.absolute(str(run_dir))
    (parent,) = _runs(
        client,
        experiment.experiment_id,
        f"tags.`inbol.run_dir` = '{root}' and tags.`inbol.kind` = 'pipeline'",
    )
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_dir.name
    assert f"tracking: mlflow run '{run_dir.name}' -> {mlflow_server.uri}/#/experiments/" in out

    # parameters: the layered config, each stage's hash, versions, the commit (the manifests may hold other
    # hashes by now: test_pipeline.py reruns evaluate and report in this directory with another setting)
    params = parent.data.params
    cfg = load_config([ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "ablation.yaml"], smoke)
    assert params["train.max_steps"] == "2" and json.loads(params["eval.methods"]) == cfg.eval.methods
    assert params["tracking.backend"] == "mlflow" and params["version.torch"]
    names = [s.name for s in stages(cfg)]
    assert {name: params[f"stage_hash.{name}"] for name in names} == stage_hashes(cfg, stages(cfg))
    assert "git.commit" not in params or len(params["git.commit"]) == 40

    # a child per stage, each ran and finished; a child per training
    children = _runs(client, experiment.experiment_id, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stage_runs = {r.info.run_name: r for r in children if r.data.tags["inbol.kind"] == "stage"}
    method_runs = {r.info.run_name: r for r in children if r.data.tags["inbol.kind"] == "method"}
    assert sorted(stage_runs) == sorted(names) and sorted(method_runs) == sorted(TRAINED)
    assert {r.info.status for r in children} == {"FINISHED"}
    assert stage_runs["sample"].data.metrics["counts.items"] == 64
    assert stage_runs["train_cadpo"].data.metrics["seconds"] > 0

    # every step of every training, from the loop's rank 0; the DPO family with TRL's reward metrics
    for method, run in method_runs.items():
        assert run.data.params["train.method"] == method
        local = [
            json.loads(line)
            for line in (run_dir / "models" / method / "metrics.jsonl").read_text().splitlines()
        ]
        logged = set(run.data.metrics)
        assert logged == set().union(*(step_metrics(row) for row in local)), method
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(r["step"], r["loss"]) for r in local], method
        if method in ("dpo1", "dpo2", "dpo3", "cadpo"):  # TRL's names, and per pair type where it had rows
            trained = [
                name for pair, name in PAIRS.items() if any(r[f"{pair}/margin"] is not None for r in local)
            ]
            assert trained and logged >= TRL_KEYS | {f"{p}/{stat}" for p in trained for stat in PAIR_STATS}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"metrics.jsonl", "train_result.json"}, method
    cadpo = method_runs["cadpo"].info.run_id
    got = Path(client.download_artifacts(cadpo, "metrics.jsonl", str(tmp_path)))
    assert got.read_bytes() == (run_dir / "models" / "cadpo" / "metrics.jsonl").read_bytes()

    # evaluation: Acc, RefR, s_trust per method and set, as metrics.parquet holds them
    table = dio.read_table(str(run_dir / "metrics.parquet")).to_pylist()
    for row in table:
        for measure in ("acc", "refr", "s_trust"):
            key = f"eval/{row['method']}/{row['dataset']}/{measure}"
            assert parent.data.metrics[key] == pytest.approx(row[measure]), key

    # the report, its figures and every stage's manifest as artifacts
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "figures", "manifests"} <= top
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures and figures == {f"figures/{p.name}" for p in (run_dir / "figures").glob("*.png")}
    manifests = {a.path for a in client.list_artifacts(parent.info.run_id, "manifests")}
    assert manifests == {f"manifests/{name}.json" for name in names}
    report = Path(client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))).read_text()
    assert all(f"| {m} " in report for m in ["base", *TRAINED])


# --- W&B offline ----------------------------------------------------------------------------------------

BLOCK = 32768
"""W&B's transaction log is LevelDB's log format: 32 KiB blocks of records with a 7-byte header."""


def _wandb_records(path: Path):
    """The protobuf records of an offline run's `run-<id>.wandb` (what `wandb sync` uploads)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    """Key -> value of a record's items; W&B writes a key as `key` or as a one-part `nested_key`."""
    return {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _wandb_run(folder: Path) -> dict:
    """One offline run folder as {name, job_type, group, config, history (per step), summary, files}."""
    (log,) = folder.glob("run-*.wandb")
    run = {"config": {}, "history": {}, "summary": {}, "files": set()}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, job_type=record.run.job_type, group=record.run.run_group)
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            items = _items(record.history.item)
            run["history"][items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "artifact":
            run["files"] |= {m.path for m in record.artifact.manifest.contents}
    return run


@pytest.fixture()
def dpo_run(tmp_path: Path, ray_local, tiny_config: Config, tiny_checkpoint: Path) -> RunLayout:
    """A CA-DPO table from ShapesWorld items and synthetic graded samples (train_helpers.py), anchored to
    the tiny checkpoint, with made-up reference log-probs: what is checked is where the metrics go, not
    their values, and a real reference pass would cost a Ray Data job. Training it is seconds."""
    shapes = ShapesConfig(
        seed=5, n_pretrain=0, n_train=48, n_val=0, n_id_test=0, n_ood_test=0, n_unanswerable_test=0
    )
    items = generate_items(shapes, tiny_config.model.image_size)
    joined = _samples(items.filter(pa.compute.equal(items[S.SPLIT], "train")), seed=5)
    pairs = pa.Table.from_pandas(build_cadpo_pairs(joined, tiny_config.construct).table, preserve_index=False)
    pairs = S.conform(pairs, S.CADPO_PAIRS, "cadpo_pairs").slice(0, ROWS)
    for kind, column in S.REF_LOGP.items():
        pairs = pairs.append_column(
            column, pa.array([None if r is None else -2.0 for r in pairs[kind].to_pylist()], pa.float64())
        )
    layout = _layout(tmp_path / "run", tiny_checkpoint)
    dio.write_table(S.conform(pairs, S.CADPO_PAIRS_WITH_REF, "cadpo_pairs"), layout.training_table("cadpo"))
    return layout


def test_wandb_offline_run_folders_hold_the_same_keys(
    dpo_run: RunLayout, tiny_config: Config, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _cfg(tiny_config, max_steps=3)
    cfg = dataclasses.replace(
        cfg, tracking=TrackingConfig(backend="wandb", run_name="offline", tags=["team=vision"])
    )
    layout = dpo_run
    tracking = open_tracking(cfg, layout, {"train_cadpo": "h-train"}, log=lambda _: None)
    with tracking.stage("train_cadpo", "h-train") as stage:
        result = run_training(cfg, "cadpo", layout, tracking=tracking, log=lambda _: None)
        stage.done({"steps": result.steps})
    # what evaluate and report leave behind, for the end of the run
    dio.write_table(
        pa.table(
            {
                "method": ["cadpo"],
                "dataset": ["shapes_val"],
                "n": [16],
                "acc": [0.5],
                "refr": [0.25],
                "s_trust": [0.25],
            }
        ),
        layout.metrics,
    )
    dio.write_bytes(layout.report, b"# report\n")
    tracking.close({"train_cadpo": {}, "evaluate": {}, "report": {}}, ok=True)

    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    runs = {(r["job_type"], r["name"]): r for r in map(_wandb_run, folders)}
    assert set(runs) == {("pipeline", "offline"), ("stage", "train_cadpo"), ("method", "cadpo")}
    assert len({r["group"] for r in runs.values()}) == 1  # W&B's grouping stands for the parent

    parent = runs["pipeline", "offline"]
    assert (
        parent["config"]["train.max_steps"] == 3 and parent["config"]["stage_hash.train_cadpo"] == "h-train"
    )
    assert "version.torch" in parent["config"]
    assert parent["summary"]["eval/cadpo/shapes_val/refr"] == 0.25
    assert parent["files"] == {"report.md"}

    method = runs["method", "cadpo"]
    assert method["config"]["train.method"] == "cadpo"
    local = [
        json.loads(line)
        for line in dio.read_bytes(dio.join(layout.model("cadpo"), "metrics.jsonl")).decode().splitlines()
    ]
    assert sorted(method["history"]) == [1, 2, 3]
    for row in local:  # each step's keys and values, as MLflow gets them (the same `step_metrics`)
        assert method["history"][row["step"]] == pytest.approx(step_metrics(row)), row["step"]
    assert set(method["history"][1]) >= DPO_KEYS
    stage = runs["stage", "train_cadpo"]
    assert stage["summary"]["counts.steps"] == 3 and stage["summary"]["seconds"] > 0
    assert stage["files"] == {"metrics.jsonl", "train_result.json"}  # W&B's training run is rank 0's


# --- the tracker down mid-run -----------------------------------------------------------------------------


def test_tracker_down_mid_run_warns_once_and_the_run_finishes(
    ray_local, own_mlflow_server, tmp_path: Path
) -> None:
    overrides = [
        "data.shapes.n_pretrain=16", "data.shapes.n_train=8", "data.shapes.n_val=8", "data.shapes.n_id_test=8",
        "data.shapes.n_ood_test=8", "data.shapes.n_unanswerable_test=8", "base_train.steps=2",
        "tracking.backend=mlflow", f"tracking.uri={own_mlflow_server.uri}",
    ]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    layout = RunLayout.of(cfg, str(tmp_path / "run"))
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "prepare: done" in line:
            own_mlflow_server.stop()  # the tracker dies after the first stage

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_pipeline(cfg, layout, until="base_model", log=log)
    tracking = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 1, [str(w.message) for w in tracking]
    assert "base_model" in str(tracking[0].message) and own_mlflow_server.uri in str(tracking[0].message)
    assert any(line.startswith("tracking: mlflow run") for line in lines)
    assert list(results) == ["prepare", "base_model"]
    for name in results:  # the run's own record is whole
        assert json.loads(dio.read_bytes(layout.manifest(name)))["stage"] == name
