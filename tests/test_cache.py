"""The causal n-gram cache: the vectorised path against the streaming reference, exactly, and its guarantees."""
import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import default_params, run_stage
from pgolf import cache, ngram, shards
from pgolf.errors import InputError
from pgolf.cache import CacheParams

BASE = CacheParams(max_order=4, mix="online", lam=0.2, entropy_bins=4, prior=8.0, update_every=16, max_state_bytes=1 << 20)


def stream(n: int, vocab: int, seed: int = 0, repeats: bool = True) -> np.ndarray:
    """Random tokens with copied spans, so that long contexts recur."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n + 1)
    if repeats:
        for _ in range(n // 20):
            a, b, length = rng.integers(0, n - 10, 2).tolist() + [int(rng.integers(3, 10))]
            lo, hi = min(a, b), max(a, b)
            tokens[hi : hi + length] = tokens[lo : lo + length]
    tokens[0] = 1
    return tokens[: n + 1].astype(np.uint16)


def model_side(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    nll = rng.exponential(2.0, n).astype(np.float32)
    entropy = rng.uniform(0, 6, n).astype(np.float32)
    return np.exp(-nll.astype(np.float64)), entropy


def assert_same(fast: cache.Rescored, slow: cache.Rescored) -> None:
    for field in ("prob", "lam", "ngram_prob", "order"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(slow, field), err_msg=field)
    assert fast.state_bytes == slow.state_bytes


@pytest.mark.parametrize("vocab,n,seed", [(5, 300, 0), (37, 500, 1), (1024, 400, 2)])
@pytest.mark.parametrize("mix", ["fixed", "online"])
@pytest.mark.parametrize("max_order", [1, 3, 6])
def test_fast_path_equals_the_streaming_reference_exactly(vocab, n, seed, mix, max_order):
    tokens = stream(n, vocab, seed)
    pm, ent = model_side(n, seed)
    p = dataclasses.replace(BASE, mix=mix, max_order=max_order)
    assert_same(cache.rescore(tokens, pm, ent, vocab, p), cache.rescore_reference(tokens, pm, ent, vocab, p))


@pytest.mark.parametrize("budget", [400, 1500, 6000])
def test_a_full_table_stops_counting_new_ngrams_in_both_paths(budget):
    tokens, vocab = stream(400, 11, 3), 11
    pm, ent = model_side(400, 3)
    p = dataclasses.replace(BASE, max_state_bytes=budget)
    fast = cache.rescore(tokens, pm, ent, vocab, p)
    assert_same(fast, cache.rescore_reference(tokens, pm, ent, vocab, p))
    assert fast.state_bytes <= budget
    unbounded = cache.rescore(tokens, pm, ent, vocab, dataclasses.replace(BASE, max_state_bytes=1 << 30))
    assert unbounded.state_bytes > budget  # the cap did bind


def test_a_budget_below_the_lambda_state_is_refused():
    with pytest.raises(InputError, match="cache.max_state_bytes"):
        cache.rescore(stream(50, 5), *model_side(50), 5, dataclasses.replace(BASE, max_state_bytes=100))


def test_real_tokens_agree_too(fineweb):
    tokens = shards.read_tokens(fineweb / "val_head_sp1024.bin")[:3001].astype(np.uint16)
    pm, ent = model_side(3000)
    p = dataclasses.replace(BASE, max_order=5, update_every=256)
    assert_same(cache.rescore(tokens, pm, ent, 1024, p), cache.rescore_reference(tokens, pm, ent, 1024, p))


def test_every_distribution_sums_to_one_and_only_looks_back():
    vocab, tokens = 7, stream(120, 7, 4)
    state = ngram.NgramState(vocab, 4, ngram.capacities(4, vocab, 120, 1 << 20))
    state.history.append(int(tokens[0]))
    for t in range(1, len(tokens)):
        p, _ = state.distribution()
        assert abs(p.sum() - 1) < 1e-12 and np.all(p > 0)
        state.update(int(tokens[t]))
    # Changing the future leaves every earlier probability bit-identical.
    pm, ent = model_side(120)
    a = cache.rescore(tokens, pm, ent, vocab, BASE)
    changed = tokens.copy()
    changed[61:] = (changed[61:] + 3) % vocab
    b = cache.rescore(changed, pm, ent, vocab, BASE)
    np.testing.assert_array_equal(a.prob[:60], b.prob[:60])
    assert not np.array_equal(a.prob[60:], b.prob[60:])


def test_ngram_counts_match_a_direct_count():
    tokens, vocab = stream(200, 4, 5), 4
    scores = ngram.ngram_probs(tokens, vocab, 3, ngram.capacities(3, vocab, 200, 1 << 20))
    for t in range(3, 201):
        h = tuple(tokens[t - 2 : t])
        seen = sum(1 for s in range(2, t) if tuple(tokens[s - 2 : s]) == h)
        assert (scores.order[t - 1] == 3) == (seen > 0)


# The stage, on pass-1 records written by the score stage's own writer.


@pytest.fixture
def scored(tmp_path, fineweb):
    """data/ from the FineWeb sample and eval/score.parquet of a small random model over its val shard."""
    import torch

    from conftest import make_data
    from pgolf import windows
    from pgolf.bpb import ByteTables, position_bytes
    from pgolf.runtime import CPU
    from pgolf.model import GPT
    from pgolf.model import ModelParams
    from pgolf.score import write_records

    root = make_data(tmp_path, fineweb)
    torch.manual_seed(0)
    p = default_params()
    model = GPT(ModelParams(**dict(p["model"], layers=1, dim=16, heads=2, kv_heads=1))).eval()
    tokens = shards.read_tokens(root / "data/shards/fineweb_val_000000.bin")
    plan = windows.plan(tokens, 64, 64)
    (root / "eval").mkdir()
    tables = ByteTables.from_sentencepiece(root / "data/tokenizer.model", 1024)
    write_records(model, tokens, plan, 16, position_bytes(tokens, tables), 1, CPU, root / "eval/score.parquet")
    return root, p


def test_stage_writes_records_and_metrics_that_agree(scored):
    root, p = scored
    result = run_stage("rescore", root, p)
    assert result.returncode == 0, result.stderr
    m = json.loads((root / "metrics/rescore.json").read_text())
    out = pq.read_table(root / "eval/rescore.parquet")
    score = pq.read_table(root / "eval/score.parquet")
    nbytes = score.column("bytes").to_numpy().sum()
    assert out.column("position").to_pylist() == score.column("position").to_pylist()
    assert m["val_bpb"] == pytest.approx(out.column("nll").to_numpy().sum() / (math.log(2) * nbytes), abs=1e-6)
    assert m["val_bpb_neural"] == pytest.approx(score.column("nll").to_numpy().astype(np.float64).sum() / (math.log(2) * nbytes), abs=1e-6)
    assert m["gain"] == pytest.approx(m["val_bpb_neural"] - m["val_bpb"], abs=2e-6)
    assert 0 < m["state_bytes"] <= p["cache"]["max_state_bytes"]
    lam = out.column("lam").to_numpy()
    assert np.all((lam >= 0) & (lam <= 1))


def test_stage_refuses_records_of_other_tokens(scored):
    root, p = scored
    table = pq.read_table(root / "eval/score.parquet")
    targets = table.column("target").to_numpy().copy()
    targets[10] = (targets[10] + 1) % 1024
    pq.write_table(table.set_column(2, "target", pa.array(targets)), root / "eval/score.parquet")
    result = run_stage("rescore", root, p)
    assert result.returncode == 2 and "eval/score.parquet" in result.stderr
    assert not (root / "eval/rescore.parquet").exists()


def test_unknown_mix_is_refused_by_name(scored):
    root, p = scored
    p["cache"]["mix"] = "magic"
    result = run_stage("rescore", root, p)
    assert result.returncode == 2 and "cache.mix" in result.stderr
