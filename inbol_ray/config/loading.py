"""Building the typed config from layered YAML files and dotted CLI overrides.

    load_config(["configs/llava-1.5-7b.yaml", "site.yaml"], ["train.lr=1e-5"])

Files merge in order (a later file's mapping keys override an earlier one's, recursively; lists and
scalars are replaced whole), then the overrides apply, then the dataclasses are built. So a user keeps a
site file (paths, cluster sizes) beside a shipped recipe without copying it. Loading is strict: an
unknown key or a value of the wrong type is one clear line naming the dotted key (and the file), because
a typo that silently falls back to a default would quietly change an experiment.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from inbol_ray.config.errors import ConfigError
from inbol_ray.config.sections import Config


class ConfigKeyError(ConfigError):
    """An unknown key or a value of the wrong type: wrong in any layer, whatever the other layers say."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally coerce) one value against a field type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigKeyError(
                f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}"
            )
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigKeyError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigKeyError(f"{key}: expected a list, got {type(value).__name__} ({value!r})")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigKeyError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigKeyError(f"{key}: expected bool, got {type(value).__name__} ({value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigKeyError(f"{key}: expected int, got {type(value).__name__} ({value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigKeyError(f"{key}: expected float, got {type(value).__name__} ({value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigKeyError(f"{key}: expected str, got {type(value).__name__} ({value!r})")
    raise ConfigKeyError(f"{key}: unsupported field type {_type_name(tp)}")


MOVED = {
    "eval.answer_instruction": "prompt.short_answer (and prompt.multiple_choice for options)",
    "eval.refusal_instruction": "prompt.refusal_clause (only the clause: the instruction comes first)",
}
"""Keys that moved: the error names the new home instead of only listing the section's keys."""


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else key
            if dotted in MOVED:
                raise ConfigKeyError(f"config key '{dotted}' moved to {MOVED[dotted]}")
            raise ConfigKeyError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a section's own validation that raised something else
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _parse_scalar(text: str) -> Any:
    """CLI values are YAML scalars, so `train.lr=1e-5`, `train.lora=false` and `x=[a, b]` all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def merge_layers(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_layers(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return loaded or {}


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] | None = None
) -> Config:
    """Load YAML config file(s) (later files override earlier ones) or the defaults, then apply
    `section.key=value` overrides."""
    if paths is None:
        files: list[str | Path] = []
    elif isinstance(paths, (str, Path)):
        files = [paths]
    else:
        files = list(paths)
    data: dict[str, Any] = {}
    for path in files:
        layer = read_yaml(path)
        try:
            _build(Config, layer)  # name the file that holds an unknown key or a bad value
        except ConfigKeyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except ConfigError:
            pass  # cross-field checks judge the merged layers, below
        data = merge_layers(data, layer)
    data = apply_overrides(data, list(overrides or []))
    return _build(Config, data)
