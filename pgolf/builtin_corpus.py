"""The built-in corpus: real English prose already on every machine that has pgolf installed.

Python's language-reference topics (pydoc_data) and the docstrings of the standard library and of
numpy: a few MB of technical English, built offline and deterministically (for given Python and
numpy versions, recorded in the manifest). Nothing is fetched and nothing is copied into the repo.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

MIN_CHARS = 100  # shorter docstrings are mostly one-liners ("Return self.")
SKIP_DIRS = {"test", "tests", "testing", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip"}


def _docstrings(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield doc


def _reference_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the docstrings remain
        return
    for name in sorted(topics):
        yield topics[name].strip()


def documents() -> tuple[list[str], dict]:
    """The corpus documents in a fixed pseudo-random order, and a description of where they came from."""
    sources = {
        "python_reference_topics": list(_reference_topics()),
        "python_stdlib_docstrings": list(_docstrings(Path(sysconfig.get_paths()["stdlib"]))),
        "numpy_docstrings": list(_docstrings(Path(np.__file__).parent)),
    }
    seen: set[bytes] = set()
    keyed = []
    for docs in sources.values():
        for text in docs:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key not in seen:  # one copy of each (inherited docstrings repeat verbatim)
                seen.add(key)
                keyed.append((key, text))
    keyed.sort()  # ordering by hash shuffles the sources together, so validation is like training
    texts = [text for _, text in keyed]
    info = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "documents": {name: len(docs) for name, docs in sources.items()},
        "unique_documents": len(texts),
    }
    return texts, info


def write_jsonl(path: Path) -> dict:
    """Write the corpus as JSON lines with a "text" field; return its description with a sha256."""
    texts, info = documents()
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    Path(path).write_bytes(data)
    info["sha256"] = hashlib.sha256(data).hexdigest()
    info["bytes"] = len(data)
    return info
