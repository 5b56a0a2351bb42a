"""What the benchmarks share: where the FineWeb sample is, and how results are saved."""
import os
from pathlib import Path

from pgolf.files import write_json

REPO = Path(__file__).resolve().parents[1]
FINEWEB = Path(os.environ.get("PGOLF_FINEWEB_DIR", REPO.parent / "shared" / "data" / "fineweb"))


def save(results: dict, path: Path) -> None:
    write_json(path, results)
    print(f"saved {path}")
