"""The token tilt (pgolf/tilt.py): causal hints, a normalized tilted distribution, audited in the pipeline."""
import json

import numpy as np
import torch

from pgolf import audit, tilt
from conftest import run_stages, shards_params, tiny_params


def hints_by_definition(tokens, order, threshold):
    """For each t: among the followers of tokens[t-order:t] in tokens[:t], the most frequent; of equals,
    the one that reached that count first; none below the threshold."""
    out = np.full(len(tokens), -1)
    for t in range(order, len(tokens)):
        ctx = list(tokens[t - order : t])
        reached = {}  # token -> (count, where it reached it)
        for e in range(order, t):
            if list(tokens[e - order : e]) == ctx:
                c = reached.get(tokens[e], (0, 0))[0] + 1
                reached[tokens[e]] = (c, e)
        if reached:
            best = max(c for c, _ in reached.values())
            h = min((e, tok) for tok, (c, e) in reached.items() if c == best)[1]
            out[t] = h if best >= threshold else -1
    return out


def test_hints_follow_the_definition_and_only_the_past():
    tokens = np.random.default_rng(0).integers(0, 4, 300)
    for order, threshold in ((1, 1), (2, 2), (3, 1)):
        h = tilt.hints(tokens, order, threshold)
        assert np.array_equal(h, hints_by_definition(tokens, order, threshold))
        changed = tokens.copy()
        changed[150:] = (changed[150:] + 1) % 4
        assert np.array_equal(tilt.hints(changed, order, threshold)[:151], h[:151])  # hints[t] reads tokens[:t] only


def test_the_tilted_distribution_is_the_formula_and_sums_to_one():
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(5, 9, generator=g, dtype=torch.float64), -1)
    hint = torch.tensor([3, -1, 0, 8, 3])
    out = tilt.tilted(logp, hint, 1.5).exp()
    p = logp.exp()
    for r, h in enumerate(hint.tolist()):
        want = p[r] if h < 0 else p[r] * torch.exp(1.5 * (torch.arange(9) == h)) / (1 + p[r, h] * (np.exp(1.5) - 1))
        assert torch.allclose(out[r], want, atol=1e-12)
    assert torch.allclose(out.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_a_tilt_on_the_stream_passes_the_black_box_audits():
    V, tokens = 6, np.random.default_rng(2).integers(0, 6, 120)
    base = torch.log_softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64), -1)

    def run(stream):  # a bigram model, tilted by the hints of the stream it is handed
        h = torch.from_numpy(tilt.hints(stream, 2, 1)[1:])
        logp = tilt.tilted(base[torch.from_numpy(stream[:-1].astype(np.int64))], h, 2.0)
        return logp.gather(-1, torch.from_numpy(stream[1:].astype(np.int64))[:, None]).squeeze(-1).exp().numpy()

    assert audit.substitution(run, tokens, np.array([3, 40, 77, 119]), V).passed
    assert audit.causality_cuts("causality", run, tokens, audit.cuts(len(tokens), 4)).passed


def test_the_pipeline_scores_with_the_tilt_and_every_rule_holds(tmp_path, fineweb):
    root = tmp_path / "run"
    root.mkdir()
    p = tiny_params(shards_params(fineweb, tmp_path / "src", 3000, 20000))
    p["quant"].update(calib_seqs=4, seq_len=32)
    p["eval"].update(seq_len=32, stride=16, tilt_order=2, tilt_threshold=1, tilt_boost=1.0)
    p["verify"].update(positions=8)
    p["ttt"].update(method="chunk_sgd", chunk_tokens=512, epochs=1, lr=0.01)
    p["cache"]["input"] = "adapt"
    run_stages(root, p, "tokenize", "train", "calibrate", "pack", "score", "adapt", "rescore", "report")
    score = json.loads((root / "metrics/score.json").read_text())
    report = json.loads((root / "metrics/report.json").read_text())
    assert score["mode"] == "sliding-16-tilt2" and report["passed"] and report["rules_passed"] == report["rules"]
