"""The package's layering: every ``minillm`` import points down, and no package imports itself back.

Layers, bottom first (see NOTES/README "Layout"): shared plumbing (``config``, ``files``); ``model``
and ``data``; what reads a model or a tokenizer (``checkpoint``, ``generation``, ``interop``);
``training``; ``evaluation`` (it reads what training wrote); the command line (``cli``). Imports
inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"
LAYERS = [
    ["minillm.config", "minillm.files"],
    ["minillm.model", "minillm.data"],
    ["minillm.checkpoint", "minillm.generation", "minillm.interop"],
    ["minillm.training"],
    ["minillm.evaluation"],
    ["minillm.cli", "minillm"],  # the package's own __init__ re-exports the public API
]


def unit(module: str) -> str:
    """The layered unit a module belongs to: its top-level package or module under ``minillm``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``minillm`` module -> the ``minillm`` modules it imports (anywhere in the file)."""
    paths = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("minillm")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("minillm"):
                # ``from minillm import checkpoint`` imports the submodule minillm.checkpoint
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                          for a in node.names}
        graph[name] = found
    return graph


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in imports())  # StopIteration names an unplaced one


def test_imports_point_down_the_layers():
    upward = [f"{m} -> {dep}" for m, deps in imports().items() for dep in deps
              if unit(dep) != unit(m) and layer(dep) >= layer(m)]
    assert not upward, f"imports across or up the layers: {upward}"


def test_no_import_cycle_between_modules():
    graph = imports()
    done, stack = set(), []

    def visit(m: str) -> None:
        if m in stack:
            pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in done:
            return
        stack.append(m)
        for dep in graph.get(m, ()):
            visit(dep)
        stack.pop()
        done.add(m)

    for module in graph:
        visit(module)


def test_the_checks_catch_an_upward_import(monkeypatch, tmp_path):
    """The walk is not vacuous: a model module that imports training is reported."""
    fake = tmp_path / "minillm"
    (fake / "model").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "model" / "bad.py").write_text("def f():\n    from minillm.training.run import train\n")
    (fake / "training" / "run.py").write_text("from minillm.model.bad import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="minillm.model.bad -> minillm.training.run"):
        test_imports_point_down_the_layers()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle_between_modules()
