"""The import layers of docs/architecture.md, checked on the source with `ast`: no module imports one of a higher
layer (at module level or inside a function), there are no import cycles, and every module has a layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sce_jax"
# The kernels live in the top-level kernels/ folder and install as sce_jax.kernels (pyproject.toml).
SOURCE_FOLDERS = {"sce_jax": PACKAGE, "kernels": f"{PACKAGE}.kernels"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name relative to sce_jax ("__init__" for the package): file} for every .py file of the package."""
    modules = {}
    for folder, package in SOURCE_FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [*package.split(".")[1:], *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__" and len(parts) > 1:
                parts = parts[:-1]  # a subpackage's __init__ is the subpackage
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name`'s source imports anywhere (functions included), as `module_files` names.

    `from sce_jax import irds` imports the module irds; `from sce_jax import SparseCrossEncoder` the package."""
    is_package = path.name == "__init__.py"
    here = [PACKAGE, *([] if name == "__init__" else name.split("."))]
    if not is_package:
        here = here[:-1]  # the package a plain module's relative imports start from
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[: len(here) - node.level + 1], *([base] if base else [])])
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if _local(t) in modules] or [base]
            if len(targets) < len(submodules) and base not in targets:
                targets.append(base)  # names that are not modules come from `base` itself
        else:
            continue
        found.update(_local(t) for t in targets if _local(t) in modules)
    found.discard(name)
    return found


def _local(dotted: str) -> str:
    """`sce_jax.x.y` -> `x.y`, `sce_jax` -> `__init__`; other names unchanged (and not in the package)."""
    if dotted == PACKAGE:
        return "__init__"
    return dotted[len(PACKAGE) + 1:] if dotted.startswith(PACKAGE + ".") else f"<{dotted}>"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def documented_layers(text: str) -> dict[str, int]:
    """{module: layer} from the table under "## Layers" in docs/architecture.md."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for match in re.finditer(r"^\| (\d+) [^|]*\| (.+) \|$", section, re.MULTILINE):
        for module in re.findall(r"`([^`]+)`", match.group(2)):
            assert module not in layers, f"{module} is listed twice in docs/architecture.md"
            layers[module] = int(match.group(1))
    return layers


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return [f"{name} (layer {layers[name]}) imports {target} (layer {layers[target]})"
            for name, targets in sorted(graph.items()) for target in sorted(targets)
            if layers[target] > layers[name]]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return documented_layers((ROOT / "docs" / "architecture.md").read_text())


def test_every_module_has_exactly_one_documented_layer(graph, layers):
    assert sorted(set(graph) - set(layers)) == [], "modules missing from docs/architecture.md's layer table"
    assert sorted(set(layers) - set(graph)) == [], "docs/architecture.md lists modules that do not exist"


def test_no_module_imports_from_a_higher_layer(graph, layers):
    assert upward_imports(graph, layers) == []


def test_there_are_no_import_cycles(graph):
    assert find_cycle(graph) is None


def test_the_checks_see_imports_inside_functions_relative_imports_and_cycles(tmp_path):
    """The checker itself, on a made-up package: a function-level import of a higher layer and a cycle through a
    relative import are both found; `from sce_jax import name` counts as importing the module `name`."""
    (tmp_path / "sce_jax" / "serve").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    files = {
        "sce_jax/__init__.py": "from sce_jax.b import thing\n",
        "sce_jax/a.py": "def late():\n    from sce_jax import b\n",
        "sce_jax/b.py": "from sce_jax import a\nimport numpy\n",
        "sce_jax/serve/__init__.py": "from .app import x\n",
        "sce_jax/serve/app.py": "from .. import a\nfrom sce_jax.kernels import k\n",
        "kernels/k.py": "import os\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {"__init__": {"b"}, "a": {"b"}, "b": {"a"}, "serve": {"serve.app"},
                     "serve.app": {"a", "kernels.k"}, "kernels.k": set()}
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    layers = documented_layers("## Layers\n\n| 0 base | `a`, `kernels.k` |\n| 1 up | `b`, `serve.app` |\n"
                               "| 2 top | `__init__`, `serve` |\n")
    assert upward_imports(graph, layers) == ["a (layer 0) imports b (layer 1)"]
