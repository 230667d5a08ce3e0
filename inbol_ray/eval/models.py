"""Other models scored on a run's evaluation sets, beside its own methods: the run's model registry.

s_trust looks only at outputs, so any model can be ranked on the same items: a local checkpoint of any
image-text-to-text architecture (`backend: checkpoint`, through the generation stage: vLLM or
transformers, the model's own chat template) or a model behind an OpenAI-compatible endpoint (`backend:
endpoint`, `eval.endpoint`). Each is registered by name in `<run>/eval/models.json` with where it came
from, and its graded answers live under `eval/predictions/<name>/` like a method's. So the run's
`predictions` / `metrics` (rebuilt from the methods' and every registered model's answers), the report
(tables, the intrinsic-boundary figures, where each model came from) and `jobs.compare` treat them as
one more row, and rerunning the run's own evaluation keeps them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Literal

from inbol_ray import methods as M
from inbol_ray.data import io as dio
from inbol_ray.run_layout import RunLayout

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A model's name is a folder name and a table value: letters, digits, `.`, `_`, `-`."""


@dataclass(frozen=True)
class ExternalModel:
    name: str
    backend: Literal["checkpoint", "endpoint"]
    location: str
    """The checkpoint's directory or URI, or the endpoint's base URL."""
    model: str = ""
    """The endpoint's `model` field; the checkpoint's architecture (`config.json` model_type)."""

    def describe(self) -> str:
        if self.backend == "endpoint":
            return f"endpoint {self.location}, model `{self.model}`"
        return f"{self.model or 'local'} checkpoint `{self.location}`"


def check_name(name: str) -> None:
    """Reject names that are not folder-safe or that would mix a model's rows with a method's."""
    if not NAME.match(name):
        raise ValueError(f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if name in M.METHODS:
        raise ValueError(f"model name {name!r} is a method of the run; choose another (e.g. {name}-external)")


def registered(layout: RunLayout) -> dict[str, ExternalModel]:
    """Every registered model, by name (empty when none)."""
    if not dio.exists(layout.external_models):
        return {}
    entries = json.loads(dio.read_bytes(layout.external_models).decode())
    return {name: ExternalModel(**entry) for name, entry in sorted(entries.items())}


def claim(layout: RunLayout, name: str, backend: str) -> None:
    """Before `name`'s answers are written by `backend`: check the name, and drop answers another backend
    left under it (a name reused for a checkpoint after an endpoint must not mix the two)."""
    check_name(name)
    earlier = registered(layout).get(name)
    if earlier is not None and earlier.backend != backend and dio.exists(layout.eval_shards(name)):
        dio.remove(layout.eval_shards(name))


def register(layout: RunLayout, model: ExternalModel) -> None:
    """Add or replace `model` in the registry (its answers are written by the caller)."""
    check_name(model.name)
    entries = {name: asdict(m) for name, m in registered(layout).items()}
    entries[model.name] = asdict(model)
    dio.write_bytes(layout.external_models, json.dumps(entries, indent=1, sort_keys=True).encode())
