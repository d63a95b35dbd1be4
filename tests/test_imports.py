"""The package's import graph has no cycles, counting imports inside functions (which hide them)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hemaseg"


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = f
    graph = {m: set() for m in modules}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t != "hemaseg":
                    graph[name].add(t)
    return graph


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "hemaseg.inference.onnx" in graph["hemaseg.inference.backends"]  # imported lazily there


# The stages, bottom up: a module may import its own stage and those below it, never one above, not even
# inside a function. hemaseg/__init__.py (the lazy Python API), cli.py and demo.py sit on top.
LAYERS = (
    ("io", "device", "config", "extras", "lesions", "spacing", "render", "distributed", "web"),  # the base
    ("data",), ("models",), ("measure",), ("inference",), ("evaluation",), ("training",), ("crossval",),
    ("label",), ("serve",), ("cli", "demo", "__main__"),
)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's __init__: the Python API, on top
        return len(LAYERS) - 1
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module}: not in any stage of LAYERS; place it there")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {t}" for m, targets in graph.items() for t in targets
            if t.startswith("hemaseg.") and _layer(t) > _layer(m)]


def test_stages_import_downward_only():
    assert not _upward(_graph())


def test_the_layer_check_sees_an_upward_import_inside_a_function(tmp_path):
    fake = tmp_path / "hemaseg"
    (fake / "inference").mkdir(parents=True)
    for name in ("__init__.py", "inference/__init__.py", "inference/predictor.py"):
        (fake / name).write_text("")
    (fake / "lesions.py").write_text("def f():\n    from hemaseg.inference.predictor import Predictor\n")
    assert _upward(_graph(fake)) == ["hemaseg.lesions -> hemaseg.inference.predictor"]
