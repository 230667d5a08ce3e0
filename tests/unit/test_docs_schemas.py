"""docs/ cannot drift from the code it describes.

- docs/tables.md lists every Arrow schema of `inbol_ray/schema.py`, column by column (name, type,
  nullable, in order);
- docs/stages.md gives every stage the config sections the runner hashes for it (`pipeline.stages`);
- every default the docs quote as "`section.field` = value" is the config's default, and every
  `inbol_ray....` name they cite imports.

A failing check prints what the page should say. The meanings of columns and the prose are the docs' own
words and are not generated.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pyarrow as pa
import pytest

from inbol_ray import schema as S
from inbol_ray.config import Config, load_config
from inbol_ray.pipeline import stages

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def documented_schemas(text: str) -> dict[str, list[tuple[str, str, bool]]]:
    """`schema.NAME` (named in a `##` heading) -> the (column, type, nullable) rows of the table below it."""
    found = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        named = re.search(r"\(`schema\.(\w+)`\)", heading)
        if named:
            rows = [cells(line) for line in body.splitlines() if line.startswith("| `")]
            found[named[1]] = [(c[0].strip("`"), c[1].strip("`"), c[2] == "yes") for c in rows]
    return found


def expected_rows(schema: pa.Schema) -> str:
    return "\n".join(f"| `{f.name}` | `{f.type}` | {'yes' if f.nullable else 'no'} | ... |" for f in schema)


def test_every_schema_is_documented_column_by_column() -> None:
    code = {name: value for name, value in vars(S).items() if isinstance(value, pa.Schema)}
    docs = documented_schemas((DOCS / "tables.md").read_text())
    assert sorted(docs) == sorted(code), "docs/tables.md needs a `## ... (`schema.NAME`)` section per schema"
    for name, schema in code.items():
        want = [(f.name, str(f.type), f.nullable) for f in schema]
        assert docs[name] == want, f"docs/tables.md, schema.{name} should list:\n{expected_rows(schema)}"


def test_the_check_sees_a_drifted_column() -> None:
    text = (DOCS / "tables.md").read_text().replace("| `conf` | `double` | no |", "| `conf` | `float` | no |")
    assert documented_schemas(text)["SAMPLES"] != [(f.name, str(f.type), f.nullable) for f in S.SAMPLES]


def test_every_stage_is_documented_with_the_sections_it_hashes() -> None:
    # Every stage this project has: the embedded default (base_model) with every method (the ablation layer).
    cfg = load_config([ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "ablation.yaml"])
    code: dict[str, set[str]] = {}
    for stage in stages(cfg):
        name = "train_<method>" if stage.name.startswith("train_") else stage.name
        assert code.setdefault(name, set(stage.sections)) == set(stage.sections), name
    text = (DOCS / "stages.md").read_text()
    rows = [cells(line) for line in text.splitlines() if re.match(r"\| `\w+(<method>)?` \|", line)]
    docs = {r[0].strip("`"): {s.strip() for s in r[1].split(",")} for r in rows}
    assert docs == code, f"docs/stages.md's stage table should give these sections: {code}"


def quoted_defaults() -> list[tuple[str, str, str, str]]:
    """(page, section, field, value) for every "`section.field` = value" in docs/*.md."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for section, name, value in re.findall(r"`(\w+)\.(\w+)` = (-?\d+(?:\.\d+)?)", page.read_text()):
            found.append((page.name, section, name, value))
    return found


def test_quoted_defaults_are_the_configs() -> None:
    quoted = quoted_defaults()
    assert len(quoted) >= 8  # the method page quotes K, T, top_p, the three thresholds, beta, ...
    defaults = Config()
    for page, section, name, value in quoted:
        actual = getattr(getattr(defaults, section), name)
        assert float(value) == pytest.approx(float(actual)), (
            f"{page}: `{section}.{name}` = {value}, code: {actual}"
        )


def test_cited_code_names_exist() -> None:
    cited = set()
    for page in DOCS.glob("*.md"):
        cited |= set(re.findall(r"`(inbol_ray(?:\.\w+)+)`", page.read_text()))
    assert cited, "the pages cite no code"
    for name in sorted(cited):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                target = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[cut:]:
            assert hasattr(target, attribute), f"docs cite {name}, which does not exist"
            target = getattr(target, attribute)


def test_config_fields_the_pages_name_exist() -> None:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    defaults = Config()
    named = set()
    for page in DOCS.glob("*.md"):
        named |= set(re.findall(r"`(\w+)\.(\w+)(?::[^`]*)?`", page.read_text()))
    named = {(s, f) for s, f in named if s in sections}
    assert len(named) >= 10
    for section, field in sorted(named):
        assert hasattr(getattr(defaults, section), field), (
            f"docs name `{section}.{field}`, not a config field"
        )
