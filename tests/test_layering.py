"""The package's import graph (read with ``ast``, function-level imports included): no cycle, and
no import against the direction capture -> passes -> backends -> kernels, numerics as the floor."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "bitcompiler"
# each may import the layers after it, never one before it; numerics imports no other bitcompiler module
LAYERS = (
    "bitcompiler.capture",
    "bitcompiler.passes",
    "bitcompiler.backends",
    "bitcompiler.kernels",
    "bitcompiler.quant.numerics",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The bitcompiler modules ``module`` imports anywhere in its body (not under TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for a in child.names:  # `from pkg import mod` imports pkg.mod
                    names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    resolved = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("bitcompiler") and name != module:
            resolved.add(name)
    return resolved


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    g.add_edges_from((m, d) for m, p in MODULES.items() for d in _imports(m, p))
    return g


def _layer(module: str) -> int | None:
    return next((i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")), None)


def test_the_walk_sees_the_imports():
    g = _graph()
    assert g.has_edge("bitcompiler.backends.lower_bit", "bitcompiler.ops")  # module level
    assert g.has_edge("bitcompiler.backends.lower_bit", "bitcompiler.kernels")  # inside a function
    assert g.number_of_edges() > 150


def test_no_import_cycle():
    cycles = sorted(nx.simple_cycles(_graph()), key=len)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:10])


def test_imports_follow_the_layers():
    against = []
    for module, dep in _graph().edges:
        a, b = _layer(module), _layer(dep)
        if a is not None and b is not None and b < a:
            against.append(f"{module} -> {dep}")
        if a == len(LAYERS) - 1 and b is None:
            against.append(f"{module} -> {dep} (numerics is the floor)")
    assert not against, "\n".join(against)


def test_quant_never_imports_methods():
    g = _graph()
    bad = [
        (m, d)
        for m, d in g.edges
        if m.startswith("bitcompiler.quant") and d.startswith("bitcompiler.methods")
    ]
    assert not bad, bad
