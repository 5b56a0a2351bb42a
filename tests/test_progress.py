"""Progress lines: rate and ETA, readable at slow rates, a one-line summary."""
from pgolf import progress
from pgolf.progress import Progress


def test_slow_rates_are_not_rounded_to_zero():
    assert progress._fmt(0.4, "tensors") == "0.40 tensors"
    assert progress._fmt(3.0, "tensors") == "3 tensors"
    assert progress._fmt(12345.6, "tokens") == "12,346 tokens"


def test_each_update_logs_rate_eta_and_what_was_done(capsys):
    p = Progress("report", 4, "steps", every=0)
    p.update(what="normalization")
    err = capsys.readouterr().err
    assert err.startswith("report: normalization, 1 steps / 4 steps (25%), ETA ") and err.rstrip().endswith("steps/s")
    p.done("all rules pass")
    assert capsys.readouterr().err.startswith("report: 1 steps in ")


def test_named_steps_keep_their_own_seconds(monkeypatch):
    clock = iter([100.0, 101.5, 104.0, 104.25])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    p = Progress("report", 3, "steps", every=1e9)
    p.update(what="adapt rerun")
    p.update(what="substitution_adapt")
    p.update()  # unnamed: no lap
    assert p.laps == {"adapt rerun": 1.5, "substitution_adapt": 2.5}
