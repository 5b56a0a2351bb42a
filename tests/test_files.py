import json
import math

import numpy as np
import pytest

from pgolf.errors import InputError, StageError
from pgolf.files import check_file_output, check_finite, staged, write_json


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
        with staged(tmp_path / "x", tmp_path / "y") as (x, _):
            x.write_text("half of the outputs")
    assert list(tmp_path.iterdir()) == []  # no temporary left


def test_a_file_output_never_replaces_a_folder_and_nothing_is_half_replaced(tmp_path):
    folder, first = tmp_path / "imports", tmp_path / "first.json"
    folder.mkdir()
    (folder / "record.pt").write_bytes(b"the user's")
    first.write_text("old")
    with pytest.raises(InputError, match=f"{folder} is a folder; a file output never replaces a folder"):
        with staged(first, folder) as (a, b):
            a.write_text("new")
            b.write_bytes(b"checkpoint")
    assert (folder / "record.pt").read_bytes() == b"the user's" and first.read_text() == "old"  # neither replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "imports"]
    with pytest.raises(InputError, match=f"{first} is a file; a folder output never replaces a file"):
        with staged(first) as (a,):
            a.mkdir()
    with pytest.raises(InputError, match=f"{folder} is a folder"):
        check_file_output(folder)  # the same refusal, before any work


def test_nothing_is_written_under_a_file(tmp_path):
    (tmp_path / "notes").write_text("a file")
    out = tmp_path / "notes" / "sub" / "model.safetensors"
    message = f"{out}: {tmp_path / 'notes'} is not a folder"
    with pytest.raises(InputError, match=message):
        check_file_output(out)
    with pytest.raises(InputError, match=message):
        with staged(out):
            pass
    assert (tmp_path / "notes").read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_metrics_are_strict_json(tmp_path):
    out = tmp_path / "m.json"
    write_json(out, {"val_bpb": 1.5})
    for bad, named in (({"val_bpb": math.nan}, "val_bpb is nan"), ({"rows": [1.0, {"x": -math.inf}]}, r"rows\[1\]\.x is -inf")):
        with pytest.raises(StageError, match=f"{out}: {named}; JSON holds finite numbers only"):
            write_json(out, bad)
    assert json.loads(out.read_text()) == {"val_bpb": 1.5}


def test_a_non_finite_record_names_the_output_and_its_first_position(tmp_path):
    out = tmp_path / "score.parquet"
    out.write_bytes(b"the last good records")
    positions = np.arange(1, 6)
    with pytest.raises(StageError, match=f"{out}: the record of position 3 has entropy inf"):
        with staged(out) as (tmp,):
            tmp.write_bytes(b"half")
            check_finite(tmp, positions, nll=np.array([1, 2, 3, np.nan, 5.0]), entropy=np.array([1, 2, np.inf, 4, 5.0]))
    assert out.read_bytes() == b"the last good records" and [p.name for p in tmp_path.iterdir()] == ["score.parquet"]
    check_finite(out, positions, nll=np.ones(5))
