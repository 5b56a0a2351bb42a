import pytest

from pgolf import params
from pgolf.errors import InputError
from pgolf.params import DataParams, TokenizerParams
from conftest import REPO, default_params


def test_defaults_load():
    p = params.load(REPO / "params.yaml")
    assert params.section(p, "data", DataParams).source == "builtin"
    assert params.section(p, "tokenizer", TokenizerParams).vocab_size == 1024


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("data", "colour", 1, r"unknown key data\.colour"),
        ("data", "val_docs", "many", r"data\.val_docs is 'many'; expected int"),
        ("data", "workers", True, r"data\.workers is True; expected int"),
        ("data", "source", "web", r"data\.source is 'web'"),
        ("tokenizer", "vocab_size", 70_000, r"tokenizer\.vocab_size is 70000"),
        ("tokenizer", "model", 3, r"tokenizer\.model is 3; expected str or null"),
    ],
)
def test_bad_params_name_the_key(section, key, value, message):
    p = default_params()
    p[section][key] = value
    cls = {"data": DataParams, "tokenizer": TokenizerParams}[section]
    with pytest.raises(InputError, match=message):
        params.section(p, section, cls)


def test_missing_key_and_section():
    p = default_params()
    del p["data"]["val_docs"]
    with pytest.raises(InputError, match=r"missing key data\.val_docs"):
        params.section(p, "data", DataParams)
    with pytest.raises(InputError, match="section 'tokenizer' is missing"):
        params.section({}, "tokenizer", TokenizerParams)


def test_source_needs_its_path():
    p = default_params()
    p["data"]["source"] = "docs"
    with pytest.raises(InputError, match=r"data\.docs is empty"):
        params.section(p, "data", DataParams)
