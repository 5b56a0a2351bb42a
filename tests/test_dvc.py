"""dvc.yaml stays exact: each stage depends on its script and every pgolf module the script imports."""
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pgolf import dvc_deps
from pgolf.sources import code_files

TEXT = (REPO / "dvc.yaml").read_text()
STAGES = yaml.safe_load(TEXT)["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_modules_the_stage_imports(name):
    deps = {d for d in STAGES[name]["deps"] if d.endswith(".py")}
    assert deps == {str(f) for f in code_files(Path(f"stages/{name}.py"))}, "run python -m pgolf.dvc_deps"


def test_the_generator_writes_what_the_test_demands_and_finds_drift():
    assert dvc_deps.rewritten(TEXT) == TEXT and dvc_deps.drifted(TEXT) == []
    stale = TEXT.replace("      - pgolf/ngram.py\n", "", 1)  # rescore's (and report's) first mention
    assert dvc_deps.drifted(stale) != [] and dvc_deps.rewritten(stale) == TEXT
