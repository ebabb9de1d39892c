"""Arrows that run one way: the server is above the core, the core above the kernels, and
``sharding/`` lays out what the core hands it.

Every module's imports (top-level and inside functions) are read with ``ast``; nothing
is imported, so this needs no jax.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the modules it must not import (a name forbids the module and its submodules).
FORBIDDEN = {
    "coserve_jax": ("server",),
    "sharding": ("coserve_jax.engine", "coserve_jax.finetune", "coserve_jax.step",
                 "coserve_jax.batch"),
    "pallas_kernels": ("coserve_jax", "sharding", "server"),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _hits(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


def forbidden_imports(path: Path, forbidden: tuple[str, ...],
                      root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, module)`` of each forbidden import in the file, top-level or in a function.
    ``from a import b`` counts as importing ``a``, or ``a.b`` (``b`` may be a submodule)
    when ``a`` itself is allowed; relative imports are resolved against the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _hits(a.name, forbidden)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if _hits(module, forbidden):
                found.append((node.lineno, module))
            else:
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names
                          if _hits(f"{module}.{a.name}", forbidden)]
    return sorted(found)


def violations(package: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """One line per forbidden import under ``root/package``: module, file:line, import."""
    return [f"{_module_name(path, root)} ({path.relative_to(root)}:{line}) imports {module}"
            for path in sorted((root / package).rglob("*.py"))
            for line, module in forbidden_imports(path, forbidden, root)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    bad = violations(package, FORBIDDEN[package])
    assert not bad, (f"{package}/ must not import {', '.join(FORBIDDEN[package])}:\n  "
                     + "\n  ".join(bad))


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "sharding"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from sharding import layout\n")
    (pkg / "bad.py").write_text(
        "import os\n\n"
        "def f():\n"
        "    from coserve_jax.finetune.trainer import tree_to_host\n"
        "    return tree_to_host\n\n"
        "def g():\n"
        "    import coserve_jax.step as s\n"
        "    from coserve_jax import batch, config\n"
        "    from coserve_jax.config import ModelConfig\n"
        "    from . import layout\n")
    kernels = tmp_path / "pallas_kernels" / "lora"
    kernels.mkdir(parents=True)
    (kernels / "ops.py").write_text("from ...server import app\nfrom .. import dispatch\n")
    assert violations("sharding", FORBIDDEN["sharding"], tmp_path) == [
        "sharding.bad (sharding/bad.py:4) imports coserve_jax.finetune.trainer",
        "sharding.bad (sharding/bad.py:8) imports coserve_jax.step",
        "sharding.bad (sharding/bad.py:9) imports coserve_jax.batch",
    ]
    assert violations("pallas_kernels", FORBIDDEN["pallas_kernels"], tmp_path) == [
        "pallas_kernels.lora.ops (pallas_kernels/lora/ops.py:1) imports server"]
