"""Stage processes: one run of a stage at a time, and no stage outlives the process that started it."""
import os
import signal
import subprocess
import sys
import time

from pgolf.files import write_bytes
from conftest import REPO, default_params, run_stage

# A stand-in stage that holds `score`, writes half of an output and waits.
HOLDER = """
import sys, time
from pathlib import Path
from pgolf.files import staged
from pgolf.stage import run_stage
def main():
    with staged(Path("out.txt")) as (tmp,):
        tmp.write_text("half")
        print("ready", flush=True)
        time.sleep(120)
run_stage(main, "score")
"""


def env():
    return dict(os.environ, PYTHONPATH=str(REPO))


def wait_for(predicate, seconds=60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_a_second_run_of_a_running_stage_is_refused(tmp_path):
    (tmp_path / "out.txt").write_text("last good")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = run_stage("score", tmp_path, default_params())
        assert result.returncode == 2
        assert result.stderr == f"error: runs/locks/score.lock: stage score is already running (pid {holder.pid}); wait for it or stop it\n"
        assert (tmp_path / "out.txt").read_text() == "last good"
        assert len(list(tmp_path.glob(".out.txt.tmp-*"))) == 1  # the running stage's temporary is its own
    finally:
        holder.kill()
        holder.wait()


def test_a_stage_ends_with_its_parent_and_leaves_no_temporary(tmp_path):
    """`kill -9` of `dvc repro` (here: of any parent) must not leave the stage running on its own."""
    (tmp_path / "out.txt").write_text("last good")
    parent_code = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {HOLDER!r}], stdout=subprocess.PIPE, text=True)\n"
        "assert child.stdout.readline().strip() == 'ready'\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert not gone(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert wait_for(lambda: gone(child)), "the stage outlived its parent"
    assert (tmp_path / "out.txt").read_text() == "last good"
    assert wait_for(lambda: not list(tmp_path.glob(".out.txt.tmp-*")))


def test_leftovers_of_a_live_process_are_kept_and_of_a_dead_one_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp, dead_tmp = tmp_path / f".x.tmp-{sleeper.pid}", tmp_path / f".x.tmp-{dead.pid}"
        live_tmp.write_text("in progress")
        dead_tmp.write_text("abandoned")
        write_bytes(tmp_path / "x", b"done")
        assert live_tmp.exists() and not dead_tmp.exists() and (tmp_path / "x").read_bytes() == b"done"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ctrl_c_ends_a_stage_in_one_line_keeping_the_last_good_output(tmp_path):
    (tmp_path / "out.txt").write_text("last good")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        holder.send_signal(signal.SIGINT)
        _, err = holder.communicate(timeout=60)
    finally:
        holder.kill()
    assert holder.returncode == 130 and err == "score: interrupted (Ctrl-C); the last good outputs are kept\n"
    assert (tmp_path / "out.txt").read_text() == "last good" and not list(tmp_path.glob(".out.txt.tmp-*"))
