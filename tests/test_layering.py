"""The package layers import downward only: data < lattice < env < rl < runs < experiments.

A lower layer importing a higher one (``lattice`` reaching into ``env``, ``rl`` into ``runs``)
ties the core to what is built on it; this test names every such import. Imports are read from
the source (``ast``), so nothing is executed and an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("esper_jax.data", "esper_jax.lattice", "esper_jax.env", "esper_jax.rl", "esper_jax.runs", "experiments")


def layer_of(module: str) -> int | None:
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from esper_jax.lattice import ops` imports the module esper_jax.lattice.ops
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def upward_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer_of(module)
        if own is None:
            continue
        for name in imported_modules(path):
            other = layer_of(name)
            if other is not None and other > own:
                found.append(f"{module} imports {name} ({LAYERS[own]} may not import {LAYERS[other]})")
    return found


def test_every_module_belongs_to_a_layer():
    top = {p.name for p in (ROOT / "esper_jax").iterdir() if p.name not in ("__init__.py", "__pycache__")}
    assert top <= {"data", "lattice", "env", "rl", "runs", "trees.py"}, sorted(top)


def test_layers_import_downward_only():
    assert upward_imports(ROOT / "esper_jax") + upward_imports(ROOT / "experiments") == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "esper_jax" / "lattice"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from esper_jax.env import environment\nimport esper_jax.runs.run\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert len(upward_imports(tmp_path / "esper_jax")) == 2
