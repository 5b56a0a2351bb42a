import contextlib
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import brotli
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
    stream = {"codec": "zstd", "shuffle": 1, "size": 17, "payload_size": 8}
    with pytest.raises(InputError, match="streams claim over"):
        artifact.unpack(_with_header({"version": 2, "meta": {}, "streams": [{**stream, "payload_size": 2**40}], "tensors": []}))
    with pytest.raises(InputError, match="the streams take 9 bytes but the file holds 17"):
        artifact.unpack(_with_header({"version": 2, "meta": {}, "streams": [{**stream, "size": 9}], "tensors": []}))
    entry = {"name": "w", "dtype": "int8", "shape": [8], "bits": 8, "filter": "raw", "stream": 0, "offset": 4, "length": 8}
    with pytest.raises(InputError, match="outside stream 0"):
        artifact.unpack(_with_header({"version": 2, "meta": {}, "streams": [stream], "tensors": [entry]}))
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
    assert m["code_bytes"] <= 44_000  # the loader (three codecs, lrzip run in bounds) and the model with the record family's features, little else
    assert m["code"] == "raw" and m["code_bytes"] == m["code_bytes_raw"] == sum(len((REPO / f).read_bytes()) for f in code_files)
    assert m["code_bytes_compressed"] < m["code_bytes_raw"] / 2


def test_the_compressed_code_is_a_script_that_loads_the_artifact(packed, tmp_path):
    # What pack.code: compressed counts must really be the loader: run it where pgolf is not importable.
    root, _ = packed
    from pgolf.sources import code_files, self_extracting
    script = self_extracting(code_files(Path("pgolf/artifact.py")))
    m = json.loads((root / "metrics/pack.json").read_text())
    assert len(script) == m["code_bytes_compressed"]
    (tmp_path / "loader.py").write_bytes(script)
    probe = (f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]; "
             "sys.meta_path = [f for f in sys.meta_path if 'editable' not in str(f).lower()]; "
             "exec(open('loader.py').read()); from pgolf.artifact import load_model; import torch; "
             f"m = load_model({str(root / 'artifacts/model.pgolf')!r}); import pgolf.model as pm; "
             "assert pm.__spec__.origin is None; print(float(m.tok_emb.weight.double().sum()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) == float(artifact.load_model(root / "artifacts/model.pgolf").tok_emb.weight.detach().double().sum())


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


def test_similarity_order_is_the_records_greedy_chain():
    g = torch.Generator().manual_seed(3)
    m = torch.randint(-3, 4, (40, 12), generator=g, dtype=torch.int8).numpy()
    m[7] = m[0]  # ties: the first of equals is taken
    m[9] = m[0]
    order, left = [0], set(range(1, len(m)))  # the plain definition: from row 0, always the nearest remaining row
    while left:
        cur = m[order[-1]].astype(int)
        best = min(sorted(left), key=lambda r: int(abs(m[r].astype(int) - cur).sum()))
        order.append(best)
        left.remove(best)
    assert pack.similarity_order(m).tolist() == order and order[1] == 7


def test_byte_shuffle_is_every_strideth_byte_and_inverts():
    data = bytes(range(11))
    assert pack.shuffle(data, 2) == bytes([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9])
    for stride in (1, 2, 3, 8):
        assert artifact.unshuffle(pack.shuffle(data * 7, stride), stride) == data * 7


def _sorted_artifact() -> tuple[dict, bytes]:
    tensors = sample_tensors()
    plan = pack.Plan("test", {n: "sorted" if n == "w.codes" else "raw" for n in tensors}, {n: int(n == "w.codes") for n in tensors},
                     (("zstd", 1), ("zstd", 2)))
    blob = pack.assemble(tensors, {"w.codes": 5}, {}, plan, 3)
    return tensors, blob


def _rewrite(blob: bytes, edit) -> bytes:
    (n,) = struct.unpack_from("<I", blob, 8)
    header = json.loads(zstandard.ZstdDecompressor().decompress(blob[12 : 12 + n]))
    payload = edit(header, blob[12 + n : -32])
    z = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    body = artifact.MAGIC + struct.pack("<I", len(z)) + z + payload
    return body + hashlib.sha256(body).digest()


def test_sorted_tensors_round_trip_and_a_bad_row_order_is_refused():
    tensors, blob = _sorted_artifact()
    back, _ = artifact.unpack(blob)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)

    def duplicate_row(header, payload):  # the order's stream re-written with its first row twice
        size = header["streams"][0]["size"]
        data = bytearray(zstandard.ZstdDecompressor().decompress(payload[:size]))
        at = next(e for e in header["tensors"] if e["name"] == "w.codes.order")["offset"]
        data[at : at + 2] = data[at + 2 : at + 4]
        z = zstandard.ZstdCompressor().compress(bytes(data))
        header["streams"][0]["size"] = len(z)
        return z + payload[size:]

    with pytest.raises(InputError, match="'w.codes.order' is not a permutation of its rows"):
        artifact.unpack(_rewrite(blob, duplicate_row), "x.pgolf")

    def drop_order(header, payload):
        next(e for e in header["tensors"] if e["name"] == "w.codes.order")["name"] = "v.codes.order"
        return payload

    with pytest.raises(InputError, match="stored sorted: it needs a 2-D shape and an int16 w.codes.order"):
        artifact.unpack(_rewrite(blob, drop_order), "x.pgolf")


def test_an_lrzip_artifact_without_the_program_is_one_clear_error(tmp_path, monkeypatch, lrzip):
    tensors = sample_tensors()
    blob, report = pack.pack(tensors, {"w.codes": 5}, {}, 3, "lrzip")
    assert report["layout"] == "lrzip per-group" and artifact.unpack(blob)[0].keys() == tensors.keys()
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip on it
    with pytest.raises(InputError, match=r"x.pgolf: needs the lrzip program, which is not installed \(apt-get install lrzip\)"):
        artifact.unpack(blob, "x.pgolf")
    with pytest.raises(InputError, match="pack.compressor: needs the lrzip program"):
        pack.pack(tensors, {"w.codes": 5}, {}, 3, "lrzip")
    blob, report = pack.pack(tensors, {"w.codes": 5}, {}, 3, "auto")  # auto tries what is installed, and says so
    assert report["compressors"]["lrzip"] == {"skipped": "the lrzip program is not installed"}


def test_zstd_and_brotli_hold_no_more_than_the_declared_size():
    # python-zstandard's decompress() allocates what a frame's header claims; brotli's output_buffer_limit
    # lets the output reach twice the limit. The loader reads one byte past the declared size, and no more.
    mib, size = bytes(1 << 20), 1 << 20
    z = zstandard.ZstdCompressor(level=1).compressobj(size=64 << 20)
    declared = b"".join(z.compress(mib) for _ in range(64)) + z.flush()
    z = zstandard.ZstdCompressor(level=1).compressobj()
    undeclared = b"".join(z.compress(mib) for _ in range(64)) + z.flush()
    b = brotli.Compressor(quality=1)
    bombs = {"zstd": (declared, undeclared), "brotli": (b"".join(b.process(mib) for _ in range(64)) + b.finish(),)}
    for codec, streams in bombs.items():
        for data in streams:
            tracemalloc.start()
            with pytest.raises(InputError, match=f"x.pgolf: a {codec} (frame declares 67108864 bytes|stream .*{size})"):
                artifact.decompress(data, codec, size, "x.pgolf")
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < size + (256 << 10), (codec, peak)


@pytest.fixture(scope="module")
def lrzip_artifact(lrzip) -> bytes:
    """An artifact with a ZPAQ stream that takes lrzip a second or so to decode."""
    g = torch.Generator().manual_seed(0)
    return pack.pack({"w.codes": torch.randint(-15, 16, (1024, 512), generator=g, dtype=torch.int8)}, {"w.codes": 5}, {}, 3, "lrzip")[0]


def test_lrzip_headers_are_checked_before_the_program_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip: whatever is refused here never reached the program
    stream = b"LRZI\0\x06" + (4096).to_bytes(8, "little") + bytes(64)
    for data, message in [(stream[:22] + b"\1" + stream[23:], "is not an unencrypted lrzip 0.6 file"),  # it would ask for a passphrase
                          (stream[:5] + b"\x05" + stream[6:], "is not an unencrypted lrzip 0.6 file"),
                          (stream[:6] + (4095).to_bytes(8, "little") + stream[14:], "does not declare its 4096 bytes")]:
        with pytest.raises(InputError, match=f"^x.pgolf: an lrzip stream {message}$"):
            artifact.decompress(data, "lrzip", 4096, "x.pgolf")


def _lrzip_children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():  # threads come and go: a vanished one is read again next time
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split() if Path(f"/proc/{c}/comm").read_text().strip() == "lrzip"]
    return found


def test_sigterm_mid_decompression_kills_lrzip_and_leaves_no_folder(tmp_path, lrzip_artifact):
    # SIGTERM (a stage's parent gone, or dvc stopping it) becomes SystemExit in the stage's main thread while a
    # worker thread waits on lrzip: the program is killed, whatever it is doing, and its folder removed.
    (tmp_path / "model.pgolf").write_bytes(lrzip_artifact)
    (tmp_path / "tmp").mkdir()
    code = "from pgolf import artifact, stage; stage.end_with_parent(); artifact.unpack(open('model.pgolf', 'rb').read())"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(REPO)))
    try:
        deadline, lz = time.time() + 60, []
        while not lz and time.time() < deadline and proc.poll() is None:
            lz = _lrzip_children(proc.pid)
        assert lz, "lrzip never ran"
        os.kill(lz[0], signal.SIGSTOP)  # stuck mid-decompression, as at a passphrase prompt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert not Path(f"/proc/{lz[0]}").exists() and list((tmp_path / "tmp").iterdir()) == []
    finally:
        if proc.poll() is None:  # stuck on its lrzip (still its child, so the pid is lrzip's): both killed
            for pid in [*lz, proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()


def test_lrzip_past_its_time_limit_is_killed_and_its_folder_removed(tmp_path, monkeypatch, lrzip_artifact):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(artifact, "LRZIP_TIME", (0.05, 1e12))
    with pytest.raises(InputError, match=r"^x.pgolf: lrzip ran past its time limit of 0 s$"):
        artifact.unpack(lrzip_artifact, "x.pgolf")
    assert list(tmp_path.iterdir()) == []


def test_the_next_lrzip_run_removes_the_folders_of_killed_processes(tmp_path, monkeypatch, lrzip):
    # kill -9 leaves a folder behind (nothing runs in the process to remove it); its name holds the pid.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = tmp_path / f"pgolf-lrzip-{gone.pid}-abc", tmp_path / f"pgolf-lrzip-{os.getpid()}-abc"
    for d in (stale, live):
        d.mkdir()
        (d / "out").write_bytes(b"payload")
    data = b"pgolf " * 1000
    assert artifact.decompress(artifact.lrzip([], data, "x"), "lrzip", len(data), "x") == data
    assert not stale.exists() and live.exists()
