"""The import graph of spvit and spvit_kernels, read with ast (not by importing): the layers kernels <- models <-
pipeline <- cli, no cycles, no import of the packages' own modules inside a function."""
import ast
import os

import pytest

from .pipeline_helpers import repo_root

PACKAGES = ("spvit", "spvit_kernels")
COMPILED = {"spvit_kernels._C"}  # the optional compiled extension: loaded on first use, not a Python module here
LAYERS = ("kernels", "base", "models", "pipeline", "cli")

# Edges against the layer order that exist today, each with its reason; a new one fails the test.
KNOWN_LAYER_EXCEPTIONS = {
    ("spvit.deploy", "spvit.checkpoints"): "deploy_checkpoint reads a fine-tune run's checkpoint (the pipeline's format)",
}

# Modules that import their own package inside a function, each with its reason; no other module may.
KNOWN_FUNCTION_IMPORTS = {
    "spvit.cli_entry": "a command's modules (torch, timm) are imported only when it runs (--version, --help: at once)",
}


def _modules():
    mods = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(repo_root(), pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, repo_root())[:-3].replace(os.sep, ".")
                    mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def _resolve(name, mods):
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(name, path, mods):
    """(target module, line, inside a function?) for every import of a module of the packages in ``path``."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    tree = ast.parse(open(path).read())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                mod = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES and t not in COMPILED:
                out.append((_resolve(t, mods), node.lineno, id(node) in in_function))
    return out


# The models layer: what a model of each phase is (search, pruned, deployed), its families, its architecture record,
# gates and FLOPs; the pipeline (training, search, latency, runs, CLI helpers) builds on it.
# The base layer: the package's utilities that import no module of spvit (versions, safe file writes, timers).
BASE_MODULES = ("spvit._version", "spvit.options", "spvit.runs", "spvit.interrupts", "spvit.timing")
MODEL_MODULES = ("spvit.choices", "spvit.arch", "spvit.gates", "spvit.flops", "spvit.deploy", "spvit.deployed",
                 "spvit.deploy_swin")


def layer(module):
    """The layer of a module: kernels (spvit_kernels) <- base (BASE_MODULES) <- models (spvit.models, spvit.families
    and MODEL_MODULES) <- pipeline (the rest of spvit) <- cli (spvit.cli, spvit.cli_*, spvit.__main__)."""
    if module.split(".")[0] == "spvit_kernels":
        return 0
    if module in BASE_MODULES:
        return 1
    if module.startswith(("spvit.models", "spvit.families")) or module in MODEL_MODULES:
        return 2
    last = module.rsplit(".", 1)[-1]
    if module == "spvit.__main__" or last == "cli" or last.startswith("cli_"):
        return 4
    return 3


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, mods) for m, p in mods.items()}


def test_layers_of_the_modules():
    assert [layer(m) for m in ("spvit_kernels.ops", "spvit.models.pruned", "spvit.engine", "spvit", "spvit.cli",
                               "spvit.cli_parser", "spvit.__main__", "spvit.runs", "spvit.deploy")] == [0, 2, 3, 3, 4, 4, 4, 1, 2]


def test_imports_follow_the_layer_order():
    mods, graph = _graph()
    assert "spvit.engine" in graph and "spvit_kernels.ops" in graph
    seen, bad = set(), []
    for m, edges in graph.items():
        for t, line, _ in edges:
            if layer(t) > layer(m):
                if (m, t) in KNOWN_LAYER_EXCEPTIONS:
                    seen.add((m, t))
                else:
                    bad.append(f"{m}:{line} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})")
    assert not bad, "imports against the layer order: " + "; ".join(bad)
    stale = sorted(set(KNOWN_LAYER_EXCEPTIONS) - seen)
    assert not stale, f"known exceptions that no longer occur (remove them): {stale}"


def test_no_import_cycles():
    _, graph = _graph()
    deps = {m: sorted({t for t, *_ in edges if t != m}) for m, edges in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in deps.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_of_the_packages_inside_a_function():
    _, graph = _graph()
    found = {m for m, edges in graph.items() if any(inside for *_, inside in edges)}
    bad = sorted(f"{m}:{line} imports {t}" for m, edges in graph.items() if m not in KNOWN_FUNCTION_IMPORTS
                 for t, line, inside in edges if inside)
    assert not bad, "imports inside functions hide the module's real dependencies: " + "; ".join(bad)
    stale = sorted(set(KNOWN_FUNCTION_IMPORTS) - found)
    assert not stale, f"known exceptions that no longer occur (remove them): {stale}"


def test_training_layer_flows_one_way():
    _, graph = _graph()
    deps = {m: {t for t, *_ in edges} for m, edges in graph.items()}
    for low in ("spvit.runs", "spvit.interrupts", "spvit.config", "spvit.distributed", "spvit.optim", "spvit.hub",
                "spvit.checkpoints", "spvit.engine"):
        assert not deps[low] & {"spvit.search", "spvit.finetune", "spvit.demo", "spvit.compress", "spvit.cli"}, low
    assert deps["spvit.runs"] <= set(), deps["spvit.runs"]  # the run machinery imports nothing of the package
    assert deps["spvit.interrupts"] <= set(), deps["spvit.interrupts"]
    assert "spvit.search" not in deps["spvit.finetune"] and "spvit.demo" not in deps["spvit.engine"]


TRAINING_LAYER = ("spvit.cli", "spvit.cli_parser", "spvit.config", "spvit.runs", "spvit.interrupts", "spvit.engine",
                  "spvit.distributed", "spvit.optim", "spvit.hub", "spvit.checkpoints", "spvit.search",
                  "spvit.finetune", "spvit.demo", "spvit.compress", "spvit.compress_plan", "spvit.data",
                  "spvit.distill", "spvit.plots", "spvit.timing", "spvit.models.registry")


# Phrases that would cite a document outside the repository (assembled here so that this file does not cite it).
FOREIGN_CITATIONS = ["spec" + " §", "(spec ", "shared" + "/docs", "spvit-" + "algorithm.md", "quirk Q"]


@pytest.mark.parametrize("text", FOREIGN_CITATIONS)
def test_training_layer_cites_only_the_repository_docs(text):
    hits = [m for m, p in _modules().items() if m in TRAINING_LAYER and text in open(p).read()]
    hits += [f for f in os.listdir(os.path.join(repo_root(), "configs")) if text in
             open(os.path.join(repo_root(), "configs", f)).read()]
    assert not hits, hits
