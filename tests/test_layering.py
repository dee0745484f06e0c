"""The house's import structure, read from the source (every import statement, lazy ones
inside functions included): the core (attnrl/) imports nothing above it (trainers/,
rewards/, TRL), and no module of attnrl/, trainers/ or rewards/ reaches itself again through
its imports (no import circle). Also the house's size rule: no module of attnrl/ or
trainers/ is longer than MAX_LINES lines (split a longer one by concern)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("attnrl", "trainers", "rewards")
ABOVE_CORE = ("trainers", "rewards", "trl")
MAX_LINES = 600
SIZE_RULED = ("attnrl", "trainers")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imported(path: Path) -> list[str]:
    """Every absolute import target of a file: 'a.b' for `import a.b`, 'a.b' and 'a.b.c'
    for `from a.b import c`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.split(".")[0] == "attnrl"))
def test_core_module_imports_nothing_above_it(name):
    bad = sorted({n for n in _imported(MODULES[name]) if n.split(".")[0] in ABOVE_CORE})
    assert not bad, f"{name} imports {bad}"


def _graph() -> dict[str, set[str]]:
    def owner(target):
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in map(owner, _imported(path)) if m and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_is_longer_than_the_house_limit():
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines())
               for package in SIZE_RULED for path in sorted((REPO / package).rglob("*.py"))}
    assert len(lengths) > 50, "the size rule found too few modules to check"
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"
