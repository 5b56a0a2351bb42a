"""dvc.yaml's per-stage module lists, written from the stages' imports.

python -m pgolf.dvc_deps            rewrite every stage's `pgolf/*.py` deps in dvc.yaml
python -m pgolf.dvc_deps --check    exit 1, naming the stages, when dvc.yaml differs from the imports

Each stage depends on its script and exactly the pgolf modules it imports, transitively, so a library
edit reruns only the stages that use it; tests/test_dvc.py runs the check.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from pgolf.sources import code_files

DVC_YAML = Path("dvc.yaml")
_STAGE = re.compile(r"^  (\w+):\s*$")
_MODULE = re.compile(r"^      - pgolf/\S+\.py$")


def rewritten(text: str) -> str:
    """dvc.yaml's text with each stage's run of `- pgolf/....py` deps replaced by its script's imports."""
    out, stage, lines, i = [], None, text.split("\n"), 0
    while i < len(lines):
        stage = _STAGE.match(lines[i]).group(1) if _STAGE.match(lines[i]) else stage
        if _MODULE.match(lines[i]):
            while i < len(lines) and _MODULE.match(lines[i]):
                i += 1
            modules = sorted(str(f) for f in code_files(Path(f"stages/{stage}.py")) if f.parts[0] == "pgolf")
            out += [f"      - {m}" for m in modules]
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def drifted(text: str) -> list[str]:
    """Stages whose module lists differ from their scripts' imports."""
    old, new = yaml.safe_load(text)["stages"], yaml.safe_load(rewritten(text))["stages"]
    return [s for s in old if old[s].get("deps") != new[s].get("deps")]


def main() -> None:
    text = DVC_YAML.read_text()
    if "--check" in sys.argv[1:]:
        stages = drifted(text)
        if stages:
            print(f"error: {DVC_YAML}: the module deps of {', '.join(stages)} differ from their imports; run python -m pgolf.dvc_deps", file=sys.stderr)
            sys.exit(1)
        return
    DVC_YAML.write_text(rewritten(text))


if __name__ == "__main__":
    main()
