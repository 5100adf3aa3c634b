"""No function in the package is longer than 80 lines, kernel builders excepted: in
``bitcompiler/kernels/``, a function whose name ends in ``_func`` writes one TIR kernel (its loops
and the helpers nested in it read best in one place) and is exempt with everything nested in it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "bitcompiler"
LIMIT = 80


def is_kernel_builder(path: Path, name: str) -> bool:
    return path.relative_to(ROOT).parts[0] == "kernels" and name.endswith("_func")


def long_functions(path: Path, source: str | None = None) -> list[str]:
    """``file:line name (N lines)`` for each function of ``path`` (or of ``source`` as if it were
    that file) over the limit."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if is_kernel_builder(path, child.name):
                    continue  # and what it nests
                lines = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                if lines > LIMIT:
                    out.append(f"{path.relative_to(ROOT.parent)}:{child.lineno} {child.name} ({lines} lines)")
            visit(child)

    visit(ast.parse(path.read_text() if source is None else source))
    return out


def test_no_function_over_80_lines_outside_kernel_builders():
    offenders = [f for path in sorted(ROOT.rglob("*.py")) for f in long_functions(path)]
    assert not offenders, "split these by meaning:\n" + "\n".join(offenders)


def test_the_check_sees_a_long_function_and_exempts_only_kernel_builders():
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    source = f"def long_one():\n{body}\n\n\ndef short_one():\n    return 1\n"
    for rel, name in (("passes/x.py", "long_one"), ("kernels/x.py", "long_one")):
        path = ROOT / rel
        assert long_functions(path, source) == [f"bitcompiler/{rel}:1 {name} ({LIMIT + 1} lines)"]
    assert long_functions(ROOT / "kernels/x.py", source.replace("long_one", "long_one_func")) == []
    assert long_functions(ROOT / "passes/x.py", source.replace("long_one", "long_one_func")) != []
