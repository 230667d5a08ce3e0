"""Cluster configs: the autoscaler YAML against the schema shipped inside `ray`, KubeRay manifests' fields."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_autoscaler_config_matches_rays_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert len(gpu_types) >= 2, "separate GPU worker types for sampling and training"


def test_autoscaler_schema_rejects_a_broken_config() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_rayjob_manifest() -> None:
    job = _manifest("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.pipeline --config configs/")
    config_path = spec["entrypoint"].split("--config ")[1].split()[0]
    assert (CLUSTER.parent / config_path).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    assert any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for w in workers
        for c in w["template"]["spec"]["containers"]
    )


def test_rayservice_manifest_points_at_the_serve_app() -> None:
    svc = _manifest("rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    module, attr = app["import_path"].split(":")
    assert (CLUSTER.parent / (module.replace(".", "/") + ".py")).is_file()
    deployment = app["deployments"][0]
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(
        deployment["autoscaling_config"]
    )
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_runtime_env_is_loadable_by_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
