"""The package's import rules, read from the source with ``ast`` (imports inside functions count too):

- layers: core (onnxqf.graph, maths, recognize, lowering, calib, runtime, genai, plan, options, ...) <- passes
  (onnxqf.passes) <- pipeline (onnxqf.pipeline, onnxqf.analysis, onnxqf.models) <- cli; no module imports a
  higher layer;
- no import cycle between modules;
- no module, script or test imports a private name (``_x``) from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"onnxqf": "onnxqf", "passes": "onnxqf.passes", "models": "onnxqf.models"}
LAYERS = {"core": 0, "passes": 1, "pipeline": 2, "cli": 3}


def layer_of(module: str) -> str:
    if module == "onnxqf.cli":
        return "cli"
    if module == "onnxqf.pipeline" or module.startswith(("onnxqf.analysis", "onnxqf.models")):
        return "pipeline"
    if module.startswith("onnxqf.passes"):
        return "passes"
    return "core"


def library_modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports_of(path: Path, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def resolve(target: str, names: list[str], modules: dict) -> list[str]:
    """The library modules an import statement loads: ``from pkg import mod`` names a module too."""
    found = [target] if target in modules else []
    found += [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return found


def graph() -> dict[str, set[str]]:
    modules = library_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in imports_of(path, module, path.name == "__init__.py"):
            for dep in resolve(target, names, modules):
                if dep != module and not module.startswith(dep + "."):  # a package's own __init__ is not an edge
                    edges[module].add(dep)
    return edges


def test_layers_point_down():
    bad = []
    for module, deps in graph().items():
        for dep in deps:
            if LAYERS[layer_of(dep)] > LAYERS[layer_of(module)]:
                bad.append(f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_imports_across_modules():
    modules = library_modules()
    files = dict(modules)
    for folder in ("scripts", "tests", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[f"{folder}/{path.relative_to(ROOT / folder)}"] = path
    bad = []
    for module, path in files.items():
        for target, names, line in imports_of(path, module, path.name == "__init__.py"):
            if not target.startswith("onnxqf") or target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
    assert not bad, "\n".join(bad)


def _declared_all(path: Path) -> list[str] | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def test_every_module_declares_its_public_names():
    """Each library module has ``__all__``; every name in it exists, and what other modules, scripts and tests import
    from a module is in its ``__all__`` (or is a submodule of a package)."""
    modules = library_modules()
    declared = {}
    bad = []
    for module, path in modules.items():
        names = _declared_all(path)
        if path.name == "__init__.py":
            continue
        if names is None:
            bad.append(f"{path.relative_to(ROOT)}: no __all__")
            continue
        namespace = {n.name for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                namespace |= {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                              if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                namespace |= {(a.asname or a.name).split(".")[0] for a in node.names}
        bad += [f"{path.relative_to(ROOT)}: __all__ names {n}, which it does not define"
                for n in names if n not in namespace]
        declared[module] = set(names)
    files = dict(modules)
    for folder in ("scripts", "tests", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[f"{folder}/{path.relative_to(ROOT / folder)}"] = path
    for module, path in files.items():
        for target, names, line in imports_of(path, module, path.name == "__init__.py"):
            if target in declared and target != module:
                missing = [n for n in names if n not in declared[target] and f"{target}.{n}" not in modules]
                bad += [f"{path.relative_to(ROOT)}:{line} imports {n} from {target}, not in its __all__"
                        for n in missing]
    assert not bad, "\n".join(bad)


def test_the_checks_see_the_package():
    """The rules above would pass vacuously on an empty walk: the graph holds the modules and their imports."""
    edges = graph()
    assert {"onnxqf.cli", "onnxqf.pipeline", "onnxqf.passes.quantize", "onnxqf.lowering.w8a8"} <= set(edges)
    assert "onnxqf.lowering.base" in edges["onnxqf.passes.quantize"]
    assert layer_of("onnxqf.models.export") == "pipeline" and layer_of("onnxqf.graph.edit") == "core"
