"""Cluster files run the shipped configs: the resources they offer cover what the code requests.

Checked for every file under cluster/:
- the Ray autoscaler YAML against the schema shipped inside `ray`; the KubeRay manifests against the ray.io/v1
  CRD schemas of RayJob and RayService (tests/fixtures/kuberay, tools/kuberay_schemas.py), unknown fields
  rejected as the API server would prune them; the RayService's Serve config against Ray Serve's schema;
- each stage's demand, computed by the functions the code itself reserves resources with
  (`generation.stage.actor_options`, `train.trainer.worker_resources`), fits the node types or worker groups
  that offer its GPU type, at their maximum size: sampling and evaluation (`sampling.num_actors` actors),
  training and the reference pass (`train.num_workers` workers), Serve (`serve.max_replicas` replicas);
- autoscaling is on; Serve gets the config files and a method whose checkpoint the run layout names;
- the install pins torch, ray, transformers and vllm as pyproject.toml does; storage and GPU types are named
  in configs/cluster.yaml only;
- who may reach the clusters: Ray token authentication on in both manifests; the dashboard listens where the
  KubeRay operator reaches it and is fenced by cluster/networkpolicy.yaml, whose policies are evaluated here
  as Kubernetes does (which sources reach which ports of the head and workers); the endpoint's key from a
  Secret in every container that can host a Serve replica.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shlex
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from inbol_ray import methods as M
from inbol_ray.config import Config, load_config
from inbol_ray.generation.stage import actor_options
from inbol_ray.train.trainer import worker_resources

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = ROOT / "tests" / "fixtures" / "kuberay"
IMAGE_ROOT = "/home/ray/inbol-ray"
"""Where cluster/Dockerfile puts the repository inside the image (its WORKDIR)."""
PINNED = ("torch", "ray", "transformers", "vllm")


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT + "/"), f"{image_path} is not inside the image's {IMAGE_ROOT}"
    return ROOT / image_path.removeprefix(IMAGE_ROOT + "/")


# --- what the code requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    stage: str
    count: int
    bundle: dict[str, float]


def _bundle(cpus: float, gpus: float, accelerator: str) -> dict[str, float]:
    bundle = {"CPU": cpus, "GPU": gpus}
    if accelerator:
        bundle[f"accelerator_type:{accelerator}"] = 0.001  # what Ray adds for an accelerator_type option
    return {k: v for k, v in bundle.items() if v}


def demands(cfg: Config) -> list[Demand]:
    gen = actor_options(cfg.sampling)
    generating = _bundle(gen["num_cpus"], gen.get("num_gpus", 0), gen.get("accelerator_type", ""))
    worker = worker_resources(cfg.train)
    training = _bundle(worker["CPU"], worker.get("GPU", 0), cfg.train.accelerator_type)
    return [
        Demand("sampling/evaluation", cfg.sampling.num_actors, generating),
        Demand("training/reference", cfg.train.num_workers, training),
    ]


def serve_demand(cfg: Config) -> Demand:
    gen = actor_options(cfg.sampling)
    return Demand(
        "serve",
        cfg.serve.max_replicas,
        _bundle(gen["num_cpus"], gen.get("num_gpus", 0), gen.get("accelerator_type", "")),
    )


# --- what a cluster offers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    name: str
    max_nodes: int
    resources: dict[str, float]


def capacity(demand: Demand, groups: list[Group]) -> int:
    """How many of `demand`'s bundles the groups hold at their maximum size (bundles do not span nodes)."""
    total = 0
    for g in groups:
        per_node = min(
            (math.floor(g.resources.get(k, 0.0) / v + 1e-9) for k, v in demand.bundle.items()), default=0
        )
        total += per_node * g.max_nodes
    return total


def autoscaler_groups(config: dict) -> list[Group]:
    cap = config["max_workers"]
    return [
        Group(name, min(t.get("max_workers", cap), cap), {k: float(v) for k, v in t["resources"].items()})
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
    ]


def _quantity(text: str) -> float:
    return float(text)  # CPU and GPU limits here are whole numbers ("8"); millicores would need more


def kuberay_groups(cluster_spec: dict) -> list[Group]:
    groups = []
    for wg in cluster_spec["workerGroupSpecs"]:
        params = wg.get("rayStartParams", {})
        (container,) = [c for c in wg["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        limits = container["resources"]["limits"]
        resources = {
            "CPU": float(params.get("num-cpus", _quantity(limits["cpu"]))),
            "GPU": float(params.get("num-gpus", _quantity(limits.get("nvidia.com/gpu", "0")))),
        }
        if "resources" in params:  # KubeRay's quirk: a JSON object inside a quoted string
            resources.update(json.loads(json.loads(params["resources"])))
        groups.append(Group(wg["groupName"], wg["maxReplicas"], resources))
    return groups


def _check_offers(demand: Demand, groups: list[Group], where: str) -> None:
    have = capacity(demand, groups)
    assert have >= demand.count, (
        f"{where}: {demand.stage} requests {demand.count} x {demand.bundle}, the cluster holds {have} at most "
        f"({[(g.name, g.max_nodes, g.resources) for g in groups]})"
    )
    fitting = [g.name for g in groups if capacity(Demand(demand.stage, 1, demand.bundle), [g])]
    accel = [k for k in demand.bundle if k.startswith("accelerator_type:")]
    assert accel, f"{demand.stage}: no accelerator_type, nothing steers it to its node type"
    assert len(fitting) == 1, f"{where}: {demand.stage} fits {fitting}: the GPU type must pick one group"


# --- the shipped configs, layered as the cluster files layer them -----------------------------------------

CLUSTER_LAYER = ROOT / "configs" / "cluster.yaml"


@pytest.fixture(scope="module", params=["llava-1.5-7b.yaml", "llava-1.5-13b.yaml"])
def shipped(request) -> Config:
    return load_config([ROOT / "configs" / request.param, CLUSTER_LAYER])


def test_capacity_check_catches_a_short_cluster() -> None:
    """The check itself: the old KubeRay file (2 one-GPU pods for 8 DDP workers) must fail it."""
    short = [Group("gpu", 2, {"CPU": 16, "GPU": 1, "accelerator_type:H100": 1})]
    demand = Demand("training", 8, {"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001})
    with pytest.raises(AssertionError, match="holds 2 at most"):
        _check_offers(demand, short, "short")
    wrong_type = [Group("gpu", 8, {"CPU": 16, "GPU": 8, "accelerator_type:L40S": 1})]
    assert capacity(demand, wrong_type) == 0


# --- Ray autoscaler ---------------------------------------------------------------------------------------


def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_autoscaler_config_matches_rays_schema() -> None:
    config = _yaml("gpu-cluster.yaml")
    jsonschema.validate(config, _ray_schema())
    broken = dict(config)
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


def test_autoscaler_node_types_offer_what_the_configs_request(shipped: Config) -> None:
    config = _yaml("gpu-cluster.yaml")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    groups = autoscaler_groups(config)
    assert all(config["available_node_types"][g.name].get("min_workers", 0) == 0 for g in groups)
    for demand in demands(shipped):
        _check_offers(demand, groups, "gpu-cluster.yaml")
    _check_offers(serve_demand(shipped), groups, "gpu-cluster.yaml")


# --- KubeRay ------------------------------------------------------------------------------------------------


def _crd_schema(kind: str) -> dict:
    return json.loads(gzip.decompress((KUBERAY / f"{kind}.v1.schema.json.gz").read_bytes()))


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the CRD's structural schema does not declare (the API server would silently drop them)."""
    if isinstance(value, list):
        items = schema.get("items", {})
        return [f for i, v in enumerate(value) for f in unknown_fields(v, items, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props = schema.get("properties")
    if props is None:
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return [f for k, v in value.items() for f in unknown_fields(v, extra, f"{path}.{k}")]
        return []
    found = []
    for key, v in value.items():
        if key in props:
            found += unknown_fields(v, props[key], f"{path}.{key}")
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            found.append(f"{path}.{key}")
    return found


@pytest.mark.parametrize(("name", "kind"), [("rayjob.yaml", "rayjobs"), ("rayservice.yaml", "rayservices")])
def test_kuberay_manifests_match_the_crd_schema(name: str, kind: str) -> None:
    manifest = _yaml(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    schema = _crd_schema(kind)
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []
    typo = json.loads(json.dumps(manifest))
    cluster = typo["spec"].get("rayClusterSpec") or typo["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscalling"] = True
    assert unknown_fields(typo, schema) == [
        f".spec.{'rayClusterSpec' if kind == 'rayjobs' else 'rayClusterConfig'}.enableInTreeAutoscalling"
    ]


def _check_kuberay_cluster(cluster: dict) -> list[Group]:
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    images = {
        c["image"]
        for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for c in spec["template"]["spec"]["containers"]
    }
    assert len(images) == 1, f"one image (cluster/Dockerfile) everywhere, got {images}"
    return kuberay_groups(cluster)


def test_rayjob_runs_the_shipped_config_with_room_for_every_stage() -> None:
    job = _yaml("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    configs = [_repo_path(argv[i + 1]) for i, token in enumerate(argv) if token == "--config"]
    assert all(c.is_file() for c in configs), configs
    assert configs[-1] == CLUSTER_LAYER, "the cluster layer last: its storage and GPU types win"
    cfg = load_config(configs)
    groups = _check_kuberay_cluster(job["spec"]["rayClusterSpec"])
    assert all(
        wg["minReplicas"] == 0 and wg["replicas"] == 0
        for wg in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    ), "an ephemeral job cluster starts its GPU groups empty; the autoscaler adds pods"
    for demand in demands(cfg):
        _check_offers(demand, groups, "rayjob.yaml")


def test_rayservice_serves_a_run_of_the_shipped_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.llm_app import BUILD_ARGS, default_models

    svc = _yaml("rayservice.yaml")
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve.llm_app:build_llm_app"
    args = app["args"]
    assert set(args) <= set(BUILD_ARGS)
    configs = [_repo_path(c) for c in args["config"]]
    assert configs[-1] == CLUSTER_LAYER and all(c.is_file() for c in configs)
    cfg = load_config(configs)
    models = args.get("models") or default_models(cfg)
    assert "cadpo" in models and all(m == "base" or M.method(m).trained for m in models)
    # LoRA: one deployment of the base holds every adapter; full fine-tuning: one deployment per model.
    deployments = ["base"] if cfg.train.lora else list(models)
    names = {"OpenAiIngress", *(f"RunLLMServer:{d}" for d in deployments)}
    for deployment in app.get("deployments", []):
        assert deployment["name"] in names
    groups = _check_kuberay_cluster(svc["spec"]["rayClusterConfig"])
    demand = serve_demand(cfg)
    _check_offers(replace(demand, count=demand.count * len(deployments)), groups, "rayservice.yaml")
    assert min(wg["minReplicas"] for wg in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]) >= 1, (
        "a service keeps one model replica's pod up"
    )


# --- install pins and the one place storage is named ------------------------------------------------------


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["vllm"]]
    pins = {}
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?(.*)$", req)
        name = m.group(1).lower()
        if name in PINNED:
            pins[name] = m.group(3).replace(" ", "")
    assert set(pins) == set(PINNED), pins
    return pins


def _pip_installs(commands: list[str]) -> list[list[str]]:
    out = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            argv = shlex.split(part.replace("\\\n", " "))
            if argv[:2] == ["pip", "install"]:
                out.append(argv[2:])
    return out


def _check_installs(installs: list[list[str]], where: str) -> None:
    pins = _pyproject_pins()
    named = {}
    project_extras = []
    for argv in installs:
        for token in argv:
            if token.startswith((".", "$HOME", "/", "~")):  # the project itself, maybe with extras
                project_extras.append(token.rsplit("[", 1)[1] if token.endswith("]") else "")
                continue
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?(.*)$", token)
            if token.startswith("-") or m is None or "://" in token:
                continue
            if m.group(1).lower() in PINNED:
                named[m.group(1).lower()] = m.group(3)
    for name, spec in named.items():
        assert spec == pins[name], f"{where}: installs {name}{spec}, pyproject.toml pins {name}{pins[name]}"
    assert any("vllm" in extras for extras in project_extras), (
        f"{where}: install the project with its vllm extra, so vllm's pin comes from pyproject.toml"
    )


def test_installs_pin_what_pyproject_pins() -> None:
    _check_installs(_pip_installs(_yaml("gpu-cluster.yaml")["setup_commands"]), "gpu-cluster.yaml")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    runs = [
        line.split("RUN ", 1)[1]
        for line in dockerfile.replace("\\\n", " ").splitlines()
        if line.startswith("RUN ")
    ]
    _check_installs(_pip_installs(runs), "Dockerfile")
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-", dockerfile, re.M)
    assert base and base.group(1) == ray.__version__
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    with pytest.raises(AssertionError, match="pyproject.toml pins vllm"):
        _check_installs([["vllm"], ["-e", ".[vllm]"]], "unpinned")


def test_storage_and_gpu_types_are_named_in_the_cluster_layer_only() -> None:
    layer = load_config([ROOT / "configs" / "llava-1.5-7b.yaml", CLUSTER_LAYER])
    bucket = layer.run_dir.split("://", 1)[1].split("/", 1)[0]
    assert layer.run_dir.startswith(("s3://", "gs://", "/")), layer.run_dir
    for path in CLUSTER.iterdir():
        text = path.read_text()
        assert "s3://" not in text and bucket not in text, (
            f"{path.name} names storage: keep it in configs/cluster.yaml"
        )
    assert layer.sampling.accelerator_type and layer.train.accelerator_type


def test_runtime_env_is_loadable_by_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _yaml("runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_no_file_forces_the_hub_offline() -> None:
    """A model or data set may be a Hub id (inbol_ray/hub.py): offline mode is the user's choice, set in
    their own environment, never by a file we ship."""
    shipped = [*sorted((ROOT / "cluster").glob("*.yaml")), ROOT / "serve" / "serve_config.yaml"]
    forced = [
        p.name for p in shipped if re.search(r"(HF_HUB|TRANSFORMERS|HF_DATASETS)_OFFLINE", p.read_text())
    ]
    assert forced == []


# --- who may reach the clusters ---------------------------------------------------------------------------

CLUSTER_SPECS = {"rayjob.yaml": "rayClusterSpec", "rayservice.yaml": "rayClusterConfig"}
TOKEN_AUTH_RAY = (2, 52, 0)
"""The first Ray with token authentication (RAY_AUTH_MODE=token)."""
TOKEN_AUTH_KUBERAY = "1.5.1"
"""The first KubeRay whose CRDs have `authOptions` (RayCluster, RayJob, RayService); an older operator's CRD
prunes the field without an error, and the cluster starts with no authentication."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
APP_NS = "inbol"
"""The namespace the manifests are applied in (they name none; any name does here)."""
OPERATOR_LABELS = {
    "app.kubernetes.io/name": "kuberay-operator",  # Helm chart; the kustomize manifests say `kuberay`
    "app.kubernetes.io/component": "kuberay-operator",
}
HEAD_PORTS = {"GCS": 6379, "dashboard": 8265, "Ray Client": 10001, "Serve": 8000}


def _cluster_spec(name: str) -> dict:
    return _yaml(name)["spec"][CLUSTER_SPECS[name]]


# NetworkPolicy evaluation, as the networking.k8s.io/v1 API defines it: a pod selected by any Ingress policy
# admits only what one of their rules allows; a rule allows its `ports` (all when none) from its `from` peers
# (everyone when none); a peer with only `podSelector` means pods of the policy's own namespace, with only
# `namespaceSelector` every pod of those namespaces, with both, pods matching both.


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]


def ray_pods(name: str) -> dict[str, Pod]:
    """The head and one pod per worker group of a manifest, labelled as KubeRay labels them (the template's
    labels plus its own; `ray.io/cluster` is a generated name, so nothing can select by it)."""
    cluster = _cluster_spec(name)
    groups = {"head": ("head", cluster["headGroupSpec"])}
    groups.update({wg["groupName"]: ("worker", wg) for wg in cluster["workerGroupSpecs"]})
    pods = {}
    for group, (node_type, spec) in groups.items():
        labels = dict(spec["template"].get("metadata", {}).get("labels", {}))
        labels.update(
            {
                "ray.io/node-type": node_type,
                "ray.io/group": group,
                "ray.io/is-ray-node": "yes",
                "ray.io/cluster": f"{_yaml(name)['metadata']['name']}-x7k2p",
                "app.kubernetes.io/name": "kuberay",
                "app.kubernetes.io/created-by": "kuberay-operator",
            }
        )
        pods[group] = Pod(APP_NS, labels)
    return pods


OPERATOR = Pod("kuberay-system", OPERATOR_LABELS)
INGRESS = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
SUBMITTER = Pod(APP_NS, {"batch.kubernetes.io/job-name": "inbol-pipeline", "job-name": "inbol-pipeline"})


def strangers(name: str) -> dict[str, Pod]:
    """Sources that must reach no port of `name`'s pods (the ingress and submitter are checked apart)."""
    other = next(n for n in CLUSTER_SPECS if n != name)
    return {
        "a pod of the app's namespace": Pod(APP_NS, {"app": "notebook"}),
        "another namespace": Pod("default", {"app": "web"}),
        "an operator-labelled pod of the app's namespace": Pod(APP_NS, OPERATOR_LABELS),
        **{f"{other}'s {group}": pod for group, pod in ray_pods(other).items()},
    }


def network_policies() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "networkpolicy.yaml").read_text()) if d]


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, values = e["key"], e.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[e["operator"]]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict, source: Pod) -> bool:
    if "ipBlock" in peer:
        return True  # an address range may hold any pod: assume it does
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        in_namespace = source.namespace == APP_NS
    return in_namespace and _selects(peer.get("podSelector"), source.labels)


def _port_admits(ports: list[dict] | None, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        number = p.get("port")
        if p.get("protocol", "TCP") == "TCP" and (
            number is None or isinstance(number, str) or number <= port <= p.get("endPort", number)
        ):  # no port: all of them; a named port: assume it is this one
            return True
    return False


def admitted(policies: list[dict], target: Pod, source: Pod, port: int) -> bool:
    """Whether `source` may open TCP `port` on `target` under `policies` (all in APP_NS)."""
    selecting = [
        p["spec"]
        for p in policies
        if target.namespace == APP_NS
        and _selects(p["spec"]["podSelector"], target.labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    return any(
        _port_admits(rule.get("ports"), port)
        and (not rule.get("from") or any(_peer_admits(peer, source) for peer in rule["from"]))
        for spec in selecting
        for rule in spec.get("ingress", [])
    )


_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_PEERS = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "podSelector": _LABEL_SELECTOR,
            "namespaceSelector": _LABEL_SELECTOR,
            "ipBlock": {
                "type": "object",
                "additionalProperties": False,
                "required": ["cidr"],
                "properties": {
                    "cidr": {"type": "string"},
                    "except": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_PORTS = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "port": {"type": ["integer", "string"]},
            "endPort": {"type": "integer"},
            "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        },
    },
}
NETWORK_POLICY = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["podSelector"],
            "properties": {
                "podSelector": _LABEL_SELECTOR,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"from": _PEERS, "ports": _PORTS},
                    },
                },
                "egress": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"to": _PEERS, "ports": _PORTS},
                    },
                },
            },
        },
    },
}
"""The fields of a networking.k8s.io/v1 NetworkPolicy (stable since Kubernetes 1.7, `endPort` since 1.25),
unknown ones refused as `kubectl apply`'s strict field validation refuses them."""


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_ray_token_authentication_is_on(name: str) -> None:
    cluster = _cluster_spec(name)
    assert cluster.get("authOptions", {}).get("mode") == "token", f"{name}: authOptions.mode must be token"
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:3]) >= TOKEN_AUTH_RAY
    kind = "rayjobs" if name == "rayjob.yaml" else "rayservices"
    stored = _crd_schema(kind)["properties"]["spec"]["properties"][CLUSTER_SPECS[name]]["properties"]
    assert "authOptions" in stored, (
        "the stored CRD schema predates authOptions: refresh tests/fixtures/kuberay"
    )
    assert f">= {TOKEN_AUTH_KUBERAY}" in (CLUSTER / name).read_text(), (
        f"{name}: say which operator keeps authOptions (KubeRay >= {TOKEN_AUTH_KUBERAY})"
    )


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_the_dashboard_is_reachable_by_the_operator_and_fenced_from_everyone_else(name: str) -> None:
    """The KubeRay operator talks to the dashboard through the head Service (RayService: deploys
    serveConfigV2 and reads Serve's status; RayJob: polls the job), so a loopback `dashboard-host` leaves
    the service undeployed and the job unwatched. What keeps others out is the token and the NetworkPolicy:
    the dashboard port admits the operator, the job's submitter and the cluster's own pods, no one else."""
    params = _cluster_spec(name)["headGroupSpec"]["rayStartParams"]
    host = params.get("dashboard-host", "0.0.0.0")  # unset: KubeRay's default
    assert host not in LOOPBACK, f"{name}: a loopback dashboard is out of the operator's reach"
    assert _cluster_spec(name)["authOptions"]["mode"] == "token"
    policies = network_policies()
    head = ray_pods(name)["head"]
    allowed = {"operator": OPERATOR, "submitter": SUBMITTER, **ray_pods(name)}
    for who, source in {**allowed, **strangers(name)}.items():
        reaches = admitted(policies, head, source, HEAD_PORTS["dashboard"])
        expected = who in allowed and (who != "submitter" or name == "rayjob.yaml")
        assert reaches == expected, f"{name}: dashboard {'open' if reaches else 'closed'} to {who}"


def test_the_endpoint_key_comes_from_a_secret_in_every_container_that_can_host_serve() -> None:
    """The ingress replica asks for no CPU, so Serve may place it on the head or any worker: each Ray
    container gets the key, from a Secret (never written in the manifest), and does not start without it."""
    svc = _yaml("rayservice.yaml")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    variable = load_config([_repo_path(c) for c in app["args"]["config"]]).serve.api_key_env
    cluster = svc["spec"]["rayClusterConfig"]
    refs = set()
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first one
        env = {e["name"]: e for e in ray_container.get("env", [])}
        assert variable in env, f"{ray_container['name']}: no {variable}, a replica placed here answers 401s"
        assert "value" not in env[variable], f"{variable} written into the manifest"
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional"), "an optional key lets a pod start without one"
        refs.add((ref["name"], ref["key"]))
    ((secret, key),) = refs
    assert (
        f"kubectl create secret generic {secret} --from-literal={key}="
        in (CLUSTER / "rayservice.yaml").read_text()
    )
    assert variable not in svc["spec"]["serveConfigV2"], "the key's variable belongs to the pods, not the app"


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_the_head_admits_its_cluster_the_operator_and_the_ingress_only(name: str) -> None:
    policies = network_policies()
    pods = ray_pods(name)
    head = pods["head"]
    assert any(_selects(p["spec"]["podSelector"], head.labels) for p in policies), f"{name}: head unselected"
    for group, pod in pods.items():  # the cluster works: every pod reaches the head on Ray's ports
        for port in [*HEAD_PORTS.values(), 20_000]:  # 20000: a worker port (Ray picks them at random)
            assert admitted(policies, head, pod, port), f"{name}: {group} cannot reach the head on {port}"
    for who, source in strangers(name).items():
        for what, port in HEAD_PORTS.items():
            assert not admitted(policies, head, source, port), (
                f"{name}: {who} reaches the head's {what} ({port})"
            )
    serves = name == "rayservice.yaml"
    for what, port in HEAD_PORTS.items():
        ingress = admitted(policies, head, INGRESS, port)
        assert ingress == (serves and what == "Serve"), (
            f"{name}: the ingress reaches the head's {what}: {ingress}"
        )
        operator_ports = {"dashboard", "Serve"} if serves else {"dashboard"}  # Serve: its proxy health check
        assert admitted(policies, head, OPERATOR, port) == (what in operator_ports), (name, "operator", what)
        assert admitted(policies, head, SUBMITTER, port) == (not serves and what == "dashboard"), (name, what)


@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_workers_admit_their_cluster_and_for_serve_the_ingress_only(name: str) -> None:
    policies = network_policies()
    pods = ray_pods(name)
    for group, worker in pods.items():
        if group == "head":
            continue
        assert any(_selects(p["spec"]["podSelector"], worker.labels) for p in policies), f"{group} unselected"
        for other, pod in pods.items():
            assert admitted(policies, worker, pod, 20_000), f"{name}: {other} cannot reach {group}"
        for who, source in {**strangers(name), "operator": OPERATOR}.items():
            assert not any(admitted(policies, worker, source, p) for p in [*HEAD_PORTS.values(), 20_000]), (
                f"{name}: {who} reaches worker group {group}"
            )
        serves = name == "rayservice.yaml"  # Serve's proxies run beside its replicas, here too
        assert admitted(policies, worker, INGRESS, 8000) == serves
        assert not admitted(policies, worker, INGRESS, 6379)


def test_the_policy_check_catches_open_policies() -> None:
    """The evaluator itself: a rule with no `from` admits everyone; a namespace and a pod selector written
    as two peers (`- namespaceSelector` / `- podSelector`) admit either, so an operator-labelled pod in the
    app's namespace gets in; an unselected pod admits all."""
    head = ray_pods("rayservice.yaml")["head"]
    select = {"matchLabels": {"inbol-ray/cluster": "inbol-serve", "ray.io/node-type": "head"}}
    wide = {
        "spec": {"podSelector": select, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 8265}]}]}
    }
    assert admitted([wide], head, strangers("rayservice.yaml")["another namespace"], 8265)
    assert not admitted([wide], head, OPERATOR, 6379)
    operator_ns = {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
    operator_pods = {"matchLabels": OPERATOR_LABELS}
    split = {
        "podSelector": select,
        "ingress": [{"from": [{"namespaceSelector": operator_ns}, {"podSelector": operator_pods}]}],
    }
    joined = {
        "podSelector": select,
        "ingress": [{"from": [{"namespaceSelector": operator_ns, "podSelector": operator_pods}]}],
    }
    impostor = strangers("rayservice.yaml")["an operator-labelled pod of the app's namespace"]
    assert admitted([{"spec": split}], head, impostor, 8265)
    assert not admitted([{"spec": joined}], head, impostor, 8265)
    assert admitted([{"spec": joined}], head, OPERATOR, 8265)
    assert admitted([], head, impostor, 6379)
    first = network_policies()[0]
    with pytest.raises(jsonschema.ValidationError):  # a misspelt field, which the API server would refuse
        jsonschema.validate({**first, "spec": {**first["spec"], "podselector": {}}}, NETWORK_POLICY)


def test_network_policies_are_well_formed() -> None:
    policies = network_policies()
    assert len(policies) >= 2 and len({p["metadata"]["name"] for p in policies}) == len(policies)
    for policy in policies:
        jsonschema.validate(policy, NETWORK_POLICY)
