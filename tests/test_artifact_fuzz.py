"""The artifact loader against thousands of mutated headers and payloads (tests/artifact_fuzz.py)."""
import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import REPO, default_params, run_stage

sys.path.insert(0, str(REPO / "tests"))
import artifact_fuzz  # noqa: E402

# Header fields the loader does not need (pack's per-class bit summary) or whose any parsed value is a valid model
# (the fuzzed model has the record features off, so their sizes and scales are free).
HARMLESS = ("meta.bits.", "meta.model.qk_gain_init", "meta.model.logit_softcap", "meta.model.tied_embed_init_std", "meta.model.leaky_slope",
            "meta.model.attn_gate_scale", "meta.model.gate_window", "meta.model.rope_scale_len", "meta.model.loop_start", "meta.model.loop_end")
# Setting to zero a field that is already zero changes nothing.
ZERO_ALREADY = tuple(f"zero meta.model.{k}" for k, v in dataclasses.asdict(artifact_fuzz.TINY).items() if v == 0 and not isinstance(v, bool))


def harmless(mutation: str) -> bool:
    # A stream index or offset set to zero loads only where it was zero already (else the streams no longer tile).
    return mutation.split(" ", 1)[1].startswith(HARMLESS) or mutation in ZERO_ALREADY or re.fullmatch(r"zero tensors\.\d+\.(stream|offset)", mutation)


# What refuses each bomb (stream 0's declared size is n): the check that stops it before it costs memory, time or a terminal.
BOMBS = {"model of dim 16384 x 200 layers": r"the header declares 200 layers of 16384 ",
         "1 GiB of zeros, zstd (its frame says 1 GiB)": r"a zstd frame declares 1073741824 bytes, the header \d+$",
         "a zstd frame claiming 1 TB": r"a zstd frame declares 1099511627776 bytes, the header \d+$",
         "1 GiB of zeros, brotli": r"a brotli stream decompresses past its declared \d+ bytes",
         "1 GiB of zeros, lrzip": r"an lrzip stream decompresses past its declared \d+ bytes$",
         "lrzip header claiming 900 MiB": r"an lrzip stream does not declare its \d+ bytes$",
         "lrzip, encrypted": r"an lrzip stream is not an unencrypted lrzip 0.6 file$",
         "lrzip, cut short": r"lrzip failed \(exit status 1\): \S",
         "lrzip, corrupt": r"lrzip failed \(exit status 1\): \S",
         "tensors of 900 MiB": r"the streams claim over "}


def test_thousands_of_mutated_artifacts_are_refused_with_bounded_memory(lrzip):
    out = subprocess.run([sys.executable, str(REPO / "tests/artifact_fuzz.py"), "2000", "0"], capture_output=True, text=True,
                         cwd=REPO, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["other"] == []  # every refusal is an InputError: one `error:` line, exit 2
    for case in r["loaded"]:  # what loads is a valid artifact: a payload bit flipped under a new checksum, or a harmless field
        assert case == "payload flip" or all(harmless(m) for m in case.split("; ")), case
    assert r["cases"] == 2000 + len(BOMBS) and r["refused"] >= 0.9 * r["cases"]
    assert r["bombs"].keys() == BOMBS.keys() and all(re.match(v, r["bombs"][k]) for k, v in BOMBS.items()), r["bombs"]
    # The bombs declare a 16384 x 200 model and 1 GiB streams in each codec; the process (torch included) and the lrzip
    # program it runs stay small, each bomb's peak under the largest.
    assert r["max_rss_mb"] < 1024 and 0 < r["max_rss_children_mb"] < 1024, (r["max_rss_mb"], r["max_rss_children_mb"])


@pytest.fixture(scope="module")
def mutants(lrzip):
    blob = artifact_fuzz.tiny_artifact()
    header, payload = artifact_fuzz.split(blob)
    rng = random.Random(1)
    cases = [b for _, b in artifact_fuzz.bombs(header, payload)]
    broken = json.loads(json.dumps(header))
    del broken["tensors"][3]["dtype"]
    cases.append(artifact_fuzz.join(broken, payload))
    broken = json.loads(json.dumps(header))
    broken["tensors"] = {"not": "a list"}
    cases.append(artifact_fuzz.join(broken, payload))
    broken = json.loads(json.dumps(header))
    broken["meta"]["model"] = [1, 2]
    cases.append(artifact_fuzz.join(broken, payload))
    broken = json.loads(json.dumps(header))
    broken["tensors"][0]["shape"] = [-4, 16]
    cases.append(artifact_fuzz.join(broken, payload))
    cases.append(artifact_fuzz.join(header, artifact_fuzz.mutate_payload(payload, rng)[0] + b"\0"))
    return cases


def test_each_refusal_reaches_the_user_as_one_error_line_and_exit_2(tmp_path, mutants):
    (tmp_path / "artifacts").mkdir()
    for blob in mutants:
        (tmp_path / "artifacts/model.pgolf").write_bytes(blob)
        result = run_stage("score", tmp_path, default_params())
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: artifacts/model.pgolf: ") and result.stderr.count("\n") == 1, result.stderr
        assert not (tmp_path / "eval").exists() and not (tmp_path / "metrics").exists()
