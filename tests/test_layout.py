"""The package's layout rules: no import cycles, no reaching into another module's private names,
kernel wrappers in fastinfer.kernels behind the unchanged public names, no torch on import.

Static checks read the source with ``ast`` (every import statement counts: module level,
function level, under TYPE_CHECKING); ``from fastinfer import _C`` counts only as importing the
extension. A submodule doing ``import fastinfer`` or ``from fastinfer import name`` (name not a
submodule) imports the package's ``__init__``.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import fastinfer

ROOT = pathlib.Path(fastinfer.__file__).resolve().parent
PKG = ROOT.name


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    mods = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (f, is_pkg)
    return mods


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str | None:
    """The absolute module of a (possibly relative) ``from ... import``."""
    if not level:
        return module
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _known(name: str, mods) -> str | None:
    """The longest prefix of a dotted name that is a module of the package."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, counting every import statement anywhere."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PKG and (t := _known(alias.name, mods)):
                        graph[m].add(t)
            elif isinstance(node, ast.ImportFrom):
                t = _resolve(m, is_pkg, node.level, node.module)
                if not t or t.split(".")[0] != PKG:
                    continue
                for alias in node.names:
                    sub = f"{t}.{alias.name}"
                    if sub in mods:
                        graph[m].add(sub)
                    elif sub != f"{PKG}._C" and (tt := _known(t, mods)):
                        graph[m].add(tt)
        graph[m].discard(m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return sorted(found)


def test_cycle_finder_sees_lazy_and_package_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_kernel_layer_imports():
    """fastinfer.kernels never imports the package __init__ (nor torch at import time, see below);
    the torch custom ops import the shared kernel modules, never the flash-attn API that routes to them."""
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith(f"{PKG}.kernels"):
            assert PKG not in deps, f"{m} imports the package __init__"
    assert f"{PKG}.kernels.attention" not in graph[f"{PKG}.torch_ops"]
    for m in ("sdpa", "integrations.transformers", "torch_ops"):
        assert PKG not in graph[f"{PKG}.{m}"], f"{PKG}.{m} imports the package __init__"


def _private_uses(f: pathlib.Path, mods) -> list[str]:
    """``from fastinfer.x import _name`` and ``module._name`` on an imported package module (``_C`` aside)."""
    tree = ast.parse(f.read_text(), str(f))
    bad, bound = [], set()  # bound: local names of imported package modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PKG:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in mods:
                    bound.add(alias.asname or alias.name)
                elif alias.name.startswith("_") and alias.name != "_C":
                    bad.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            bound.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == PKG)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and node.attr != "_C":
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                bad.append(ast.unparse(node))
    return bad


def test_kernel_wrappers_use_no_private_names_of_other_modules():
    mods = _modules()
    mine = [m for m in mods if m.startswith(f"{PKG}.kernels") or m in {
        PKG, f"{PKG}.torch_ops", f"{PKG}.ops", f"{PKG}.sdpa", f"{PKG}.integrations", f"{PKG}.integrations.transformers"}]
    bad = {m: uses for m in mine if (uses := _private_uses(mods[m][0], mods))}
    assert bad == {}


def test_public_names_are_the_kernel_wrappers():
    import fastinfer.kernels.attention as attention
    import fastinfer.kernels.ops as kernel_ops
    import fastinfer.kernels.runtime as runtime

    for name in attention.__all__:
        assert getattr(fastinfer, name) is getattr(attention, name), name
    for name in kernel_ops.__all__:
        assert getattr(fastinfer.ops, name) is getattr(kernel_ops, name), name
    for name in runtime.__all__:
        assert getattr(fastinfer, name) is getattr(runtime, name), name
    assert set(fastinfer.ops.__all__) == set(kernel_ops.__all__)


def test_kernel_layer_imports_without_torch():
    script = ("import sys, importlib, pkgutil\n"
              "import fastinfer, fastinfer.kernels, fastinfer.ops\n"
              "for m in pkgutil.iter_modules(fastinfer.kernels.__path__):\n"
              "    importlib.import_module('fastinfer.kernels.' + m.name)\n"
              "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", script], check=True)
