"""The audits catch every invalid trick the challenge saw, and the real pipeline passes every rule."""
import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_stage, run_stages, shards_params, tiny_params
from pgolf import audit, cache, rules, shards, tokenizer, windows
from pgolf.bpb import ByteTables, position_bytes
from pgolf.cache import CacheParams

V = 16


def stream(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, n + 1)
    tokens[200:260] = tokens[100:160]  # something for a cache to find
    return tokens.astype(np.uint16)


def model_dist(t: int) -> np.ndarray:
    return np.random.default_rng(t).dirichlet(np.ones(V))


class AddOne:
    """A valid cache: add-one unigram counts of the tokens scored so far, mixed half and half."""

    def __init__(self):
        self.counts = np.zeros(V)

    def cache_dist(self, candidate: int) -> float:
        return (self.counts[candidate] + 1) / (self.counts.sum() + V)

    def lam(self, candidate: int, model: np.ndarray) -> float:
        return 0.5

    def scores(self, model: np.ndarray, entropy: float) -> np.ndarray:
        return np.array([(1 - self.lam(v, model)) * model[v] + self.lam(v, model) * self.cache_dist(v) for v in range(V)])

    def update(self, token: int, model_prob: float, entropy: float) -> None:
        self.counts[token] += 1


class TargetInKey(AddOne):
    """Hashes (context, target) into one table and reads one cell per candidate: the cells of a context
    do not sum to its count, so the "distribution" sums to far more than 1."""

    def __init__(self):
        super().__init__()
        self.table, self.prev = np.zeros(64), 0

    def cache_dist(self, candidate: int) -> float:
        return (self.table[(self.prev * 31 + candidate) % 64] + 1) / (self.table[self.prev % 64] + 1)

    def update(self, token: int, model_prob: float, entropy: float) -> None:
        self.table[(self.prev * 31 + token) % 64] += 1
        self.table[self.prev % 64] += 1
        self.prev = token


class TwoPass(AddOne):
    """Counts the whole validation stream first, then scores it: normalized, but not causal."""

    def __init__(self, tokens: np.ndarray):
        super().__init__()
        self.counts = np.bincount(tokens[1:], minlength=V).astype(float)

    def update(self, token: int, model_prob: float, entropy: float) -> None:
        pass


class LambdaSeesTarget(AddOne):
    """Leans on whichever side likes the candidate more: λ depends on the target."""

    def lam(self, candidate: int, model: np.ndarray) -> float:
        return 0.9 if self.cache_dist(candidate) > model[candidate] else 0.1


class UpdateBeforeScore(AddOne):
    """Counts the target, then scores it."""

    def cache_dist(self, candidate: int) -> float:
        return (self.counts[candidate] + 2) / (self.counts.sum() + 1 + V)


def normalization(scorer) -> audit.Rule:
    tokens = stream()
    n = len(tokens) - 1
    entropy = np.zeros(n)
    recorded = audit.run_stream(type(scorer)() if not isinstance(scorer, TwoPass) else TwoPass(tokens), tokens, model_dist, entropy)
    model_prob = np.array([model_dist(t)[tokens[t]] for t in range(1, n + 1)])
    return audit.normalization(scorer, tokens, np.arange(1, n + 1, 7), model_dist, model_prob, entropy, recorded)


def causality(make) -> audit.Rule:
    tokens = stream()
    return audit.causality("causality", lambda toks: audit.run_stream(make(toks), toks, model_dist, np.zeros(len(toks) - 1)), tokens, 250)


def test_a_valid_scorer_passes():
    assert normalization(AddOne()).passed
    assert causality(lambda toks: AddOne()).passed


@pytest.mark.parametrize("broken", [TargetInKey, LambdaSeesTarget, UpdateBeforeScore])
def test_broken_normalization_is_caught(broken):
    rule = normalization(broken())
    assert not rule.passed and rule.figure > 1e-3


def test_target_in_key_sums_to_far_more_than_one():
    assert normalization(TargetInKey()).figure > 1.0


def test_two_pass_rescorer_is_caught_by_causality():
    assert normalization(TwoPass(stream())).passed  # each row is a distribution...
    rule = causality(TwoPass)  # ...built from tokens not scored yet
    assert not rule.passed and rule.figure > 0


def test_our_cache_passes_both_through_the_streaming_interface():
    tokens, n = stream(), 400
    p = CacheParams(max_order=3, mix="online", lam=0.2, entropy_bins=4, prior=4.0, update_every=32, max_state_bytes=1 << 20)
    model_prob = np.array([model_dist(t)[tokens[t]] for t in range(1, n + 1)])
    entropy = np.random.default_rng(5).uniform(0, 3, n)
    recorded = cache.rescore(tokens, model_prob, entropy, V, p).prob
    scorer = cache.CacheScorer(V, n, p, int(tokens[0]))
    rule = audit.normalization(scorer, tokens, np.arange(1, n + 1, 3), model_dist, model_prob, entropy, recorded)
    assert rule.passed and rule.figure < 1e-12
    assert audit.causality("c", lambda toks: cache.rescore(toks, model_prob, entropy, V, p).prob, tokens, 200).passed


def test_leading_space_counted_twice_is_caught(fineweb, sp1024):
    tokens = shards.read_tokens(fineweb / "val_head_sp1024.bin")[:20001]
    sp = tokenizer.load(sp1024)
    starts = windows.doc_starts(tokens, sp.bos_id())
    texts = [sp.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, np.append(starts[1:], len(tokens)))]
    good = ByteTables.from_sentencepiece(sp)
    broken = ByteTables(good.base_bytes + good.leading_space, good.leading_space, good.boundary)
    doc = windows.doc_of(np.arange(1, len(tokens)), starts)

    def per_doc(t: ByteTables) -> np.ndarray:
        return np.bincount(doc, position_bytes(tokens, t)[1:], minlength=len(starts)).astype(np.int64)

    assert rules.utf8_bytes(texts, per_doc(good)).passed
    bad = rules.utf8_bytes(texts, per_doc(broken))
    assert not bad.passed and bad.figure > 0


def test_budgets_and_overlap_rules():
    assert not audit.at_most("artifact_bytes", 16_000_001, 16_000_000, "").passed
    assert audit.at_most("artifact_bytes", 16_000_000, 16_000_000, "").passed
    assert not audit.disjoint("val_not_in_train", np.array([1, 2, 3], np.uint64), np.array([9, 3], np.uint64), "").passed
    assert audit.disjoint("val_not_in_train", np.array([1, 2], np.uint64), np.array([9], np.uint64), "").passed


# The stage on a whole small pipeline.


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, fineweb):
    p = tiny_params(shards_params(fineweb, tmp_path_factory.mktemp("src"), 6000, 40000))
    root = tmp_path_factory.mktemp("run")
    p["quant"].update(calib_seqs=8, seq_len=32)
    p["eval"].update(seq_len=64, stride=16, batch=32)
    p["verify"].update(positions=16)
    run_stages(root, p, "tokenize", "train", "calibrate", "pack", "score", "adapt", "rescore")
    return root, p


def test_the_real_pipeline_passes_every_rule(pipeline):
    root, p = pipeline
    result = run_stage("report", root, p)
    assert result.returncode == 0, result.stderr
    report = json.loads((root / "metrics/report.json").read_text())
    rules = json.loads((root / "reports/details/report.json").read_text())["rules"]
    assert report["passed"] and all(r["passed"] for r in rules.values()) and report["rules_passed"] == report["rules"]
    copied = {k for k, r in rules.items() if r["copied"]}  # the stages' seconds: reported, never certified
    assert copied == {"cache_overhead", "training_budget", "eval_budget"} and report["rules"] + report["rules_copied"] == len(rules)
    assert all(not isinstance(v, (dict, list)) for v in report.values())  # flat headline figures for dvc metrics show
    assert set(rules) == {"single_pass_adapt", "in_range_adapt", "normalization", "substitution_cache", "causality_cache", "causality_pass1",
                          "substitution_pass1", "substitution_adapt", "causality_adapt", "doc_isolation_adapt", "single_pass",
                          "in_range_pass1", "in_range_cache", "records_pass1", "metrics_match",
                          "artifact_bytes", "state_bytes", "cache_overhead", "training_budget", "eval_budget", "val_not_in_train",
                          "val_not_in_calibration", "bytes_are_utf8", "val_starts_with_bos"}
    assert "disagreed with a plain run on 0 of" in rules["substitution_cache"]["detail"]
    assert rules["causality_cache"]["detail"].split(":")[0].count(", ") == 3  # four cuts, named
    for key in ("val_bpb_pre_quant", "val_bpb_post_quant", "quant_penalty", "val_bpb_scored", "val_bpb_cache", "cache_gain",
                "artifact_bytes", "code_bytes", "weight_bytes", "state_bytes"):
        assert key in report
    text = (root / "reports/report.md").read_text()
    assert "| normalization | pass |" in text and report["revision"] in text
    assert (root / "metrics/bpb_by_position.csv").read_text().startswith("bucket,from_position,targets,neural,cache")
    # The plots are SVG files beside the report, embedded in it: they render offline.
    for name in ("train_curve", "bpb_by_position", "quant_error"):
        assert f"![{name}](plots/{name}.svg)" in text
        svg = ET.parse(root / f"reports/plots/{name}.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    rows = len((root / "metrics/train_curve.csv").read_text().splitlines()) - 1
    curve = ET.parse(root / "reports/plots/train_curve.svg").getroot().find("{http://www.w3.org/2000/svg}polyline")
    assert len(curve.get("points").split()) == rows
    bars = ET.parse(root / "reports/plots/quant_error.svg").getroot().findall("{http://www.w3.org/2000/svg}rect")
    assert len(bars) - 1 == len((root / "metrics/quant_error.csv").read_text().splitlines()) - 1  # one per tensor, plus the background


def test_strict_fails_naming_the_rule_after_writing_the_report(pipeline):
    root, p = pipeline
    p = json.loads(json.dumps(p))
    p["verify"]["byte_limit"] = 1000
    result = run_stage("report", root, p)
    assert result.returncode == 2 and "artifact_bytes" in result.stderr
    report = json.loads((root / "metrics/report.json").read_text())
    rules = json.loads((root / "reports/details/report.json").read_text())["rules"]
    assert not rules["artifact_bytes"]["passed"] and not report["passed"]
    p["verify"]["strict"] = False
    assert run_stage("report", root, p).returncode == 0


def test_the_report_recomputes_what_it_certifies(pipeline, tmp_path):
    """Hand-edited headline metrics and records forged past any prefix both fail the report; its figures are its own."""
    src, p = pipeline
    root = tmp_path / "run"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("locks"))
    p = json.loads(json.dumps(p))
    p["ttt"]["method"] = "none"  # spares the report its reruns of the adaptation, which this test is not about
    assert run_stage("adapt", root, p).returncode == 0
    truth = {stage: json.loads((root / f"metrics/{stage}.json").read_text()) for stage in ("score", "adapt", "rescore")}
    for stage, value in (("score", 1.1), ("adapt", 1.0), ("rescore", 0.9)):
        (root / f"metrics/{stage}.json").write_text(json.dumps({**truth[stage], "val_bpb": value}))
    result = run_stage("report", root, p)
    assert result.returncode == 2 and "metrics_match" in result.stderr
    report = json.loads((root / "metrics/report.json").read_text())
    assert (report["val_bpb_scored"], report["val_bpb_adapt"], report["val_bpb_cache"]) == tuple(truth[s]["val_bpb"] for s in ("score", "adapt", "rescore"))
    for stage in truth:
        (root / f"metrics/{stage}.json").write_text(json.dumps(truth[stage]))
    # Every pass-1 NLL after the first quarter halved, then an honest rescore of the forged records: only the records check sees it.
    table = pq.read_table(root / "eval/score.parquet")
    nll = table.column("nll").to_numpy().copy()
    nll[len(nll) // 4 :] /= 2
    pq.write_table(table.set_column(table.schema.get_field_index("nll"), "nll", pa.array(nll)), root / "eval/score.parquet")
    assert run_stage("rescore", root, p).returncode == 0
    result = run_stage("report", root, p)
    rules = json.loads((root / "reports/details/report.json").read_text())["rules"]
    assert result.returncode == 2 and not rules["records_pass1"]["passed"] and rules["records_pass1"]["figure"] > 0
    assert rules["single_pass"]["passed"]  # the cache is honest about the records it was handed
