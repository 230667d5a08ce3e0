"""Write the ray.io/v1 schemas of KubeRay's CRDs (RayJob, RayService) that the cluster-file test checks against.

    python tools/kuberay_schemas.py KUBERAY_CHECKOUT [OUT_DIR]

Reads `ray-operator/config/crd/bases/ray.io_{rayjobs,rayservices}.yaml` of a kuberay checkout and writes each
v1 `openAPIV3Schema`, descriptions dropped (they are ~85% of the bytes), as gzipped JSON. The files in
tests/fixtures/kuberay came from ray-project/kuberay at commit feeaf72fa.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

KINDS = ("rayjobs", "rayservices")


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(argv: list[str]) -> int:
    checkout = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "tests/fixtures/kuberay"
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        crd = yaml.safe_load((checkout / f"ray-operator/config/crd/bases/ray.io_{kind}.yaml").read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip_descriptions(v1["schema"]["openAPIV3Schema"])
        data = json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()
        (out / f"{kind}.v1.schema.json.gz").write_bytes(gzip.compress(data, mtime=0))
        print(f"{kind}: {len(data)} bytes of schema")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
