"""The package's layering, read from its imports: numerics <- core <- passes <- api/cli, runtime
beside the core, and no module-level import cycle."""
import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lrqgraph": ROOT / "lrqgraph", "lrqgraph.passes": ROOT / "passes", "lrqgraph.runtime": ROOT / "runtime"}
# the api layer: may import everything (lrqgraph.ir and lrqgraph.torch are front ends that run pipelines)
TOP = {"lrqgraph", "lrqgraph.__main__", "lrqgraph.api", "lrqgraph.cli", "lrqgraph.ir", "lrqgraph.torch"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "lrqgraph" and parts[:1] == ["testing"]:
                continue  # test fixtures (real models), not part of the layering
            found[name] = path
    return found


MODULES = modules()


def imports(name: str, path: Path, module_level_only: bool) -> set[str]:
    """lrqgraph modules ``name`` imports (relative imports resolved; ``from pkg import sub`` is sub)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for a in node.names:
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target)
    return {m for m in out if m in MODULES}


def layer(name: str) -> str:
    if name.startswith("lrqgraph.numerics"):
        return "numerics"
    if name.startswith("lrqgraph.runtime"):
        return "runtime"
    if name.startswith("lrqgraph.passes"):
        return "passes"
    return "top" if name in TOP else "core"


def test_leaves_import_nothing_of_lrqgraph_but_leaves():
    for name in LEAVES:
        assert imports(name, MODULES[name], module_level_only=False) <= LEAVES - {name}, name


def test_every_module_is_found():
    assert {"lrqgraph.passmanager", "lrqgraph.passes.lower", "lrqgraph.runtime.session",
            "lrqgraph.numerics.gptq", "lrqgraph.methods.gptq"} <= set(MODULES)


def test_no_module_level_import_cycle():
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        g.add_edges_from((name, target) for target in imports(name, path, module_level_only=True) if target != name)
    assert list(nx.simple_cycles(g)) == []


# import nothing of lrqgraph but each other; all may use them
LEAVES = {"lrqgraph.errors", "lrqgraph.cache", "lrqgraph.version", "lrqgraph.atomic"}
ALLOWED = {"numerics": {"numerics"}, "runtime": {"runtime", "numerics"}, "core": {"numerics", "core", "runtime"},
           "passes": {"numerics", "core", "runtime", "passes"}, "top": {"numerics", "core", "runtime", "passes", "top"}}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    """Also function-level imports: a lazy import is still a dependency."""
    bad = sorted(t for t in imports(name, MODULES[name], module_level_only=False)
                 if layer(t) not in ALLOWED[layer(name)] and t not in LEAVES)
    assert bad == [], f"{name} ({layer(name)}) imports {bad}"
