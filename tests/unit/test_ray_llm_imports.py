"""serve/ gets Ray's LLM names through serve/ray_llm.py only, each from the public API where Ray has one.

`ray.llm._internal` can change in any Ray release; one module importing it means an upgrade breaks at one
import, in one file, instead of somewhere in serving. The scan reads the source (AST, so a docstring that
mentions the package is not an import) of serve/, inbol_ray/, benchmarks/ and jobs/.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("serve", "inbol_ray", "benchmarks", "jobs")
THE_MODULE = Path("serve") / "ray_llm.py"
INTERNAL = "ray.llm._internal"


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def ray_llm_imports(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of `ray.llm` / `ray.serve.llm` in `source`: `import` and
    `from ... import` statements, `from ray.llm import _internal`, and `importlib.import_module` /
    `__import__` with a literal module name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if _under(a.name, "ray")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            if node.module in ("ray", "ray.serve", "ray.llm"):  # `from ray.llm import _internal`, ...
                found += [(node.lineno, f"{node.module}.{n}", []) for n in names]
            else:
                found.append((node.lineno, node.module, names))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value, []))
    return [
        (line, module, names)
        for line, module, names in found
        if _under(module, "ray.llm") or _under(module, "ray.serve.llm")
    ]


def offending(path: Path, source: str) -> list[str]:
    """Why `path` breaks the rule: it imports `ray.llm._internal`, or, inside serve/, takes any `ray.llm` /
    `ray.serve.llm` name other than through serve/ray_llm.py."""
    if path == THE_MODULE:
        return []
    out = []
    for line, module, names in ray_llm_imports(source):
        what = f"{module}{' import ' + ', '.join(names) if names else ''}"
        if _under(module, INTERNAL):
            out.append(f"{path}:{line}: {what} (internal)")
        elif path.parts[0] == "serve":
            out.append(f"{path}:{line}: {what} (serve/ takes ray.llm names from serve.ray_llm)")
    return out


def _sources() -> dict[Path, str]:
    return {
        p.relative_to(ROOT): p.read_text()
        for d in SCANNED
        for p in sorted((ROOT / d).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def _public_names() -> dict[str, object]:
    """Every name Ray's public LLM serving API exports: `ray.serve.llm` and each of its submodules."""
    import ray.serve.llm as public

    modules = [public] + [
        importlib.import_module(f"{public.__name__}.{m.name}") for m in pkgutil.iter_modules(public.__path__)
    ]
    names: dict[str, object] = {}
    for module in modules:
        exported = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        names.update({n: getattr(module, n) for n in exported if n != "PublicAPI"})
    return names


@pytest.fixture(scope="module")
def ray_llm():
    return importlib.import_module("serve.ray_llm")


def test_each_name_comes_from_the_public_api_where_ray_has_one(ray_llm) -> None:
    public = _public_names()
    assert {"LLMConfig", "OpenAiIngress", "ChatCompletionRequest"} <= set(public), "the scan found no API"
    for name in ray_llm.__all__:
        if name in public:
            assert getattr(ray_llm, name) is public[name], f"{name}: Ray exports it publicly; import it there"
        else:
            assert name in ray_llm.INTERNAL_ONLY, f"{name}: internal, but INTERNAL_ONLY gives no reason"
    assert set(ray_llm.INTERNAL_ONLY) <= set(ray_llm.__all__)
    now_public = sorted(set(ray_llm.INTERNAL_ONLY) & set(public))
    assert not now_public, (
        f"Ray now exports {now_public} publicly: import them there, drop them from INTERNAL_ONLY"
    )
    assert all(reason.strip() for reason in ray_llm.INTERNAL_ONLY.values())


def test_serve_ray_llm_has_every_name_the_code_takes_from_ray_llm(ray_llm) -> None:
    """Whatever another module still imports from Ray directly, serve.ray_llm offers under the same name,
    so switching that import is a one-line change."""
    missing = [
        f"{path}:{line}: {name} (from {module})"
        for path, source in _sources().items()
        if path != THE_MODULE
        for line, module, names in ray_llm_imports(source)
        for name in names
        if not hasattr(ray_llm, name)
    ]
    assert missing == []


def test_only_serve_ray_llm_imports_ray_llm_internal() -> None:
    offenders = [o for path, source in _sources().items() for o in offending(path, source)]
    assert offenders == [], (
        "ray.llm names must come through serve/ray_llm.py (`from serve.ray_llm import ...`), the one module "
        "that may import ray.llm._internal; switch these imports:\n  " + "\n  ".join(offenders)
    )


def test_the_scan_finds_every_spelling_of_the_import() -> None:
    """The scan itself: each way of importing the internal package is caught, a mention is not, and
    serve/ray_llm.py alone is allowed it."""
    caught = [
        "import ray.llm._internal.serve",
        "from ray.llm._internal.serve.core import x",
        "from ray.llm import _internal",
        "import importlib\nimportlib.import_module('ray.llm._internal.common')",
        "__import__('ray.llm._internal')",
        "def f():\n    from ray.llm._internal.common.models import global_id_manager",
    ]
    for source in caught:
        assert offending(Path("jobs") / "x.py", source), source
    fine = '"""Built on ray.llm._internal once."""\nfrom ray.serve.llm import LLMConfig\nimport ray\n'
    assert offending(Path("jobs") / "x.py", fine) == []
    assert offending(Path("serve") / "x.py", fine) == [
        "serve/x.py:2: ray.serve.llm import LLMConfig (serve/ takes ray.llm names from serve.ray_llm)"
    ]
    assert offending(THE_MODULE, caught[1]) == []
