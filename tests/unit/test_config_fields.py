"""Every config field is documented and read by some code; every key a shipped YAML sets is such a field.

Why: a field nothing reads is a knob that silently does nothing (a shipped YAML set
`data.unanswerable_per_answerable` for months while no code read it). The check is textual on purpose:
a field counts as read when `.<name>` appears in the library, jobs or serve code outside the config
package (a dataclass attribute access), which is how every section is consumed.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from inbol_ray.config import Config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PKG = ROOT / "inbol_ray" / "config"
CODE = [
    p
    for folder in ("inbol_ray", "jobs", "serve")
    for p in (ROOT / folder).rglob("*.py")
    if CONFIG_PKG not in p.parents
]


def sections() -> dict[str, type]:
    """Dotted prefix -> dataclass, for every section reachable from Config."""
    out = {"": Config}
    todo = [("", Config)]
    while todo:
        prefix, cls = todo.pop()
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = typing.get_args(tp)
            inner = args[0] if typing.get_origin(tp) is list and args else tp
            if dataclasses.is_dataclass(inner):
                key = f"{prefix}{f.name}" + ("[]" if inner is not tp else "")
                out[key] = inner
                todo.append((key + ".", inner))
    return out


def all_fields() -> list[tuple[str, type, str]]:
    return [
        (f"{prefix}." if prefix else "", cls, f.name)
        for prefix, cls in sections().items()
        for f in dataclasses.fields(cls)
    ]


def documented(cls: type) -> set[str]:
    """Fields followed by a string literal (an attribute docstring) in the class body."""
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    names = set()
    for node, after in zip(body, body[1:], strict=False):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if is_field and is_doc and isinstance(after.value.value, str):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize(
    ("prefix", "cls", "name"), all_fields(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_field_has_help_text(prefix: str, cls: type, name: str) -> None:
    assert name in documented(cls), f"{prefix}{name}: add a docstring below the field saying what it does"


def test_every_field_is_read_by_code() -> None:
    text = "\n".join(p.read_text() for p in CODE)
    unread = sorted(
        {f"{prefix}{name}" for prefix, _, name in all_fields() if not re.search(rf"\.{name}\b", text)}
    )
    assert unread == [], f"config fields no code reads (remove them or use them): {unread}"


def flatten(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += flatten(value, dotted + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                keys += flatten(item, dotted + "[].")
        else:
            keys.append(dotted)
    return keys


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_sets_only_fields_code_reads(path: Path) -> None:
    text = "\n".join(p.read_text() for p in CODE)
    keys = flatten(yaml.safe_load(path.read_text()) or {})
    unread = [k for k in keys if not re.search(rf"\.{k.rsplit('.', 1)[-1]}\b", text)]
    assert unread == [], f"{path.name} sets keys no code reads: {unread}"
