
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgolf.documents import DocReader, resolve
from pgolf.errors import InputError
from conftest import write_jsonl


def texts(spec, tmp_path):
    return list(DocReader(resolve(spec, tmp_path / "cache")))


def test_all_formats_folders_and_globs_in_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", ["one", "two"])
    pq.write_table(pa.table({"text": ["three", "four"], "id": [1, 2]}), src / "b.parquet", row_group_size=1)
    (src / "c.txt").write_text("five\nstill five\n")
    assert texts(str(src), tmp_path) == ["one", "two", "three", "four", "five\nstill five\n"]
    assert texts(str(src / "*.jsonl"), tmp_path) == ["one", "two"]
    assert texts([str(src / "c.txt"), str(src / "a.jsonl")], tmp_path) == ["five\nstill five\n", "one", "two"]


def test_parquet_binary_text_column(tmp_path):
    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9"], pa.binary())}), tmp_path / "b.parquet")
    assert texts(str(tmp_path / "b.parquet"), tmp_path) == ["café"]


def test_download_path_on_a_local_url(tmp_path):
    src = write_jsonl(tmp_path / "docs_selected.jsonl", ["from a url"])
    url = src.as_uri()
    assert texts(url, tmp_path) == ["from a url"]
    (cached,) = (tmp_path / "cache").rglob("docs_selected.jsonl")
    src.unlink()  # a second run reads the cached copy, not the URL
    assert texts(url, tmp_path) == ["from a url"] and cached.is_file()


def test_failed_download_names_the_url(tmp_path):
    url = (tmp_path / "missing.jsonl").as_uri()
    with pytest.raises(InputError, match="missing.jsonl: download failed"):
        texts(url, tmp_path)
    assert not list((tmp_path / "cache").rglob("*.jsonl"))


def _bad(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"d\.jsonl:2: not valid UTF-8"),
        ("d.jsonl", b'{"text": "ok"}\n{"text": "\\ud800"}\n', r"d\.jsonl:2: text is not valid UTF-8"),
        ("d.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"d\.jsonl:2: no \"text\" field"),
        ("d.jsonl", b'{"text": 5}\n', r"d\.jsonl:1: no \"text\" string"),
        ("d.jsonl", b'{"text": "ok"\n', r"d\.jsonl:1: not valid JSON"),
        ("d.jsonl", b"\n \n", r"d\.jsonl: holds no documents"),
        ("d.txt", b"caf\xe9", r"d\.txt: not valid UTF-8"),
        ("d.csv", b"text\nx\n", r"d\.csv: unsupported document file"),
        ("d.parquet", b"PAR1 not really", r"d\.parquet: not a readable parquet file"),
    ],
)
def test_bad_documents_are_refused_by_file(tmp_path, name, data, message):
    path = _bad(tmp_path, name, data)
    with pytest.raises(InputError, match=message):
        texts(str(path), tmp_path)


def test_parquet_without_text_or_with_nulls_or_bad_utf8(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"a\.parquet: no \"text\" column"):
        texts(str(tmp_path / "a.parquet"), tmp_path)
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: row 1: no \"text\" string"):
        texts(str(tmp_path / "b.parquet"), tmp_path)
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff"], pa.binary())}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet: row 1: text is not valid UTF-8"):
        texts(str(tmp_path / "c.parquet"), tmp_path)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(InputError, match=r"data\.docs: .*nope\.jsonl: no such file"):
        texts(str(tmp_path / "nope.jsonl"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"data\.docs: .*empty: holds no document files"):
        texts(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(InputError, match=r"holds no document files"):
        texts(str(tmp_path / "*.parquet"), tmp_path)
