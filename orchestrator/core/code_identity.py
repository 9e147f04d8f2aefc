"""The code a pass runs, as one hash for its cache key: its module and every orchestrator module it imports.

A pass's behaviour lives also in helpers (onnx_common, dummy_data, genai_metadata, lora kernels ...): hashing
only the pass's own module would let a changed helper serve stale cached outputs. Imports are read from the
source (module-level and function-level alike), so nothing is imported to compute the hash.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "orchestrator"


def code_hash(module_name: str) -> str:
    """sha256 over the sources of `module_name` and its transitive orchestrator imports (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(_closure(module_name)):
        path = _source_path(name)
        if path is not None:
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _closure(root: str) -> set[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(orchestrator_imports(name) - seen)
    return seen


@cache
def _source_path(module_name: str) -> Path | None:
    """The file of an orchestrator module, found on disk (no import); None for names that are not modules."""
    root = Path(__file__).resolve().parents[1]  # the orchestrator package (this file: orchestrator/core/)
    parts = module_name.split(".")[1:]
    package = root.joinpath(*parts, "__init__.py")
    if package.is_file():
        return package
    module = root.joinpath(*parts).with_suffix(".py") if parts else None
    return module if module is not None and module.is_file() else None


@cache
def orchestrator_imports(module_name: str) -> frozenset[str]:
    """The orchestrator modules (and names) `module_name` imports anywhere in its source, relative imports
    resolved, read with ast: nothing is imported. tests/test_architecture.py checks the rooms with it."""
    path = _source_path(module_name)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), str(path))
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return frozenset(n for n in found if n == PACKAGE or n.startswith(PACKAGE + "."))
