"""Which source files a module needs: it and every pgolf module it imports, transitively.

The pack stage counts these bytes into the artifact's size; the report re-counts them; the tests hold
each dvc.yaml stage's code deps to them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pgolf

SOURCE_ROOT = Path(pgolf.__file__).resolve().parent.parent  # the folder holding the pgolf package


def code_files(entry: Path) -> list[Path]:
    """entry and every pgolf module it imports, transitively (paths relative to SOURCE_ROOT)."""
    seen, todo = set(), [Path(entry)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((SOURCE_ROOT / path).read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pgolf":
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "pgolf"]
            for name in names:
                module = Path(*name.split(".")).with_suffix(".py")
                if (SOURCE_ROOT / module).is_file():
                    todo.append(module)
    return sorted(seen)


def code_bytes(files: list[Path]) -> int:
    """UTF-8 bytes of the files' source."""
    return sum(len((SOURCE_ROOT / f).read_text(encoding="utf-8").encode("utf-8")) for f in files)
