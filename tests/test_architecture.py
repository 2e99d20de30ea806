"""The package's import rules (docs/architecture.md), read from the source with ``ast``.

1. No module imports another module's private names (``from x import _name`` or ``x._name`` on an
   imported selfrepair module); the shared low-level helper modules ``_typing``, ``_io``, ``_devices``,
   ``_version``, ``_deprecation`` are imported by name, their names are public.
2. Nothing imports up the flow: a module may import only modules of its own stage or earlier ones
   (``STAGES`` below, the same table as docs/architecture.md).
3. No import cycles between modules.
4. Imports sit at the top of a module; a function-level import is allowed only for a third-party
   module, with a comment on its line saying why (an optional or heavy dependency).

Run ``python tests/test_architecture.py PATH/TO/selfrepair`` to check another tree (e.g. an older
checkout); the test itself checks this repository's ``selfrepair``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "selfrepair"

#: stage of each top-level part of the package: a module may import its own stage and earlier ones
STAGES = {
    "_typing": 0, "_io": 0, "_devices": 0, "_version": 0, "_deprecation": 0,   # shared low-level helpers
    "models": 1,     # loading, llama2.c, model facts, probe
    "tasks": 2,      # Task, its validation, built-in tasks, JSONL, held-out text
    "training": 3,   # the shipped model's recipe (reads tasks)
    "engine": 4,     # cached run, score-ablation kernel, own forward, batched z edits
    "analysis": 5,   # GIM, closed-form rows, self-repair, attributions, estimates, faithfulness
    "report": 6,     # figures from tables
    "study": 7,      # pipeline, run folder, CLI
    "__init__": 8, "__main__": 8,   # the public API and ``python -m selfrepair``
}


#: the flat modules of 0.1.0, so that an older tree can be checked too (``python tests/test_architecture.py``)
FLAT_0_1 = {"loading": 1, "llama2c": 1, "probe": 1, "cache": 4, "ablation": 4, "gim": 5, "self_repair": 5,
            "attribution": 5, "plots": 6, "cli": 7}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path) -> dict:
    """``{dotted name: path}`` of every module under ``root`` (a ``selfrepair`` folder)."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, level: int, mod) -> str:
    if level == 0:
        return mod or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([mod] if mod else []))


def imports(name: str, path: Path, known: dict):
    """``(line, target module, imported name or None, at top level?, comment on the line?)`` per selfrepair import."""
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    top = set(id(n) for n in tree.body)
    for n in tree.body:  # imports inside a module-level if/try still count as top level
        if isinstance(n, (ast.If, ast.Try)):
            top.update(id(c) for c in ast.walk(n))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name, None, id(node) in top, "#" in lines[node.lineno - 1],
                            a.asname or a.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_pkg, node.level, node.module)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # ``from package import submodule``
                    out.append((node.lineno, sub, None, id(node) in top, "#" in lines[node.lineno - 1],
                                a.asname or a.name))
                else:
                    out.append((node.lineno, target, a.name, id(node) in top, "#" in lines[node.lineno - 1],
                                a.asname or a.name))
    return tree, out


def stage(mod: str) -> int:
    parts = mod.split(".")
    return STAGES["__init__"] if len(parts) == 1 else STAGES.get(parts[1], FLAT_0_1.get(parts[1], 8))


def check(root: Path) -> list:
    """Every violation of the four rules in the tree at ``root``, one line each."""
    known = modules(root)
    pkg = root.name
    problems, graph = [], {m: set() for m in known}
    for mod, path in known.items():
        tree, found = imports(mod, path, known)
        where = f"{path.relative_to(root.parent)}"
        module_aliases = {}
        for line, target, name, at_top, commented, alias in found:
            ours = target == pkg or target.startswith(pkg + ".")
            if not ours:
                if not at_top and not commented:
                    problems.append(f"{where}:{line}: function-level import of {target} without a comment saying why")
                continue
            if not at_top:
                problems.append(f"{where}:{line}: function-level import of {target} (move it to the top)")
            if name is None:
                module_aliases[alias] = target
            elif name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                problems.append(f"{where}:{line}: imports the private name {name} of {target}")
            if target in known and target != mod:
                graph[mod].add(target)
                if stage(target) > stage(mod):
                    problems.append(f"{where}:{line}: {mod} (stage {stage(mod)}) imports {target} "
                                    f"(stage {stage(target)}), up the flow")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{where}:{node.lineno}: uses the private name {node.attr} of "
                                f"{module_aliases[node.value.id]}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return list(dict.fromkeys(problems))  # one line per problem (``from x import a, b`` repeats it)


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_part_has_a_stage():
    parts = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in PKG.rglob("*.py")}
    assert parts <= set(STAGES), f"parts without a stage in STAGES: {sorted(parts - set(STAGES))}"


def test_import_rules():
    problems = check(PKG)
    assert not problems, "\n".join(problems)


def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        p = root / "selfrepair" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "selfrepair"


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    """Each rule on a tiny planted package: the checker must report exactly the planted problems."""
    root = _write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/probe.py": "from ..engine.cache import run\n_SECRET = 1\n",        # up the flow + cycle
        "engine/__init__.py": "",
        "engine/cache.py": "from ..models.probe import _SECRET\nfrom ..models import probe\n"
                           "def run():\n    import numpy\n    from ..models import probe\n    return probe._SECRET\n",
    })
    problems = check(root)
    text = "\n".join(problems)
    assert "imports the private name _SECRET of selfrepair.models.probe" in text
    assert "uses the private name _SECRET of selfrepair.models.probe" in text
    assert "selfrepair.models.probe (stage 1) imports selfrepair.engine.cache (stage 4), up the flow" in text
    assert "import cycle: selfrepair.engine.cache -> selfrepair.models.probe" in text
    assert "function-level import of numpy without a comment" in text
    assert "function-level import of selfrepair.models (move it to the top)" in text or \
           "function-level import of selfrepair.models.probe (move it to the top)" in text
    assert len(problems) == 6, text


if __name__ == "__main__":
    found = check(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PKG)
    print("\n".join(found) or "no violations")
    print(f"{len(found)} violation(s)")
    sys.exit(1 if found else 0)
