"""Shared fixtures. Real challenge data comes from $PGOLF_FINEWEB_DIR or ../shared/data/fineweb.

Tests that need it, or the lrzip program, skip with the reason when it is absent, unless
PGOLF_REQUIRE_DATA=1 (set by .ci/run, which also installs lrzip) or CI is set: then its absence is a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FINEWEB_ENV = "PGOLF_FINEWEB_DIR"


def _required() -> bool:
    return os.environ.get("PGOLF_REQUIRE_DATA") == "1" or os.environ.get("CI", "").lower() in ("1", "true")


@pytest.fixture(scope="session")
def fineweb() -> Path:
    """The shared FineWeb sample folder (tokenizer, val_head_docs.jsonl, val_head_sp1024.bin, extra_docs.jsonl)."""
    path = Path(os.environ.get(FINEWEB_ENV, REPO.parent / "shared" / "data" / "fineweb"))
    if not (path / "val_head_sp1024.bin").is_file():
        msg = f"real FineWeb sample not found at {path} (set {FINEWEB_ENV})"
        if _required():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def lrzip() -> None:
    """The lrzip program, for pack.compressor lrzip."""
    import shutil

    if shutil.which("lrzip") is None:
        msg = "the lrzip program is not installed (apt-get install lrzip)"
        if _required():
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def sp1024(fineweb: Path) -> Path:
    return fineweb / "tokenizers" / "fineweb_1024_bpe.model"


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def run_stage(stage: str, cwd: Path, params: dict, **env_vars: str) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage>` in cwd with params written to cwd/params.yaml."""
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_vars)
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def read_jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


TINY_MODEL = dict(layers=2, dim=32, heads=2, kv_heads=1, mlp_mult=2, vocab_size=1024)
TINY_TRAIN = dict(
    seq_len=32, batch_tokens=512, grad_accum=4, iterations=4, warmdown_iters=2, val_tokens=2048, val_batch_seqs=16,
    log_every=1, checkpoint_every=0, muon_momentum_warmup_steps=2,
)


def tiny_params(p: dict | None = None, **train) -> dict:
    """Params (the defaults unless given) with a tiny model and a few short steps: seconds on a CPU."""
    p = default_params() if p is None else p
    p["model"].update(TINY_MODEL)
    p["train"].update(TINY_TRAIN, **train)
    p["ttt"]["lora_chunk"] = 16  # within the short eval windows tests use
    return p


def run_stages(root: Path, params: dict, *stages: str) -> None:
    """A tiny pipeline: run the stages in order in root, each of which must succeed."""
    for stage in stages:
        result = run_stage(stage, root, params)
        assert result.returncode == 0, f"{stage}: {result.stderr}"


def make_data(root: Path, fineweb: Path) -> Path:
    """data/shards (2 train shards, 1 val shard of real tokens) and data/tokenizer.model under root."""
    import shutil

    from pgolf import shards

    tokens = shards.read_tokens(fineweb / "val_head_sp1024.bin")
    out = root / "data" / "shards"
    out.mkdir(parents=True)
    shards.write_shard(out / "fineweb_val_000000.bin", tokens[:8192])
    shards.write_shard(out / "fineweb_train_000000.bin", tokens[8192:20000])
    shards.write_shard(out / "fineweb_train_000001.bin", tokens[20000:40000])
    shutil.copy(fineweb / "tokenizers" / "fineweb_1024_bpe.model", root / "data" / "tokenizer.model")
    return root


def shards_params(fineweb: Path, src: Path, val_tokens: int, train_tokens: int) -> dict:
    """Default params with data.source = shards: the FineWeb sample cut at document boundaries into a
    val shard of about val_tokens and a train shard of the next documents up to train_tokens, in src."""
    import numpy as np

    from pgolf import shards, windows

    tokens = shards.read_tokens(fineweb / "val_head_sp1024.bin")
    starts = windows.doc_starts(tokens, 1)
    val_end, train_end = starts[np.searchsorted(starts, val_tokens)], starts[np.searchsorted(starts, train_tokens)]
    src.mkdir(parents=True, exist_ok=True)
    shards.write_shard(src / "fineweb_val_000000.bin", tokens[:val_end])
    shards.write_shard(src / "fineweb_train_000000.bin", tokens[val_end:train_end])
    p = default_params()
    p["data"].update(source="shards", shards=str(src), val_docs=None)
    p["tokenizer"].update(model=str(fineweb / "tokenizers" / "fineweb_1024_bpe.model"))
    return p
