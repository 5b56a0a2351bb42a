"""What each decompression bomb of tests/artifact_fuzz.py costs the loader before it is refused.

python -m bench.bombs

Each bomb is loaded by a fresh process, as the score stage loads artifacts/model.pgolf (pgolf.artifact.load_model),
after the valid artifact the bombs are made from (which warms up torch: its first model build takes ~2 s): the
wall time of the bomb's load, the peak resident memory of that process (Python, torch, the loader, both loads)
and of its children (the lrzip program; an upper bound, as it counts the Python image the program is forked
from, 150 to 300 MB, until lrzip replaces it), and the one-line refusal. Saves bench/results/bombs.json.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, save


def load(valid: Path, path: Path) -> dict:
    """Run in the fresh process: the valid artifact loaded, then `path`, timed; the peak memory of this process and
    of its children."""
    from pgolf import artifact
    from pgolf.errors import InputError

    artifact.load_model(valid)
    start, error = time.perf_counter(), None
    try:
        artifact.load_model(path)
    except InputError as exc:
        error = str(exc).removeprefix(f"{path}: ")
    mb = {who: round(resource.getrusage(who).ru_maxrss / 1024, 1) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)}
    return {"seconds": round(time.perf_counter() - start, 3), "process_mb": mb[resource.RUSAGE_SELF],
            "children_mb": mb[resource.RUSAGE_CHILDREN], "refused": error}


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import artifact_fuzz

    blob = artifact_fuzz.tiny_artifact()
    cases = [("valid artifact (baseline)", blob), *artifact_fuzz.bombs(*artifact_fuzz.split(blob))]
    rows = []
    print("| bomb | bytes | load s | process MB | children MB | refused with |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        valid, path = Path(tmp) / "valid.pgolf", Path(tmp) / "model.pgolf"
        valid.write_bytes(blob)
        for name, data in cases:
            path.write_bytes(data)
            out = subprocess.run([sys.executable, "-m", "bench.bombs", str(valid), str(path)], capture_output=True, text=True, cwd=REPO,
                                 timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
            row = {"bomb": name, "bytes": len(data), **(json.loads(out.stdout) if out.returncode == 0 else {"crashed": out.stderr.strip()[-300:]})}
            rows.append(row)
            print(f"| {name} | {len(data):,} | {row.get('seconds', '-')} | {row.get('process_mb', '-')} | {row.get('children_mb', '-')} | "
                  f"{row.get('refused') or row.get('crashed', 'loaded')} |", flush=True)
    lrzip = subprocess.run(["lrzip", "-V"], capture_output=True, text=True).stdout.strip()
    save({"cores": os.cpu_count(), "lrzip": lrzip, "rows": rows}, REPO / "bench" / "results" / "bombs.json")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(load(Path(sys.argv[1]), Path(sys.argv[2]))))
    else:
        main()
