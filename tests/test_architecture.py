"""The house's rooms and who may import whom (docs/architecture.md), read from the source by AST.

Every import of ``src/sparsevid`` counts: module level and inside functions, relative and absolute, and a module
named to ``importlib.import_module`` (a string literal that is a module's whole dotted name, or an f-string whose
leading text is a package). The library is cut into layers, lowest first; a module may import its own layer and
the layers below. The lab and the decoder product may import the library; the library imports neither, and the
lab does not import the decoder. The few edges that cross on purpose are declared below by name.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "sparsevid"

# The library's layers, lowest first. A name covers the module and everything under it (a package's modules);
# the most specific name wins. config and cluster_plan are the two root modules planned beside these.
LAYERS = [
    ("plan data", ["sparsevid.layout", "sparsevid.plan", "sparsevid.token_plan", "sparsevid.cluster_plan"]),
    ("backend registry", ["sparsevid.backends"]),
    ("kernels", ["sparsevid.kernels", "sparsevid.tail"]),
    ("execution", ["sparsevid.attention"]),
    ("planners", ["sparsevid.planners"]),
    ("parallel", ["sparsevid.parallel"]),
    ("integration", ["sparsevid.integrations", "sparsevid.reuse", "sparsevid.config"]),
    ("package face", ["sparsevid"]),  # sparsevid/__init__.py
]
LAB, DECODER, ENTRY = "sparsevid.lab", "sparsevid.decoder", "sparsevid.__main__"

# (importer, imported): the edges that cross a rule on purpose.
DECLARED = {
    # python -m sparsevid: the entry point is the lab's command line
    ("sparsevid.__main__", "sparsevid.lab.cli"),
    # from sparsevid import testbed (DESIGN.md): a lazy re-export in the package's __getattr__
    ("sparsevid", "sparsevid.lab.testbed"),
    # the backend registry imports the built-in backends' modules under kernels/ once, at its first use
    ("sparsevid.backends", "sparsevid.kernels"),
    # check_settings (apply time, no tensors) reads a tail= value exactly as the call will, inside the function
    ("sparsevid.backends", "sparsevid.tail"),
    # python -m sparsevid bench decode: the command line names the decoder's benchmark, imported when the
    # parser is built
    ("sparsevid.lab.cli", "sparsevid.decoder.bench"),
    # the decoder's tools use the lab's tools: its test model trains on the lab's clips, its benchmark
    # records like every benchmark (argument checks, BENCHMARKS.md rows)
    ("sparsevid.decoder.train", "sparsevid.lab.data"),
    ("sparsevid.decoder.bench", "sparsevid.lab.bench.common"),
}
# import_module calls whose target the source does not spell (the names they are given are literals elsewhere)
DYNAMIC = {"sparsevid.lab.cli"}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(src: Path) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted((src / ROOT_PACKAGE).rglob("*.py"))}


def _target(name: str, modules) -> str | None:
    """The known module ``name`` is, or the nearest package above it (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(src: Path = SRC) -> tuple[dict[str, set[str]], list[str]]:
    """``{module: modules of the package it imports}`` read from the source under ``src``, and the dynamic
    imports whose target the source does not spell."""
    modules = _modules(src)
    graph, dynamic = {}, []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    node_module = ".".join(base + ([node.module] if node.module else []))
                else:
                    node_module = node.module
                # `from P import m`: the module P.m where m is one, else P
                found.update(f"{node_module}.{a.name}" if f"{node_module}.{a.name}" in modules else node_module
                             for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                    and node.value in modules:
                found.add(node.value)  # a submodule named by its whole dotted name, for importlib
            elif isinstance(node, ast.Call) and _is_import_call(node) and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.JoinedStr):
                    prefix = _leading_text(arg, name)
                    if prefix.startswith(ROOT_PACKAGE):
                        found.add(prefix.rstrip("."))
                    else:
                        dynamic.append(name)
                elif not isinstance(arg, ast.Constant):
                    dynamic.append(name)
        graph[name] = {t for t in (_target(f, modules) for f in found if f.split(".")[0] == ROOT_PACKAGE)
                       if t is not None and t != name}
    return graph, dynamic


def _is_import_call(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


def _leading_text(s: ast.JoinedStr, module: str) -> str:
    """The text an f-string starts with, ``{__name__}`` read as ``module``, up to its first other field."""
    text = ""
    for part in s.values:
        if isinstance(part, ast.Constant):
            text += part.value
        elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id == "__name__":
            text += module
        else:
            break
    return text


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def room(name: str) -> tuple[str, int]:
    """(room, layer index): a library layer, or ``lab`` / ``decoder`` / ``entry`` (index -1)."""
    for product in (LAB, DECODER):
        if _within(name, product):
            return product.rpartition(".")[2], -1
    if name == ENTRY:
        return "entry", -1
    best = None
    for i, (layer, names) in enumerate(LAYERS):
        for n in names:
            # "sparsevid" (the package face) covers only sparsevid/__init__.py itself
            if (name == n if n == ROOT_PACKAGE else _within(name, n)) and (best is None or len(n) > len(best[2])):
                best = (layer, i, n)
    if best is None:
        raise LookupError(name)
    return best[0], best[1]


def violations(src: Path = SRC) -> list[str]:
    """Every import that breaks a rule and is not declared, as ``importer -> imported: why``."""
    graph, dynamic = imports(src)
    found = [f"{m}: an import_module whose target the source does not spell (declare it in DYNAMIC)"
             for m in dynamic if m not in DYNAMIC]
    for importer, targets in sorted(graph.items()):
        try:
            src_room, src_layer = room(importer)
        except LookupError:
            found.append(f"{importer}: in no layer (give it one in LAYERS and docs/architecture.md)")
            continue
        for imported in sorted(targets):
            if any(importer == a and _within(imported, b) for a, b in DECLARED):
                continue
            try:
                dst_room, dst_layer = room(imported)
            except LookupError:
                continue  # reported once, as an importer
            if src_room in ("lab", "decoder", "entry"):
                if src_room == "lab" and dst_room == "decoder":
                    found.append(f"{importer} -> {imported}: the lab imports the decoder product")
                elif src_room == "decoder" and dst_room == "lab":
                    found.append(f"{importer} -> {imported}: the decoder product imports the lab")
                elif src_room == "entry" and dst_room in ("lab", "decoder"):
                    found.append(f"{importer} -> {imported}: the entry point reaches past the command line")
            elif dst_room in ("lab", "decoder", "entry"):
                found.append(f"{importer} -> {imported}: the library ({src_room}) imports the {dst_room}")
            elif dst_layer > src_layer:
                found.append(f"{importer} -> {imported}: up from layer '{src_room}' to '{dst_room}'")
    return found


def test_the_import_graph_keeps_the_layers():
    graph, _ = imports()
    assert {"sparsevid.lab.cli", "sparsevid.decoder.fastcar", "sparsevid.plan"} <= set(graph)  # it read the tree
    assert "sparsevid.kernels.csr" in graph["sparsevid.parallel.ring"]  # and the imports in it
    assert violations() == []


def test_every_declared_exception_is_still_an_edge():
    """A declaration that no import uses any more is dead: remove it."""
    graph, _ = imports()
    for importer, imported in DECLARED:
        assert any(_within(t, imported) for t in graph.get(importer, ())), (importer, imported)


def _plant(tmp_path: Path, plants: dict[str, str]) -> Path:
    """A copy of the source tree (Python files only) with ``plants[module]`` appended to each module named."""
    src = tmp_path / "src"
    shutil.copytree(SRC / ROOT_PACKAGE, src / ROOT_PACKAGE, ignore=lambda d, names: [
        n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir() or n == "__pycache__"])
    for relative, code in plants.items():
        with open(src / ROOT_PACKAGE / relative, "a") as f:
            f.write("\n" + code + "\n")
    return src


def test_a_planted_bad_import_is_reported(tmp_path):
    plants = {  # module: (code appended, what the report must say)
        "layout.py": ("def _f():\n    from .lab import eval",
                      "sparsevid.layout -> sparsevid.lab.eval: the library (plan data) imports the lab"),
        "plan.py": ("from .kernels.reference import sparse_attention_reference",
                    "sparsevid.plan -> sparsevid.kernels.reference: up from layer 'plan data' to 'kernels'"),
        "kernels/pooling.py": ("import sparsevid.planners.draft",
                               "sparsevid.kernels.pooling -> sparsevid.planners.draft: up from layer 'kernels' to "
                               "'planners'"),
        "attention.py": ("import importlib\nimportlib.import_module('sparsevid.decoder.fastcar')",
                         "sparsevid.attention -> sparsevid.decoder.fastcar: the library (execution) imports the "
                         "decoder"),
        "reuse/dit.py": ("def _g():\n    from ..decoder import fastcar",
                         "sparsevid.reuse.dit -> sparsevid.decoder.fastcar: the library (integration) imports the "
                         "decoder"),
        "lab/eval.py": ("def _h():\n    from ..decoder.train import load_model",
                        "sparsevid.lab.eval -> sparsevid.decoder.train: the lab imports the decoder product"),
        "decoder/fastcar.py": ("from ..lab import viz",
                               "sparsevid.decoder.fastcar -> sparsevid.lab.viz: the decoder product imports the lab"),
        "tail.py": ("import importlib\nimportlib.import_module(f'sparsevid.parallel.{1}')",
                    "sparsevid.tail -> sparsevid.parallel: up from layer 'kernels' to 'parallel'"),
        "spare.py": ("from . import layout",  # a new root module
                     "sparsevid.spare: in no layer (give it one in LAYERS and docs/architecture.md)"),
    }
    found = violations(_plant(tmp_path, {module: code for module, (code, _) in plants.items()}))
    assert sorted(found) == sorted(expected for _, expected in plants.values())  # each plant, and nothing else


def test_the_package_root_holds_few_modules():
    root = sorted(p.name for p in (SRC / ROOT_PACKAGE).glob("*.py"))
    assert {"__init__.py", "__main__.py"} <= set(root)
    others = [n for n in root if n not in ("__init__.py", "__main__.py")]
    assert len(others) <= 8, others


def test_importing_the_library_loads_neither_the_lab_nor_the_decoder_and_its_lazy_exports_resolve():
    code = ("import importlib.util, sys, torch, sparsevid as sv\n"
            "q = torch.randn(1, 1, 64, 16)\n"
            "layout = sv.VideoLayout(1, 8, 8, tile=(8, 8), block_size=64)\n"
            "sv.sparse_attention(q, q, q, sv.plan(q, q, layout, method='draft', density=0.5))\n"
            "if importlib.util.find_spec('diffusers'):\n"
            "    sv.apply  # the diffusers adapter\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sparsevid.lab', 'sparsevid.decoder'))))\n"
            "from sparsevid import testbed\n"  # the lazy exports resolve in a fresh interpreter
            "print(sv.reuse.TokenReplay.__name__, testbed.load_pipeline.__name__)")
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "TokenReplay load_pipeline"]
