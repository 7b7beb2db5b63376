"""Layers run one way: core <- {attacks, certify} <- defenses <- app <- commands/CLI.

Every module's imports are parsed -- top level *and* inside functions -- and an import of a
higher layer fails the test, as does an import cycle between the project's own modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("robustkit", "attacks", "defenses", "certify")

# layer -> the layers it may import (its own included)
ALLOWED = {
    "core": {"core"},
    "attacks": {"core", "attacks"},
    "certify": {"core", "certify"},
    "defenses": {"core", "attacks", "certify", "defenses"},
    "app": {"core", "attacks", "certify", "defenses", "app"},
    "commands": {"core", "attacks", "certify", "defenses", "app", "commands"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer a project module belongs to (``None``: not ours)."""
    parts = module.split(".")
    if parts[0] in ("attacks", "certify", "defenses"):
        return parts[0]
    if parts[0] != "robustkit":
        return None
    if len(parts) > 1 and parts[1] == "app":
        return "app"
    if len(parts) > 1 and parts[1] in ("commands", "cli", "__main__"):
        return "commands"
    return "core"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(p)] = p
    return out


MODULES = _modules()


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement in the file, at any depth.
    ``from a.b import c`` counts as ``a.b.c`` when that is a module of ours, else ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else target))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for _, t in imports_of(p, m) if t in MODULES and t != m} for m, p in MODULES.items()}


def test_the_modules_are_found():
    assert {"robustkit.zoo", "robustkit.app", "attacks.pgd", "certify.ibp", "defenses.trainer"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    src = layer_of(module)
    bad = [f"{MODULES[module].relative_to(ROOT)}:{line}: {src} imports {t} ({layer_of(t)})"
           for line, t in imports_of(MODULES[module], module)
           if layer_of(t) is not None and layer_of(t) not in ALLOWED[src]]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its own submodules is not a cycle of logic
    real = [c for c in cycles if not any(a == b.rsplit(".", 1)[0] or b == a.rsplit(".", 1)[0]
                                         for a, b in zip(c, c[1:]))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from attacks.pgd import PGD\n    import certify.ibp\n")
    assert [t for _, t in imports_of(f, "robustkit.fake")] == ["attacks.pgd", "certify.ibp"]
    assert layer_of("robustkit.app.train") == "app" and layer_of("robustkit.zoo") == "core"
    assert "attacks" not in ALLOWED[layer_of("robustkit.evaluate")]
