"""The import graph of ``normswap/`` (every ``import`` statement, module level or inside a function,
read from the AST) has no cycle, and every module imports only its own layer or the layers below:

    foundation  errors, reasons, arith, registry, norms, layers, norm ops, reports, outputs, io, data,
                the onnxruntime layer
    views       graph (FX regions), views/* (FX, ATen, TorchScript views)
    planning    fold.rules, fold.planner, the appliers, the bake, the verification
    jobs        audit, fold (the job), convert, export, check, locate, html_report

Importing ``a.b.c`` runs the ``__init__`` of ``a.b``: that counts as an import of ``a.b`` for a
module outside that package.  See ``notes/LAYERS.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "normswap"

LAYERS = {
    "foundation": ["normswap.errors", "normswap.reasons", "normswap.arith", "normswap.shapes", "normswap.report",
                   "normswap.registry", "normswap.reparams", "normswap.library_norms", "normswap.layers",
                   "normswap.norms", "normswap.norm_ops", "normswap.ort", "normswap.onnx_utils", "normswap.outputs",
                   "normswap.claims", "normswap.journal",
                   "normswap.recipe", "normswap.io", "normswap.save", "normswap.dataset", "normswap.data", "normswap.images", "normswap.preprocess",
                   "normswap.inputs",
                   "normswap.html_plots"],
    "views": ["normswap.graph", "normswap.views"],
    "planning": ["normswap.fold.rules", "normswap.fold.planner", "normswap.fold.apply_eager",
                 "normswap.fold.apply_program", "normswap.fold.bake", "normswap.fold.verify", "normswap.fold.report",
                 "normswap.fold.arith"],
    "jobs": ["normswap.fold", "normswap.audit", "normswap.convert", "normswap.export", "normswap.check",
             "normswap.locate", "normswap.locate_map", "normswap.locate_report", "normswap.html_report", "normswap.check_report", "normswap.export_backends",
             "normswap.check_inputs"],
    "top": ["normswap"],
}
ORDER = list(LAYERS)


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer_of(mod: str) -> str:
    best, layer = "", None
    for name, prefixes in LAYERS.items():
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > len(best):
                best, layer = pre, name
    assert layer is not None, f"{mod} is in no layer: add it to LAYERS (and notes/LAYERS.md)"
    return layer


def _targets(mod: str, node, mods: dict) -> list[str]:
    is_pkg = mods[mod].name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            prefix = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    out = []
    for n in names:
        while n and n not in mods:
            n = n.rpartition(".")[0]
        if not n or n == mod or not n.startswith("normswap"):
            continue
        out.append(n)
        parent = n.rpartition(".")[0]
        while parent and parent != "normswap":  # the package __init__s the import runs
            if not (mod == parent or mod.startswith(parent + ".")):
                out.append(parent)
            parent = parent.rpartition(".")[0]
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[m].update(t for t in _targets(m, node, mods) if t != m)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_go_only_downward():
    bad = []
    for m, targets in import_graph().items():
        for t in targets:
            if ORDER.index(layer_of(t)) > ORDER.index(layer_of(m)):
                bad.append(f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})")
    assert bad == []


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
