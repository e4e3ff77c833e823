"""The package's import graph (read with ast, not by importing): no cycles, no function-level `import spvit`."""
import ast
import os

import pytest

from .pipeline_helpers import repo_root

PKG = os.path.join(repo_root(), "spvit")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, repo_root())[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                mods[name] = path
    return mods


def _imports(name, path, mods):
    """(target module, line, at module level?) for every import of a spvit module in ``path``."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rsplit(".", 1)[0]
    tree = ast.parse(open(path).read())
    top = set(id(n) for n in tree.body)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "spvit" or a.name.startswith("spvit."):
                    out.append((a.name if a.name in mods else "spvit", node.lineno, id(node) in top, a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == "spvit" or mod.startswith("spvit.")):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                target = sub if sub in mods else mod
                out.append((target, node.lineno, id(node) in top, mod))
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: sorted({t for t, *_ in _imports(m, p, mods) if t != m}) for m, p in mods.items()}
    assert "spvit.runs" in graph and "spvit.engine" in graph
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_training_layer_flows_one_way():
    mods = _modules()
    deps = {m: {t for t, *_ in _imports(m, p, mods)} for m, p in mods.items()}
    for low in ("spvit.runs", "spvit.config", "spvit.engine"):
        assert not deps[low] & {"spvit.search", "spvit.finetune", "spvit.demo", "spvit.cli"}, low
    assert deps["spvit.runs"] <= set(), deps["spvit.runs"]  # the run machinery imports nothing of the package
    assert "spvit.search" not in deps["spvit.finetune"] and "spvit.demo" not in deps["spvit.engine"]


def test_no_function_level_import_of_the_package():
    mods = _modules()
    bad = [f"{m}:{line}" for m, p in mods.items() for t, line, top, raw in _imports(m, p, mods)
           if raw == "spvit" and not top and t == "spvit"]
    assert not bad, f"function-level `import spvit` in {bad}"


TRAINING_LAYER = ("spvit.cli", "spvit.config", "spvit.runs", "spvit.engine", "spvit.search", "spvit.finetune",
                  "spvit.demo", "spvit.data", "spvit.distill", "spvit.plots", "spvit.models.registry")


# Phrases that would cite a document outside the repository (assembled here so that this file does not cite it).
FOREIGN_CITATIONS = ["spec" + " §", "(spec ", "shared" + "/docs", "spvit-" + "algorithm.md", "quirk Q"]


@pytest.mark.parametrize("text", FOREIGN_CITATIONS)
def test_training_layer_cites_only_the_repository_docs(text):
    hits = [m for m, p in _modules().items() if m in TRAINING_LAYER and text in open(p).read()]
    hits += [f for f in os.listdir(os.path.join(repo_root(), "configs")) if text in
             open(os.path.join(repo_root(), "configs", f)).read()]
    assert not hits, hits
