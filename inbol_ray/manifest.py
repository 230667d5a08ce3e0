"""Reuse: one fingerprint function and one manifest format decide whether an existing output can be reused.

Why: the pipeline must resume after a crash without redoing hours of sampling, and must *not* reuse an
output made with different settings. A manifest is written last, after the outputs, holding the content
hash of the config sections the stage depends on; a rerun skips the stage exactly when the hash matches.
The same `fingerprint` keys everything finer-grained (generation shards, Ray Train run names, merged
checkpoints), so "can this be reused" has one answer everywhere: the hash of what it was made from.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import uuid
from typing import Any

from inbol_ray.data import io as dio


def fingerprint(*parts: Any, **named: Any) -> str:
    """Content hash of everything an output depends on (JSON of the parts; dataclasses as dicts)."""
    import dataclasses

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return value

    blob = json.dumps(
        {"parts": [plain(p) for p in parts], **{k: plain(v) for k, v in named.items()}},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
    }


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest at `uri` (the run layout names it: `RunLayout.manifest(stage)`), or None."""
    if not dio.exists(uri):
        return None
    return json.loads(dio.read_bytes(uri).decode())


def is_done(uri: str, config_hash: str, inputs: dict[str, str | None] | None = None) -> bool:
    """The manifest at `uri` exists with `config_hash` and, when `inputs` is given, was written from
    exactly those input outputs (their manifests' tokens)."""
    found = read_manifest(uri)
    if found is None or found.get("config_hash") != config_hash:
        return False
    return inputs is None or found.get("inputs") == inputs


def token(uri: str) -> str | None:
    """A manifest's token: new each time the stage finishes, so a reader can tell a rerun output from
    the one it was made from even when the config (and so the hash) is the same."""
    found = read_manifest(uri)
    return None if found is None else found.get("token")


def write_manifest(
    uri: str,
    stage: str,
    config_hash: str,
    counts: dict[str, Any],
    inputs: dict[str, str | None] | None = None,
    **extra: Any,
) -> None:
    body = {
        "stage": stage,
        "config_hash": config_hash,
        "token": uuid.uuid4().hex,
        "inputs": inputs or {},
        "counts": counts,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        **extra,
    }
    dio.write_bytes(uri, json.dumps(body, indent=2, default=str).encode())


def clear_manifest(uri: str) -> None:
    """Invalidate before rewriting outputs, so a crash mid-write never leaves a stale 'done' behind."""
    dio.remove(uri)
