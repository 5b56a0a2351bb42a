"""The black-box audits against the field's invalid patterns and the legal ones (pgolf/audit.py).

Each method is a function run(stream) -> the probability it records for targets 1..len(stream)-1, as the
audits see every method; vocabulary 8, BOS 1. The invalid ones are the shapes the challenge saw.
"""
import numpy as np
import pytest

from pgolf import audit

V, BOS = 8, 1
TABLE = np.random.default_rng(0).normal(size=(V, V, V))  # a fixed "neural" model: logits from the last two tokens


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def neural(stream: np.ndarray, t: int, lo: int = 0) -> np.ndarray:
    """The model's distribution for target t from context stream[lo:t] (two tokens at most)."""
    a = stream[t - 2] if t - 2 >= lo else 0
    return softmax(TABLE[a, stream[t - 1]])


def counts(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens, minlength=V).astype(np.float64)


def mix(base: np.ndarray, c: np.ndarray) -> np.ndarray:
    return 0.5 * base + 0.5 * (c + 1) / (c.sum() + V)


def stream_of(n: int = 300, seed: int = 1) -> np.ndarray:
    s = np.random.default_rng(seed).integers(2, V, n)
    s[[0, 40, 41, 90, 200, 260]] = BOS  # documents, one of them empty
    return s


CHUNK = 50


# Legal methods.
def sliding(s):
    return np.array([neural(s, t)[s[t]] for t in range(1, len(s))])


def doc_isolated(s):
    starts = np.flatnonzero(s == BOS)
    return np.array([neural(s, t, starts[starts < t].max(initial=0))[s[t]] for t in range(1, len(s))])


def cache(s):  # counts of every token already scored
    return np.array([mix(neural(s, t), counts(s[1:t]))[s[t]] for t in range(1, len(s))])


def chunk_ttt(s):  # each chunk scored with what earlier chunks taught, then trained on
    return np.array([mix(neural(s, t), counts(s[1 : 1 + (t - 1) // CHUNK * CHUNK]))[s[t]] for t in range(1, len(s))])


def doc_chunks(s, lo, t, chunk=8):  # the tokens of t's document in chunks before t's own
    return s[lo + 1 : lo + 1 + (t - 1 - lo) // chunk * chunk]


def doc_lora(s):  # per document: each chunk scored with what the document's earlier chunks taught
    starts = np.flatnonzero(s == BOS)
    out = []
    for t in range(1, len(s)):
        lo = starts[starts < t].max(initial=0)
        out.append(mix(neural(s, t, lo), counts(doc_chunks(s, lo, t)))[s[t]])
    return np.array(out)


def phased(s):  # doc_lora, plus what the documents before position 100 taught, once all of them are scored
    starts = np.flatnonzero(s == BOS)
    out = []
    for t in range(1, len(s)):
        lo = starts[starts < t].max(initial=0)
        done = counts(s[1 : starts[starts <= 100].max()]) if lo > 100 else 0
        out.append(mix(neural(s, t, lo), counts(doc_chunks(s, lo, t)) + done)[s[t]])
    return np.array(out)


def tilt_p(s, t, hint, beta=1.0):
    p = neural(s, t)
    q = p * np.exp(beta * (np.arange(V) == hint))
    return q / (1 + p[hint] * (np.e**beta - 1))


def tilt(s):  # hint: the token that most often followed the previous token so far
    out = []
    for t in range(1, len(s)):
        follow = counts(s[1:t][s[: t - 1] == s[t - 1]])
        out.append(tilt_p(s, t, int(follow.argmax()))[s[t]])
    return np.array(out)


# Invalid methods.
def trained_before_scored(s):  # the chunk holding t is in the counts when t is scored
    return np.array([mix(neural(s, t), counts(s[1 : min(len(s), 1 + ((t - 1) // CHUNK + 1) * CHUNK)]))[s[t]] for t in range(1, len(s))])


def last_epoch(s):  # epoch 1 trains on every chunk; what is reported is epoch 2's scores
    return np.array([mix(neural(s, t), counts(s[1:]))[s[t]] for t in range(1, len(s))])


def trained_on_validation(s):  # all of validation trained on first, then scored with legal chunked TTT on top
    return np.array([mix(neural(s, t), 0.3 * counts(s[1:]) + counts(s[1 : 1 + (t - 1) // CHUNK * CHUNK]))[s[t]] for t in range(1, len(s))])


def slot(s):  # a delta fitted to the window being scored (16 targets), then used to score that window
    return np.array([mix(neural(s, t), 4 * counts(s[1 + (t - 1) // 16 * 16 : 1 + ((t - 1) // 16 + 1) * 16]))[s[t]] for t in range(1, len(s))])


def around_target(s):  # reads the target from the stream it holds and normalizes around it
    out = []
    for t in range(1, len(s)):
        q = neural(s, t) * np.where(np.arange(V) == s[t], 3.0, 1.0)
        out.append((q / q.sum())[s[t]])
    return np.array(out)


def negative_mixture(s):  # 1.6 * model - 0.6 * cache: sums to 1, not a distribution
    return np.array([(1.6 * neural(s, t) - 0.6 * (counts(s[1:t]) + 1) / (t - 1 + V))[s[t]] for t in range(1, len(s))])


def smear_leak(s):  # "per document", but the previous token crosses the BOS
    starts = np.flatnonzero(s == BOS)
    out = []
    for t in range(1, len(s)):
        lo = starts[starts < t].max(initial=0)
        p = neural(s, t, lo)
        if s[t - 1] == BOS and t >= 2:
            p = softmax(np.log(p) + 0.3 * TABLE[s[t - 2], 0])  # the last token of the previous document
        out.append(p[s[t]])
    return np.array(out)


def target_tilt(s):  # PR #1514's banned within-word expert: its hint is the target itself
    return np.array([tilt_p(s, t, int(s[t]))[s[t]] for t in range(1, len(s))])


TOKENS = stream_of()
POSITIONS = np.array([1, 2, 41, 42, 51, 99, 150, 151, 201, 299])  # including the first target after each chunk commit
CUTS = audit.cuts(len(TOKENS), 6)


def verdicts(run, per_document=False) -> dict:
    rules = [audit.substitution(run, TOKENS, POSITIONS, V), audit.causality_cuts("causality", run, TOKENS, CUTS),
             audit.in_range("in_range", run(TOKENS))]
    if per_document:
        rules.append(audit.doc_isolation("doc_isolation", run, TOKENS, BOS))
    return {r.name: r.passed for r in rules}


@pytest.mark.parametrize("run, per_document", [(sliding, False), (doc_isolated, True), (cache, False), (chunk_ttt, False), (tilt, False),
                                                (doc_lora, True), (phased, False)])
def test_legal_methods_pass_every_audit(run, per_document):
    assert all(verdicts(run, per_document).values()), verdicts(run, per_document)


@pytest.mark.parametrize("run, broken", [
    (trained_before_scored, {"substitution", "causality"}),
    (last_epoch, {"substitution", "causality"}),
    (trained_on_validation, {"substitution", "causality"}),
    (slot, {"substitution", "causality"}),
    (around_target, {"substitution"}),
    (negative_mixture, {"substitution", "in_range"}),
    (target_tilt, {"substitution"}),
])
def test_invalid_methods_fail_for_the_right_reason(run, broken):
    v = verdicts(run)
    assert {name for name, ok in v.items() if not ok} == broken, v


def test_a_smear_across_bos_breaks_document_isolation():
    v = verdicts(smear_leak, per_document=True)
    assert not v["doc_isolation"] and v["substitution"] and v["causality"], v


def test_global_phases_are_not_per_document():
    assert not audit.doc_isolation("doc_isolation", phased, TOKENS, BOS).passed


def test_causality_with_a_short_random_tail_still_sees_lookahead():
    # Only `tail` random tokens follow each cut and the rest are removed: removing is changing, so a method that
    # reads anything after the cut moves, however far ahead it reads.
    assert not audit.causality_cuts("causality", last_epoch, TOKENS, CUTS, tail=3).passed
    assert audit.causality_cuts("causality", chunk_ttt, TOKENS, CUTS, tail=3).passed


def test_a_trusted_fast_path_is_spot_checked_against_plain_runs():
    # A scorer that holds the whole stream: its batched answer is normalized around the true target,
    # so it sums to one; the plain run on the cut stream cannot see that target and disagrees.
    def held(prefix):
        t = len(prefix)
        q = neural(TOKENS, t) * np.where(np.arange(V) == TOKENS[t], 3.0, 1.0)
        return q / q.sum()

    bad = audit.substitution(around_target, TOKENS, POSITIONS, V, batch=held, spot=3)
    assert not bad.passed and "disagreed with a plain run" in bad.detail and bad.figure <= audit.SUM_TOLERANCE

    def honest(prefix):
        return np.array([neural(np.append(prefix, v), len(prefix))[v] for v in range(V)])

    assert audit.substitution(sliding, TOKENS, POSITIONS, V, batch=honest, spot=3).passed


def test_cuts_spread_over_the_whole_stream():
    c = audit.cuts(100_000, 8, seed=3)
    assert len(c) == 8 and c.min() >= 1 and c.max() < 100_000 and np.all(np.diff(c) > 0)
    assert (np.histogram(c, bins=8, range=(1, 100_000))[0] == 1).all()  # one in each eighth


def test_doc_isolation_within_chooses_early_documents_and_still_catches_a_leak():
    # `within` keeps a costly method's runs short: every document chosen starts by that target, so every
    # changed stream ends by the end of the document after it.
    seen = []

    def recording(run):
        def wrapped(s):
            seen.append(len(s))
            return run(s)
        return wrapped

    assert audit.doc_isolation("doc_isolation", recording(doc_isolated), TOKENS, BOS, docs=2, within=45).passed
    # Documents 0-2 start by target 45 (BOS at 0, 40, 41, 90, 200, 260); the latest, 41..89, is cut after document 3.
    assert seen[0] == len(TOKENS) and len(seen) == 3 and max(seen[1:]) <= 201
    assert not audit.doc_isolation("doc_isolation", smear_leak, TOKENS, BOS, docs=3, within=100).passed
