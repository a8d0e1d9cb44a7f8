"""The import graph of the package: no module-level cycle, no package-level cycle, no import of a
higher layer (developers' guide: ``cli → pipeline → {engine, train, postprocess, evaluate} →
{models, data, io} → ops → kernels``).

Every module of ``wsss_fast/`` (and ``kernels/``, installed as ``wsss_fast.kernels``) is parsed
with ``ast``; every ``import`` / ``from ... import`` counts, absolute or relative, at module level
or inside a function (a lazy import is still a dependency). Names listed in a registry's
``builtin_modules`` are imported by the registry at lookup time and are deliberately not edges:
the modules import the registry, not the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "wsss_fast"

# Layers, low to high; a module may import its own layer (without package cycles) or lower ones.
LAYERS = (
    ("base", ("wsss_fast", "wsss_fast.registry", "wsss_fast.constants", "wsss_fast._compat",
              "wsss_fast._cuda_build", "wsss_fast.options")),
    ("kernels", ("wsss_fast.kernels",)),
    ("ops", ("wsss_fast.ops",)),
    ("models/data/io", ("wsss_fast.models", "wsss_fast.data", "wsss_fast.io",
                        "wsss_fast.distributed", "wsss_fast.workers")),
    ("engine/train/postprocess/evaluate", ("wsss_fast.engine", "wsss_fast.train",
                                           "wsss_fast.postprocess", "wsss_fast.evaluate")),
    ("pipeline", ("wsss_fast.pipeline",)),    # may not exist yet
    ("app", ("wsss_fast.demo",)),
    ("cli", ("wsss_fast.cli", "wsss_fast.__main__")),
)
LAYER_OF = {unit: level for level, (_, units) in enumerate(LAYERS) for unit in units}

# Edges that break the rules today and are being removed by their owners; each entry is
# (importing module, imported module). The integrator empties this set as they go. A listed edge
# that no longer exists fails test_known_violations_still_exist, so the set only shrinks.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_files() -> dict[str, Path]:
    """``{module name: file}`` of the package as installed (kernels/ as wsss_fast.kernels)."""
    files = {}
    for root_dir, name in ((REPO / PACKAGE, PACKAGE), (REPO / "kernels", f"{PACKAGE}.kernels")):
        for path in sorted(root_dir.rglob("*.py")):
            relative = path.relative_to(root_dir)
            if relative.parts[0] == "kernels" and name == PACKAGE:
                continue   # a checkout may link wsss_fast/kernels to kernels/: counted once
            parts = relative.with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((name, *parts))] = path
    return files


def _resolve(name: str, modules: set[str]):
    """The longest module of the package that ``name`` (a dotted import target) lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            # ``from pkg import name``: the submodule pkg.name if it is one, else pkg itself.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def unit_of(module: str) -> str:
    """The package-level unit of a module: ``wsss_fast.<first component>`` (or the package)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (the cycles)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through the first node of a strongly connected component, for the message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for successor in sorted(graph[node] & members):
            if successor == start:
                return paths[node] + [start]
            if successor not in paths:
                paths[successor] = paths[node] + [successor]
                frontier.append(successor)
    return component


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    return {module: imports_of(module, path, modules) for module, path in files.items()}


def _without_known(graph):
    return {module: {t for t in targets if (module, t) not in KNOWN_VIOLATIONS}
            for module, targets in graph.items()}


def test_imports_of_resolves_every_kind_of_import(tmp_path):
    modules = {"wsss_fast", "wsss_fast.ops", "wsss_fast.io", "wsss_fast.io.atomic",
               "wsss_fast.io.cam_files", "wsss_fast.data", "wsss_fast.data.images"}
    init = tmp_path / "__init__.py"   # relative imports of a package resolve against itself
    init.write_text("from . import atomic\nfrom .cam_files import load_cam_file\n"
                    "from .. import ops\n")
    assert imports_of("wsss_fast.io", init, modules) == {
        "wsss_fast.io.atomic", "wsss_fast.io.cam_files", "wsss_fast.ops"}
    module = tmp_path / "overlays.py"
    module.write_text("import numpy\nimport wsss_fast.data.images.read_image as r\n"
                      "def f():\n    from ..data import images\n"
                      "    from .atomic import atomic_write\n    from wsss_fast import io\n")
    assert imports_of("wsss_fast.io.overlays", module, modules) == {
        "wsss_fast.data.images", "wsss_fast.io.atomic", "wsss_fast.io"}


def test_the_graph_holds_the_package(graph):
    assert "wsss_fast.ops" in graph["wsss_fast.models.mctformer"]     # from wsss_fast import ops
    assert "wsss_fast.kernels.attention_stats" in graph["wsss_fast.kernels.propagate"]
    assert "wsss_fast.io.atomic" in graph["wsss_fast.models.registry"]    # inside save_model()
    assert "wsss_fast.engine.cam_engine" in graph["wsss_fast.engine"]


def test_no_module_level_cycle(graph):
    cycles = [a_cycle(c, graph) for c in strongly_connected(_without_known(graph))]
    assert not cycles, "module import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_package_level_cycle(graph):
    units: dict[str, set[str]] = {}
    for module, targets in _without_known(graph).items():
        source = unit_of(module)
        units.setdefault(source, set()).update(unit_of(t) for t in targets if unit_of(t) != source)
    cycles = [a_cycle(c, units) for c in strongly_connected(units)]
    assert not cycles, "package import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer(graph):
    unplaced = sorted({unit_of(m) for m in graph} - set(LAYER_OF))
    assert not unplaced, f"modules in no layer of tests/test_architecture.py LAYERS: {unplaced}"


def test_no_upward_import(graph):
    upward = sorted((module, target) for module, targets in graph.items() for target in targets
                    if LAYER_OF.get(unit_of(target), -1) > LAYER_OF.get(unit_of(module), -1)
                    and (module, target) not in KNOWN_VIOLATIONS)
    assert not upward, "imports of a higher layer:\n" + "\n".join(
        f"{m} ({_layer_name(m)}) imports {t} ({_layer_name(t)})" for m, t in upward)


def _layer_name(module: str) -> str:
    level = LAYER_OF.get(unit_of(module))
    return "no layer" if level is None else LAYERS[level][0]


def test_known_violations_still_exist(graph):
    """An allowlisted edge that is gone must leave the list (so it cannot come back unnoticed)."""
    gone = sorted(edge for edge in KNOWN_VIOLATIONS if edge[1] not in graph.get(edge[0], ()))
    assert not gone, f"remove from KNOWN_VIOLATIONS (no longer imported): {gone}"


def test_installed_layout_maps_kernels_into_the_package():
    """setup.py installs kernels/ as wsss_fast.kernels, and the import here finds that folder."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "setup"]
    assert len(calls) == 1
    keywords = {k.arg: k.value for k in calls[0].keywords}
    assert ast.literal_eval(keywords["package_dir"]) == {"wsss_fast.kernels": "kernels"}
    assert "'wsss_fast.kernels'" in ast.unparse(keywords["packages"])
    import wsss_fast.kernels
    assert Path(wsss_fast.kernels.__file__).resolve().parent == (REPO / "kernels").resolve()
