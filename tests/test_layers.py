"""The house's shape, checked from the code itself: module-level imports inside castling_deploy form no circle,
and the layers only import downward (a target never imports the pipeline, the library never imports the CLI)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "castling_deploy"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Imports executed when the module loads (not those inside functions, which are lazy by design)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("castling_deploy"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("castling_deploy"))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {t for t in _top_level_imports(p) if t in modules and t != m} for m, p in modules.items()}


def test_no_import_circle() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a circle of its own
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert len(graph) > 60  # the scan really saw the package


def test_layers_import_downward_only() -> None:
    graph = _graph()
    rules = {  # module prefix -> prefixes it must never import at load time
        "castling_deploy.targets": ("castling_deploy.pipeline", "castling_deploy.cli", "castling_deploy.api"),
        "castling_deploy.runtime": ("castling_deploy.targets", "castling_deploy.pipeline", "castling_deploy.cli"),
        "castling_deploy.pipeline": ("castling_deploy.cli", "castling_deploy.api"),
        "castling_deploy.api": ("castling_deploy.cli",),
        "castling_deploy.report": ("castling_deploy.pipeline", "castling_deploy.targets", "castling_deploy.cli"),
        "castling_deploy.devices": ("castling_deploy.pipeline", "castling_deploy.cli", "castling_deploy.targets"),
        "castling_deploy.packaging": ("castling_deploy.pipeline", "castling_deploy.cli", "castling_deploy.targets"),
    }
    bad = [(m, t) for m, ts in graph.items() for prefix, banned in rules.items() if m.startswith(prefix)
           for t in ts if t.startswith(banned)]
    assert not bad, bad
    targets = [m for m in graph if m.startswith("castling_deploy.targets.") and m.endswith(".target")]
    assert len(targets) >= 4 and all("castling_deploy.targets.base" in graph[m] for m in targets)
