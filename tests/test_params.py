import re
from typing import Annotated

import pytest
import yaml

from pgolf import params
from pgolf.errors import InputError
from pgolf.dataset import DataParams
from pgolf.tokenizer import TokenizerParams
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


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    """YAML 1.1 reads `1e6` and `1e-3` (no dot) as strings; a numeric key takes them as the numbers they are."""
    from pgolf.trainer import TrainParams

    text = (REPO / "params.yaml").read_text().replace("max_seconds: 0 ", "max_seconds: 6e2 ").replace("adam_eps: 1.0e-8", "adam_eps: 1e-8")
    text = text.replace("iterations: 100", "iterations: 1e2").replace("seed: 1337", "seed: 1e3")
    (tmp_path / "params.yaml").write_text(text)
    p = params.load(tmp_path / "params.yaml")
    t = params.section(p, "train", TrainParams)
    assert (t.max_seconds, t.adam_eps, t.iterations, params.scalar(p, "seed", int)) == (600.0, 1e-8, 100, 1000)
    assert isinstance(t.iterations, int)
    p["train"]["iterations"] = "1.5e0"
    with pytest.raises(InputError, match=r"train\.iterations is '1\.5e0'; expected int"):
        params.section(p, "train", TrainParams)
    p["train"]["iterations"] = "lots"
    with pytest.raises(InputError, match=r"train\.iterations is 'lots'; expected int"):
        params.section(p, "train", TrainParams)


def _section_of(key: str):
    from pgolf.cache import CacheParams
    from pgolf.score import EvalParams
    from pgolf.trainer import TrainParams
    from pgolf.ttt import TTTParams

    return {"eval": EvalParams, "ttt": TTTParams, "cache": CacheParams, "train": TrainParams}[key.split(".")[0]]


@pytest.mark.parametrize("key, text, expected", [
    ("eval.tilt_boost", ".nan", "a finite float in [-16, 16]"),
    ("eval.tilt_boost", ".inf", "a finite float in [-16, 16]"),
    ("eval.tilt_boost", "-.inf", "a finite float in [-16, 16]"),
    ("ttt.lora_lr", ".nan", "a finite float >= 0"),
    ("ttt.lora_alpha", ".nan", "a finite float > 0"),
    ("ttt.lora_wd", ".nan", "a finite float >= 0"),
    ("ttt.lr", ".nan", "a finite float >= 0"),
    ("ttt.grad_clip", ".nan", "a finite float >= 0"),
    ("train.adam_eps", ".inf", "a finite float > 0"),
])
def test_a_float_that_is_not_finite_is_refused_naming_the_key(key, text, expected):
    """YAML's .nan and .inf are floats; no param means them, and the message says what would do."""
    p = default_params()
    section, name = key.split(".")
    p[section][name] = yaml.safe_load(f"v: {text}")["v"]
    shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[text]
    with pytest.raises(InputError, match=re.escape(f"params.yaml: {key} is {shown}; expected {expected}")):
        params.section(p, section, _section_of(key))


@pytest.mark.parametrize("key, value, expected", [
    ("ttt.momentum", 1.0, "a finite float in [0, 1)"),
    ("ttt.lora_rank", 0, "int >= 1"),
    ("eval.tilt_boost", 17.0, "a finite float in [-16, 16]"),
    ("eval.tilt_order", 17, "int in [0, 16]"),
    ("cache.lam", 1.5, "a finite float in [0, 1]"),
    ("cache.prior", 0, "a finite float > 0"),
    ("train.ema_decay", 1.0, "a finite float in [0, 1)"),
])
def test_ranges_declared_beside_the_fields_are_enforced(key, value, expected):
    p = default_params()
    section, name = key.split(".")
    p[section][name] = value
    with pytest.raises(InputError, match=re.escape(f"params.yaml: {key} is {value!r}; expected {expected}")):
        params.section(p, section, _section_of(key))
    p[section][name] = str(value)  # a number YAML read as a string is the number, bounds and all
    with pytest.raises(InputError, match=re.escape(f"{key} is '{value}'")):
        params.section(p, section, _section_of(key))


def test_a_key_of_another_section_is_read_checked():
    p = default_params()
    kind = Annotated[int, params.Range(ge=1)]
    assert params.scalar(p, "verify.max_state_bytes", kind) == 33554432
    p["verify"]["max_state_bytes"] = 0
    with pytest.raises(InputError, match=re.escape("params.yaml: verify.max_state_bytes is 0; expected int >= 1")):
        params.scalar(p, "verify.max_state_bytes", kind)
    with pytest.raises(InputError, match="section 'verify' is missing"):
        params.scalar({}, "verify.max_state_bytes", kind)
