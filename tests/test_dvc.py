"""dvc.yaml stays exact: each stage depends on its script and every pgolf module the script imports."""
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pgolf.sources import code_files

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_modules_the_stage_imports(name):
    deps = {d for d in STAGES[name]["deps"] if d.endswith(".py")}
    assert deps == {str(f) for f in code_files(Path(f"stages/{name}.py"))}
