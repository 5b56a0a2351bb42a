import pytest

from pgolf.files import staged, write_json


def test_failure_leaves_previous_outputs_and_no_temporaries(tmp_path):
    out_dir, out_file = tmp_path / "shards", tmp_path / "manifest.json"
    with staged(out_dir, out_file) as (d, f):
        d.mkdir()
        (d / "a.bin").write_bytes(b"old")
        f.write_text("old")
    with pytest.raises(RuntimeError):
        with staged(out_dir, out_file) as (d, f):
            d.mkdir()
            (d / "a.bin").write_bytes(b"half")
            raise RuntimeError("killed midway")
    assert (out_dir / "a.bin").read_bytes() == b"old" and out_file.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shards"]


def test_success_replaces_directories_whole(tmp_path):
    out = tmp_path / "shards"
    for names in (["a", "b"], ["c"]):
        with staged(out) as (d,):
            d.mkdir()
            for n in names:
                (d / n).write_text(n)
    assert sorted(p.name for p in out.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    (tmp_path / ".m.json.tmp-99999").write_text("junk")
    write_json(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_output_never_written_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="never written"):
        with staged(tmp_path / "x"):
            pass
