"""The house reads top-down: cli -> sweep -> train/evaluate/checkpoint -> sae/config -> data/cache -> errors.
No import cycle (function-level imports included) and no import of a higher layer; the sweep's
non-Ray commands do not load Ray."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "msae"

# layer of each module (a prefix names a package and everything in it); a module may import its own layer
# or lower ones, never a higher one
LAYERS = [
    (0, ("msae.errors", "msae.version", "msae.atomic", "msae.arrays", "msae.plotting")),
    (1, ("msae.cache", "msae.data", "msae.labels", "msae.synthetic", "msae.importers", "msae.extract")),
    (2, ("msae.config", "msae.sae", "msae.losses", "msae.metrics", "msae.preprocess", "msae.pareto")),
    (3, ("msae.train", "msae.evaluate", "msae.checkpoint", "msae.reference", "msae.interpret")),
    (4, ("msae.sweep",)),
    (5, ("msae.cli",)),
]


def _layer(module: str) -> int:
    if module == "msae":
        return 6  # the package root: the public facade (msae.load)
    for layer, names in LAYERS:
        if any(module == n or module.startswith(n + ".") for n in names):
            return layer
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """msae modules imported anywhere in ``path`` (``from msae import atomic`` is msae.atomic)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("msae")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("msae"):
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m in modules} - {name}


def test_imports_go_down_only_and_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [(a, b) for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, f"imports of a higher layer: {upward}"
    # Tarjan's strongly connected components: every one must be a single module
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_commands_without_ray_do_not_import_ray():
    code = ("import sys; import msae.sweep.runner, msae.sweep.tracking, msae.sweep.fronts, msae.cli; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
