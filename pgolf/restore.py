"""Put back the last good outputs: every stage output as dvc.lock records it, metrics included.

python -m pgolf.restore

A failed or interrupted stage never removes anything (dvc.yaml marks every output `persist: true`,
and each stage replaces all of its outputs together only when it finishes). This is for outputs
lost some other way: deleted or edited by hand, or removed by a pgolf from before `persist`. The
cached outputs come back from DVC's cache (`dvc checkout`); the metrics, plots and report
(`cache: false`, kept in git) from the last commit, where that is the version dvc.lock records.
"""
from __future__ import annotations

import json
import subprocess
import sys


def changed_outputs() -> list[str]:
    """Outputs that differ from dvc.lock or are missing, per `dvc status`."""
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: dvc status failed (run from the repository root): {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        sys.exit(2)
    status = json.loads(result.stdout or "{}")
    return sorted({path for entries in status.values() for e in entries if isinstance(e, dict) for path in e.get("changed outs", {})})


def main() -> None:
    before = changed_outputs()
    if not before:
        print("restore: every output is as dvc.lock records it; nothing to do")
        return
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", "--quiet"], check=False)
    from_git = changed_outputs()
    for path in from_git:  # one at a time: a path the commit lacks must not stop the others
        subprocess.run(["git", "checkout", "HEAD", "--", path], capture_output=True, check=False)
    left = changed_outputs()
    print(f"restore: {len(before) - len(left)} of {len(before)} outputs put back ({len(from_git) - len(left)} from git)")
    if left:
        print(f"error: {', '.join(left)}: neither DVC's cache nor the last commit holds the version dvc.lock records; "
              "rerun `dvc repro` for them", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
