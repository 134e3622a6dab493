"""The package's layering, kept by a test: every import in dpo_hpc points down (or within its own
unit), no unit imports another's private names, and no module import cycle exists.

Layers, bottom to top (a unit may import any unit listed before it):
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = [
    ("dpo_hpc", "dpo_hpc.fsutil", "dpo_hpc.filelock"),  # the version, durable writes, lock files
    ("dpo_hpc.config",),               # typed sections, the algorithm registry, loading (no torch)
    ("dpo_hpc.experiment",),           # experiment files and their pure expansion (no torch)
    ("dpo_hpc.data",),                 # sources, parsing, tokenization, collation, sampler
    ("dpo_hpc.tiny_model",),           # the offline test model
    ("dpo_hpc.algorithms",),           # math, beta policies, objectives (collectives passed in)
    ("dpo_hpc.runtime",),              # process group, collectives, stop signal
    ("dpo_hpc.checkpoint",),           # run directory, checkpoint layout, checkpointer
    ("dpo_hpc.trainers",),             # engine, Trainer, metrics, the original API
    ("dpo_hpc.evaluate",),             # the verifiable benchmark's scorer
    ("dpo_hpc.pairs",),                # on-policy preference pairs: sample, judge, keep the extremes
    ("dpo_hpc.scoreboard",),           # tables and plots of evaluate stages
    ("dpo_hpc.launch",),               # Slurm and local submission, job states, the array task
    ("dpo_hpc.submit", "dpo_hpc.status", "dpo_hpc.report", "dpo_hpc.prefetch", "dpo_hpc.reference",
     "dpo_hpc.cancel"),  # experiment commands
    ("dpo_hpc.cli",),                  # dpo-hpc: train, validate, and the experiment commands
    ("dpo_hpc.__main__",),
]
__doc__ += "\n".join(f"  {i}. {', '.join(units)}" for i, units in enumerate(LAYERS))


def unit_of(module: str) -> str:
    """The longest declared unit that contains the module."""
    units = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    assert units, f"{module} belongs to no layer: add it to LAYERS"
    return max(units, key=len)


def rank_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def module_sources(root: Path = REPO / "dpo_hpc") -> dict[str, tuple[str, bool]]:
    """module name -> (source, is_package) for every .py file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path.read_text(), is_package)
    return out


def imports(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported dpo_hpc module, imported names, line) for every import, lazy ones included."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "dpo_hpc"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dpo_hpc":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(s, [], node.lineno) for s in submodules]
            if len(submodules) < len(names):
                found.append((target, [n for n in names if f"{target}.{n}" not in known], node.lineno))
    return found


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    known = set(sources)
    problems, graph = [], {m: set() for m in sources}
    for module, (source, is_package) in sources.items():
        here = unit_of(module)
        for target, names, line in imports(module, source, is_package, known):
            there = unit_of(target)
            graph[module].add(target)
            where = f"{module} (line {line}) imports {target}"
            if there != here and rank_of(there) >= rank_of(here):
                problems.append(f"{where}: upward ({here} is below {there})")
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if there != here and private:
                problems.append(f"{where}: private name(s) {', '.join(private)} of another unit")
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in graph and state.get(nxt) is None:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [node])
    return problems


def test_imports_point_down_and_form_no_cycle():
    problems = violations(module_sources())
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_upward_import_a_private_name_and_a_cycle():
    sources = module_sources()
    source, is_package = sources["dpo_hpc.config.schema"]
    injected = dict(sources)
    injected["dpo_hpc.config.schema"] = (source + "\nfrom ..trainers.trainer import Trainer\n", is_package)
    assert any("dpo_hpc.config.schema" in p and "upward" in p for p in violations(injected))

    source, is_package = sources["dpo_hpc.launch.sbatch"]
    injected = dict(sources)
    injected["dpo_hpc.launch.sbatch"] = (source + "\nfrom ..config.loader import _describe\n", is_package)
    assert any("private name(s) _describe" in p for p in violations(injected))

    source, is_package = sources["dpo_hpc.launch.layout"]
    injected = dict(sources)
    injected["dpo_hpc.launch.layout"] = (source + "\nfrom .submission import ledger_of\n", is_package)
    assert any(p.startswith("import cycle") for p in violations(injected))


def test_login_node_modules_do_not_import_torch():
    """Config, experiment expansion and the Slurm side load on a login node without torch."""
    import subprocess
    import sys

    code = ("import sys, dpo_hpc.submit, dpo_hpc.status, dpo_hpc.launch.sbatch, dpo_hpc.launch.jobs; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
