import hashlib
import json
import re
import struct

import pytest
import torch
import zstandard

from pgolf import artifact, checkpoint, codes, pack
from pgolf.errors import InputError
from conftest import REPO, make_data, run_stage, run_stages, tiny_params


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.codes": torch.randint(-15, 16, (40, 24), generator=g, dtype=torch.int8),
        "e.codes": torch.randint(-127, 128, (30, 8), generator=g, dtype=torch.int8),
        "w.scale": torch.rand(40, generator=g).half(),
        "gain": torch.randn(7, generator=g),
    }


@pytest.mark.parametrize("filt", ["raw", "transpose", "bitpack"])
def test_every_filter_round_trips(filt):
    codes = sample_tensors()["w.codes"]
    assert torch.equal(artifact.decode(pack.encode(codes, filt, 5), filt, "int8", list(codes.shape), 5), codes)


def test_float_filters_round_trip_bit_for_bit():
    for t in (sample_tensors()["w.scale"], sample_tensors()["gain"], torch.tensor([float("nan"), -0.0, 1e-40])):
        dtype = str(t.dtype).removeprefix("torch.")
        back = artifact.decode(pack.encode(t, "bytesplit"), "bytesplit", dtype, list(t.shape))
        assert back.dtype == t.dtype and back.numpy().tobytes() == t.numpy().tobytes()


def test_pack_unpack_is_identity_and_records_filters():
    tensors = sample_tensors()
    blob, report = pack.pack(tensors, {"w.codes": 5}, {"model": {}, "quantized": []}, level=3)
    back, meta = artifact.unpack(blob)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert set(report["filters"]) == set(tensors) and meta == {"model": {}, "quantized": []}
    assert report["layout_bytes"][report["layout"]] == min(report["layout_bytes"].values())


def test_damaged_artifacts_are_refused():
    blob, _ = pack.pack(sample_tensors(), {"w.codes": 5}, {}, level=3)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    for bad, message in [(blob[:-10], "checksum"), (bytes(flipped), "checksum"), (b"NOTPGOLF" + blob[8:], "bad magic"), (b"", "too short")]:
        with pytest.raises(InputError, match=message):
            artifact.unpack(bad, "x.pgolf")


def _with_header(header: dict, header_len: int | None = None) -> bytes:
    z = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    body = artifact.MAGIC + struct.pack("<I", len(z) if header_len is None else header_len) + z + zstandard.ZstdCompressor().compress(b"\0" * 8)
    return body + hashlib.sha256(body).digest()  # a valid checksum: only the sizes are absurd


def test_absurd_sizes_are_refused_before_allocating():
    with pytest.raises(InputError, match="header claims 4294967295 bytes"):
        artifact.unpack(_with_header({}, header_len=2**32 - 1))
    with pytest.raises(InputError, match="payload claims 1099511627776 bytes"):
        artifact.unpack(_with_header({"version": 1, "meta": {}, "payload_size": 2**40, "tensors": []}))
    entry = {"name": "w", "dtype": "int8", "shape": [8], "bits": 8, "filter": "raw", "offset": 4, "length": 8}
    with pytest.raises(InputError, match="outside the payload"):
        artifact.unpack(_with_header({"version": 1, "payload_size": 8, "tensors": [entry], "meta": {}}))
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (2 * artifact.MAX_HEADER))
    body = artifact.MAGIC + struct.pack("<I", len(bomb)) + bomb
    with pytest.raises(InputError, match="unreadable header"):
        artifact.unpack(body + hashlib.sha256(body).digest())


@pytest.fixture(scope="module")
def packed(tmp_path_factory, fineweb):
    root = make_data(tmp_path_factory.mktemp("pack"), fineweb)
    p = tiny_params()
    p["quant"].update(calib_seqs=8, seq_len=32, bits={"attn": 5, "mlp": 4, "embed": 6})
    run_stages(root, p, "train", "calibrate", "pack")
    return root, p


def test_pack_stage_round_trips_the_calibrated_tensors(packed):
    root, _ = packed
    tensors, meta = artifact.unpack((root / "artifacts/model.pgolf").read_bytes())
    calibrated, qmeta = checkpoint.read_safetensors(root / "artifacts/quant.safetensors")
    assert tensors.keys() == calibrated.keys() and all(torch.equal(tensors[k], calibrated[k]) for k in tensors)
    a, b = artifact.load_model(root / "artifacts/model.pgolf"), codes.model_from_tensors(calibrated, qmeta)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    m = json.loads((root / "metrics/pack.json").read_text())
    assert m["total_bytes"] == m["weight_bytes"] + m["code_bytes"] == (root / "artifacts/model.pgolf").stat().st_size + m["code_bytes"]
    code_files = json.loads((root / "reports/details/pack.json").read_text())["code_files"]
    assert set(code_files) == {"pgolf/artifact.py", "pgolf/codes.py", "pgolf/errors.py", "pgolf/model.py"}  # a self-contained loader
    assert m["code_bytes"] <= 32_000  # the loader and the model with the record family's features, little else
    assert m["code_bytes"] == sum(len((REPO / f).read_bytes()) for f in code_files)


def test_over_budget_fails_with_the_bytes_over(packed):
    root, p = packed
    before = (root / "artifacts/model.pgolf").read_bytes()
    p = json.loads(json.dumps(p))
    p["pack"]["byte_limit"] = 40_000
    result = run_stage("pack", root, p)
    assert result.returncode == 2
    over = int(re.search(r"([\d,]+) bytes over", result.stderr).group(1).replace(",", ""))
    total = json.loads((root / "metrics/pack.json").read_text())["total_bytes"]
    assert over == total - 40_000
    assert (root / "artifacts/model.pgolf").read_bytes() == before  # the earlier artifact is untouched


def test_no_pickle_loading_anywhere_in_the_code():
    pattern = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)|allow_pickle=True")
    offenders = [str(p) for d in ("pgolf", "stages", "bench") for p in (REPO / d).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
