"""The DVC workflow on a micro copy of the repository: what reruns after each change, and sharing.

The copy holds this working tree (tracked and untracked, not ignored files) as a fresh git repository
with micro params, reproduced once; each check then changes one param or module and asks
`dvc repro --dry --force-downstream` which stages would run.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, default_params, shards_params

ALL = ["tokenize", "train", "calibrate", "pack", "score", "adapt", "rescore", "report"]
GIT = ["git", "-c", "user.name=pgolf-test", "-c", "user.email=test@pgolf.invalid"]


def sh(cmd: list[str], cwd, check: bool = True) -> str:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def would_run(repo, downstream: bool = True) -> list[str]:
    """Stages `dvc repro` would run: those whose deps changed and (they will change their outputs) all
    that lie downstream of them."""
    out = sh(dvc("repro", "--dry", *(["--force-downstream"] if downstream else [])), repo)
    return [s for s in ALL if f"Running stage '{s}'" in out]


def micro_params(fineweb, src) -> dict:
    p = shards_params(fineweb, src, 3000, 20000)
    p["model"].update(layers=1, dim=16, heads=2, kv_heads=1)
    p["train"].update(seq_len=32, batch_tokens=256, grad_accum=2, iterations=2, warmdown_iters=1, val_tokens=1024, log_every=1,
                      checkpoint_every=0, compile=False)
    p["quant"].update(calib_seqs=4, seq_len=32)
    p["eval"].update(seq_len=32, stride=16, batch=64)
    p["verify"].update(positions=4)
    p["ttt"]["lora_chunk"] = 16
    return p


@pytest.fixture(scope="module")
def repo(tmp_path_factory, fineweb):
    root = tmp_path_factory.mktemp("workflow")
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file() and not name.startswith(("metrics/", "reports/")) and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(micro_params(fineweb, root / "src"), sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh(GIT + ["add", "-A"], repo)
    sh(GIT + ["commit", "-qm", "micro"], repo)
    sh(dvc("repro"), repo)
    sh(GIT + ["add", "-A"], repo)
    sh(GIT + ["commit", "-qm", "reproduced"], repo)
    return repo


def test_a_second_repro_has_nothing_to_do(repo):
    assert would_run(repo) == []


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("quant", "bits.mlp", 5, ALL[2:]),
        ("pack", "level", 19, ALL[3:]),
        ("eval", "stride", 8, ALL[4:]),
        ("ttt", "epochs", 2, ALL[5:]),
        ("cache", "lam", 0.1, ALL[6:]),
        ("model", "dim", 32, ALL[1:]),
        ("train", "iterations", 3, ALL[1:]),
        ("verify", "positions", 5, ALL[7:]),
    ],
)
def test_a_param_reruns_only_what_lies_downstream(repo, section, key, value, expected):
    path = repo / "params.yaml"
    before = path.read_text()
    p = yaml.safe_load(before)
    node = p[section]
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        assert would_run(repo) == expected
    finally:
        path.write_text(before)


@pytest.mark.parametrize(
    "module,expected",
    [("pgolf/cache.py", ALL[6:]), ("pgolf/ngram.py", ALL[6:]), ("pgolf/windows.py", ALL[4:]), ("pgolf/gptq.py", ALL[2:]), ("pgolf/audit.py", ALL[7:]),
     ("pgolf/ttt.py", ALL[5:])],
)
def test_a_module_reruns_only_the_stages_that_import_it(repo, module, expected):
    path = repo / module
    before = path.read_text()
    path.write_text(before + "\n# edited\n")
    try:
        assert would_run(repo) == expected
    finally:
        path.write_text(before)


@pytest.mark.parametrize(
    "module,cls,expected",
    [("pgolf/cache.py", "CacheParams", ALL[6:]), ("pgolf/audit.py", "VerifyParams", ALL[7:]), ("pgolf/score.py", "EvalParams", ALL[4:]),
     ("pgolf/quantize.py", "QuantParams", ALL[2:]), ("pgolf/pack.py", "PackParams", ALL[3:])],
)
def test_a_new_knob_in_one_section_reruns_only_the_stages_that_read_it(repo, module, cls, expected):
    """Each section's dataclass lives beside its code, so a new field there is no edit to every stage's deps."""
    path = repo / module
    before = path.read_text()
    head, rest = before.split(f"class {cls}:\n", 1)
    fields, post = rest.split("    def __post_init__", 1)
    path.write_text(f"{head}class {cls}:\n{fields}    new_knob: int = 0\n\n    def __post_init__{post}")
    try:
        assert would_run(repo) == expected
    finally:
        path.write_text(before)


# Outputs of the stages a failure below touches, cached and cache: false.
LAST_GOOD = ["artifacts/quant.safetensors", "artifacts/model.pgolf", "metrics/pack.json", "reports/details/pack.json", "eval/score.parquet",
             "metrics/score.json", "eval/rescore.parquet", "metrics/rescore.json", "metrics/report.json", "reports/report.md",
             "reports/plots/train_curve.svg"]


def snapshot(repo) -> dict[str, bytes]:
    return {p: (repo / p).read_bytes() for p in LAST_GOOD}


def with_params(repo, **changes):
    """params.yaml with section.key=value changes; returns the original text to put back."""
    path = repo / "params.yaml"
    before = path.read_text()
    p = yaml.safe_load(before)
    for key, value in changes.items():
        section, leaf = key.split("__")
        p[section][leaf] = value
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return before


def test_a_failed_stage_keeps_the_last_good_outputs(repo):
    """pack over its byte limit fails `dvc repro`: every output of the last good run stays, metrics included."""
    before, params = snapshot(repo), with_params(repo, pack__byte_limit=1000)
    try:
        result = subprocess.run(dvc("repro"), cwd=repo, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))
        assert result.returncode != 0 and "bytes over" in result.stdout + result.stderr
        assert snapshot(repo) == before
    finally:
        (repo / "params.yaml").write_text(params)
    assert would_run(repo) == []


def test_an_interrupted_stage_keeps_the_last_good_outputs(repo):
    """Ctrl-C in the middle of score (new settings, so new records would differ) leaves the last good ones."""
    before, params = snapshot(repo), with_params(repo, eval__stride=1, eval__batch=1)
    try:
        # A new session, with Ctrl-C's default action even where the test runner's shell ignores SIGINT.
        run = subprocess.Popen(dvc("repro", "-s", "score"), cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = False
        for _ in range(6000):  # until score is writing its records (at most 60 s)
            if list((repo / "eval").glob(".score.parquet.tmp-*")):
                started = True
                break
            time.sleep(0.01)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=120) != 0 and started
        assert snapshot(repo) == before
        assert not list((repo / "eval").glob(".*tmp-*")) and not list((repo / "metrics").glob(".*tmp-*"))
    finally:
        (repo / "params.yaml").write_text(params)
    assert would_run(repo) == []


def test_restore_brings_back_lost_outputs_metrics_included(repo):
    before = snapshot(repo)
    for path in ("artifacts/model.pgolf", "eval/score.parquet", "metrics/pack.json", "metrics/report.json", "reports/report.md"):
        (repo / path).unlink()
    (repo / "metrics/score.json").write_text("{}")
    out = sh([sys.executable, "-m", "pgolf.restore"], repo)
    assert "6 of 6 outputs put back (4 from git)" in out, out
    assert snapshot(repo) == before and would_run(repo) == []
    assert "nothing to do" in sh([sys.executable, "-m", "pgolf.restore"], repo)


def test_metrics_are_flat_and_the_documented_views_are_readable(repo):
    for path in (repo / "metrics").glob("*.json"):
        assert all(not isinstance(v, (dict, list)) for v in json.loads(path.read_text()).values()), path
    shown = sh(dvc("metrics", "show"), repo)
    assert max(len(line) for line in shown.splitlines()) < 1600  # it was 6,000 with nested details (now: every stage's flat figures in one row)
    env_narrow = sh(["env", "COLUMNS=80", *dvc("exp", "show", "--md", "--drop", ".*", "--keep", "Experiment|Created|seed|val_bpb", "--no-pager")], repo)
    header = env_narrow.splitlines()[0]
    assert "…" not in env_narrow and all(k in header for k in ("val_bpb_scored", "val_bpb_cache", "seed"))


def test_push_then_a_fresh_clone_pulls_instead_of_retraining(repo):
    sh(dvc("push"), repo)
    clone = repo.parent / "teammate"
    sh(["git", "clone", "-q", str(repo), str(clone)], repo.parent)
    assert not (clone / "artifacts/model.safetensors").exists()
    sh(dvc("pull", "artifacts/model.pgolf"), clone)  # the artifact alone, as the README documents
    assert (clone / "artifacts/model.pgolf").read_bytes() == (repo / "artifacts/model.pgolf").read_bytes()
    assert not (clone / "artifacts/model.safetensors").exists()
    sh(dvc("pull"), clone)
    assert (clone / "artifacts/model.safetensors").read_bytes() == (repo / "artifacts/model.safetensors").read_bytes()
    assert would_run(clone) == []
    assert "up to date" in sh(dvc("status"), clone)


def test_the_leaderboard_profile_is_valid_params():
    from pgolf import params
    from pgolf.audit import VerifyParams
    from pgolf.cache import CacheParams
    from pgolf.model import ModelParams
    from pgolf.quantize import QuantParams
    from pgolf.score import EvalParams
    from pgolf.trainer import TrainParams

    p = params.load(REPO / "profiles" / "8xh100.yaml")
    assert set(p) == set(default_params())
    model = params.section(p, "model", ModelParams)
    train = params.section(p, "train", TrainParams)
    ev = params.section(p, "eval", EvalParams)
    for name, cls in (("quant", QuantParams), ("cache", CacheParams), ("verify", VerifyParams)):
        params.section(p, name, cls)
    assert (model.layers, model.dim, model.heads, model.kv_heads) == (9, 512, 8, 4)
    assert train.max_seconds == 600 and train.grad_accum % 8 == 0 and ev.stride == 64


def test_compare_reads_real_experiments(repo):
    sh(dvc("exp", "run", "-n", "seed7", "-S", "seed=7"), repo)
    out = sh([sys.executable, "-m", "pgolf.compare"], repo)
    rows = [line for line in out.splitlines() if "(baseline params)" in line]
    assert len(rows) == 1 and rows[0].split()[0] == "2", out  # seeds 1337 and 7 in one group
    assert "Welch" in out
