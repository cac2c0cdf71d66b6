"""The package's import graph has no cycle, counting imports inside functions too: a cycle that a deferred import
hides today breaks the day someone moves that import to the top of its module. The one exception is a module's
``__getattr__`` (PEP 562): a lazy attribute for an optional dependency, which by design never moves to the top
(``hf.UnlearningTrainer``, which needs transformers' Trainer)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules(root: pathlib.Path, package: str) -> dict:
    """{dotted name: (path, is a package)} of every module under ``root/package``."""
    out = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(root: pathlib.Path, package: str) -> dict:
    """{module: modules it imports}, within ``package``. ``from a import b`` counts b when b is a module, a when
    some name is not; importing a.b.c also runs the packages a and a.b unless the importer lies inside them."""
    mods = modules(root, package)
    graph = {}
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
        skipped = {id(n) for f in lazy for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets.update(subs)
                if len(subs) < len(node.names):
                    targets.add(target)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in mods and not (name == prefix or name.startswith(prefix + ".")):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph: dict) -> list | None:
    """One cycle of ``graph`` as [m0, m1, ..., m0], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_package_imports_have_no_cycle():
    graph = import_graph(ROOT, "geffect_kernels")
    assert "geffect_kernels.geffect.profiler" in graph and graph["geffect_kernels.geffect.profiler"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_a_cycle_through_a_deferred_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"], ["pkg.a", "pkg.sub.b", "pkg.a"])
    (pkg / "a.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
