"""docs/architecture.md's layers hold: no module imports a higher layer, and no modules import each other in a
circle (imports at the top of a module and inside its functions alike, read with ast)."""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "moecomm"

# bottom to top, as docs/architecture.md draws them; a module may import its own layer and the ones below
LAYERS = [{"errors", "_enum", "_device", "_modes"}, {"quant"}, {"comm"}, {"moe"}, {"layer"}, {"ops"},
          {"testing", "bench", "demo", "_args", "_output", "_progress"}, {"cli"}]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("moecomm",) + path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The moecomm modules ``name`` imports (``from pkg import mod`` is the module, ``from mod import x`` mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("moecomm") and target != name:
                found.add(target)
    return found


def _layer(name: str) -> int | None:
    top = name.split(".")[1] if "." in name else None  # the package moecomm itself re-exports: no layer
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, circles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_every_module_is_in_a_layer():
    assert [m for m in _graph() if m != "moecomm" and _layer(m) is None] == []


def test_no_module_imports_a_higher_layer():
    assert _upward(_graph()) == []


def test_no_import_circle():
    assert _circles(_graph()) == []


def test_the_checks_find_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks can fail: a made-up package where quant imports layer and layer imports quant."""
    pkg = tmp_path / "moecomm"
    for sub, text in (("quant", "from moecomm.layer import x\n"), ("layer", "from ..quant import y\n")):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text(text)
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    graph = _graph()
    assert graph == {"moecomm": set(), "moecomm.quant": {"moecomm.layer"}, "moecomm.layer": {"moecomm.quant"}}
    assert _upward(graph) == ["moecomm.quant -> moecomm.layer"]
    assert _circles(graph) == [["moecomm.layer", "moecomm.quant", "moecomm.layer"]]
