"""The house rules of the layout: imports run one way, no cycles, every module imports alone.

The graph is read with ``ast`` from the source (every ``import``, at the top or inside a
function), so a cycle hidden in a function body counts too.
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_core", "kernels")

# Lowest first. A module may import its own layer or a lower one, never a higher one:
# cli -> pipeline -> presets -> phases -> ppo -> (models, data, checkpoint, distributed, ...) -> kernels.
LAYERS = [
    ("kernels",),
    ("rlhf_core.errors", "rlhf_core.config_base", "rlhf_core.config_common", "rlhf_core.config_ppo",
     "rlhf_core.config"),
    ("rlhf_core.distributed", "rlhf_core.fsdp", "rlhf_core.checkpoint", "rlhf_core.tracking", "rlhf_core.report",
     "rlhf_core.optim", "rlhf_core.models", "rlhf_core.weights", "rlhf_core.data", "rlhf_core.user_code",
     "rlhf_core.checks", "rlhf_core.trackers", "rlhf_core.signals", "rlhf_core.precision"),
    ("rlhf_core.ppo", "rlhf_core"),  # the package itself re-exports the functional core
    ("rlhf_core.phases", "rlhf_core.testing"),
    ("rlhf_core.presets",),
    ("rlhf_core.pipeline",),
    ("rlhf_core.cli", "rlhf_core.__main__"),
]
# The functional core's math: plain tensors in and out, nothing imported but torch and each other.
MATH = ("rlhf_core.ppo.advantages", "rlhf_core.ppo.rewards", "rlhf_core.ppo.losses", "rlhf_core.ppo.utils",
        "rlhf_core.ppo.experience", "rlhf_core.ppo.buffer", "rlhf_core.ppo.correction")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return found


MODULES = modules()


def imported(name: str) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party packages) that module ``name`` imports anywhere."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top not in PACKAGES:
                theirs.add(top)
                continue
            while target not in MODULES:
                target = target.rpartition(".")[0]
            if target != name:
                ours.add(target)
    return ours, theirs


GRAPH = {name: imported(name)[0] for name in MODULES}


def layer(name: str) -> int:
    """The layer of the longest prefix of ``name`` listed in LAYERS."""
    best = max((len(p), i) for i, group in enumerate(LAYERS) for p in group if name == p or name.startswith(p + "."))
    return best[1]


def test_every_module_has_a_layer():
    assert all(layer(name) >= 0 for name in MODULES)


def test_imports_run_one_way():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, deps in GRAPH.items() for b in deps
              if layer(b) > layer(a) and not a.startswith(b + ".")]  # a package's own __init__ is not upward
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a list of modules (empty when it is acyclic); a module's import of the
    package it lives in (its ``__init__``, which Python runs first anyway) is not an edge."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(v: str) -> list[str]:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if v.startswith(w + "."):
                continue
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = 2
        return []

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return []


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "a.x": {"a"}}) == []


def test_math_modules_import_only_torch():
    for name in MATH:
        ours, theirs = imported(name)
        assert theirs <= {"torch", "__future__", "typing", "dataclasses", "math"}, (name, theirs)
        assert ours <= set(MATH), (name, ours)


def test_kernels_never_import_rlhf_core():
    assert not [(a, b) for a, deps in GRAPH.items() if a.startswith("kernels") for b in deps
                if b.startswith("rlhf_core")]


def test_every_module_imports_alone():
    """Each module imported with no other project module loaded before it (one fresh interpreter;
    the project's modules are dropped from sys.modules between imports, third-party ones kept), so
    none relies on a sibling having been imported first."""
    names = sorted(n for n in MODULES if n != "rlhf_core.__main__")  # __main__ runs the CLI
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('rlhf_core', 'kernels')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
