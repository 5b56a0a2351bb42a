"""Which source files a module needs: it and every pgolf module it imports, transitively; and the same
files as one compressed self-extracting script, the way the records count their code.

The pack stage counts these bytes into the artifact's size (pack.code: raw or compressed); the report
re-counts them; the tests hold each dvc.yaml stage's code deps to them.
"""
from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import brotli

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


# Run, the script serves the modules from its own compressed copy before anything on sys.path.
EXTRACTOR = """import base64,brotli,importlib.abc as a,importlib.util as u,json,sys
S=json.loads(brotli.decompress(base64.b85decode(%s)))
class F(a.MetaPathFinder,a.Loader):
 def find_spec(s,n,p,t=None):return u.spec_from_loader(n,s,is_package=n=="pgolf")if n in S else None
 def create_module(s,spec):return None
 def exec_module(s,m):exec(compile(S[m.__name__],m.__name__,"exec"),m.__dict__)
sys.meta_path.insert(0,F())
"""


def self_extracting(files: list[Path]) -> bytes:
    """A Python script that, run, makes the files importable as their modules (pgolf.artifact, ...):
    their sources brotli-11 compressed and base85-encoded, as the records ship theirs (PR #1855)."""
    sources = {".".join(f.with_suffix("").parts): (SOURCE_ROOT / f).read_text(encoding="utf-8") for f in files}
    sources.setdefault("pgolf", "")  # the package itself (its __init__ is not imported by name)
    packed = base64.b85encode(brotli.compress(json.dumps(sources, sort_keys=True).encode(), quality=11))
    return (EXTRACTOR % repr(packed)).encode()
