"""Mutated artifacts against the loader. Run as a script: prints one JSON line of outcomes and peak memory
(this process's and its children's, the lrzip program's).

Every header mutation keeps a valid checksum, so what is tested is the loader's reading of the
header, not the checksum. Used by tests/test_artifact_fuzz.py in a fresh process (its peak memory
is the loader's, not the test session's).
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import random
import resource
import struct
import sys
import tempfile
from pathlib import Path

import brotli
import torch
import zstandard

from pgolf import artifact, codes, gptq, lqer, pack, quantize
from pgolf.errors import InputError
from pgolf.lqer import LqerParams
from pgolf.model import GPT, ModelParams

TINY = ModelParams(layers=2, dim=16, heads=2, kv_heads=1, mlp_mult=2, vocab_size=64, tie_embeddings=True,
                   logit_softcap=30.0, rope_base=10000.0, qk_gain_init=1.5, tied_embed_init_std=0.005)
ODD_VALUES = ["x", "", [], {}, None, True, False, 1.5, [1, 2], {"a": 1}]
HUGE = [2**31, 2**40, 2**63, 10**30, 1e308, 16384]
LQER = LqerParams(rank=2, top_k=1, a_bits=2, b_bits=4, group=8)


SORTED = "blocks.0.attn.c_q.weight.codes"


def tiny_artifact() -> bytes:
    """A real artifact: a 2-layer model with its matrices rounded to 6 bits, LQER factors on one of them,
    in two streams (brotli; zstd with the byte shuffle), one tensor stored sorted."""
    torch.manual_seed(0)
    state = {k: v.float() + 0.01 * torch.randn_like(v) for k, v in GPT(TINY).state_dict().items()}
    names = [n for n in state if quantize.tensor_class(n)]
    tensors = {n: v for n, v in state.items() if n not in names}
    for n in names:
        tensors[f"{n}.codes"], tensors[f"{n}.scale"] = gptq.rtn(state[n], 6, None)
    tensors.update(lqer.correct({names[0]: state[names[0]]}, {names[0]: codes.weight(tensors, names[0])}, LQER))
    bits = {f"{n}.codes": 6 for n in names} | {f"{names[0]}.lqer_a": LQER.a_bits, f"{names[0]}.lqer_b": LQER.b_bits}
    layout = pack.zstd_layouts(tensors, bits, zstandard.ZstdCompressor(level=3))["best-alone"] | {SORTED: "sorted"}
    plan = pack.Plan("fuzz", layout, {n: int(n == SORTED) for n in tensors}, (("brotli", 1), ("zstd", 2)))
    return pack.assemble(tensors, bits, {"model": dataclasses.asdict(TINY), "quantized": names}, plan, 3)


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<I", blob, 8)
    return json.loads(zstandard.ZstdDecompressor().decompress(blob[12 : 12 + n])), blob[12 + n : -32]


def join(header: object, payload: bytes) -> bytes:
    z = zstandard.ZstdCompressor(level=3).compress(json.dumps(header).encode())
    body = artifact.MAGIC + struct.pack("<I", len(z)) + z + payload
    return body + hashlib.sha256(body).digest()


def nodes(obj: object, path: tuple = ()) -> list[tuple]:
    """(parent, key, path) of every value in a JSON tree."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        out.append((obj, key, path + (key,)))
        out += nodes(value, path + (key,))
    return out


def mutate(header: dict, rng: random.Random) -> tuple[dict, list[str]]:
    h, done = copy.deepcopy(header), []
    for _ in range(rng.choice([1, 1, 2, 3])):
        parent, key, path = rng.choice(nodes(h))
        op = rng.choice(["delete", "type", "huge", "negative", "zero"])
        old = parent[key]
        if op == "delete":
            del parent[key]
        elif op == "type":
            parent[key] = rng.choice([v for v in ODD_VALUES if type(v) is not type(old)])
        elif op == "huge":
            parent[key] = rng.choice(HUGE)
        elif op == "negative":
            parent[key] = -rng.choice([1, 2, 7, 2**31]) if not isinstance(old, float) else -abs(old or 1.0)
        else:
            parent[key] = 0
        done.append(f"{op} {'.'.join(map(str, path))}")
    return h, done


def mutate_payload(payload: bytes, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(["truncate", "append", "flip", "other", "zeros"])
    if op == "truncate":
        return payload[: rng.randrange(len(payload))], op
    if op == "append":
        return payload + rng.randbytes(rng.randrange(1, 64)), op
    if op == "flip":
        b = bytearray(payload)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), op
    if op == "other":
        return zstandard.ZstdCompressor().compress(rng.randbytes(rng.randrange(1, 4096))), op
    return zstandard.ZstdCompressor().compress(bytes(rng.randrange(1, 1 << 20))), op


# 1 GiB of zeros in lrzip 0.6 (one rzip chunk: lrzip stops after the first chunk that reaches the size its header
# declares, and only then), made once by `truncate -s 1G zeros && lrzip -b -L 9 zeros`: that takes 7 to 35 s and
# 2.4 to 3.1 GB here, too much for every run. zstd-compressed; lrzip -d writes 1 GiB from it (md5 checked).
LRZIP_ZEROS = base64.b64decode(
    "KLUv/WDpAmUHAIQMTFJaSQAGAAAAQAABAAAEAQAAAEADAFgCAAAaAAAABBIBAABWVVUVOQEAAEJaaDkxQVkmU1kOCeLfAV+OQADAAAAIIAAwgE"
    "1GQqAlqQqAl9fR9CoBGHrgAMAAECClNBmNJVBQ2FKoKHi7kinChIEkCBIonAI3AAAACsAAAAAACW4+ZQAgAsQAyABAAAAAoABQZpoFJI7PZqqq"
    "qr3OAAMAAfF3JFOFCQCW4+ZQVAAAfWvDtkCEcdmuyM1XPPqs4H55SbwMRgKJBP8NIEBDsnRVdEkahQKr2UvjusQKF5m24jbVcASFUIjst+kF")


def lrzip_zeros(size: int, encrypted: bool = False) -> bytes:
    """The 1 GiB of zeros with lrzip's own header declaring `size` bytes (and, if asked, its encryption flag set)."""
    data = bytearray(zstandard.ZstdDecompressor().decompress(LRZIP_ZEROS))
    data[6:14], data[22] = size.to_bytes(8, "little"), int(encrypted)
    return bytes(data)


def zstd_claiming(size: int) -> bytes:
    """A 54-byte zstd frame whose header declares `size` bytes: ten RLE blocks of 128 KiB of zeros, and no end."""
    return b"\x28\xb5\x2f\xfd\xc0\x38" + size.to_bytes(8, "little") + ((128 << 10 << 3 | 1 << 1).to_bytes(3, "little") + b"\0") * 10


def bombs(header: dict, payload: bytes) -> list[tuple[str, bytes]]:
    """The reported cases: a huge declared model; streams far larger than their header says (1 GiB of zeros in each
    codec, a zstd frame claiming 1 TB); lrzip streams whose header claims 900 MiB, that are encrypted, cut short or
    corrupt; tensors of 900 MiB. Stream 0 keeps the header's payload size (its own lrzip header says the same)."""
    big = copy.deepcopy(header)
    big["meta"]["model"].update(dim=16384, layers=200)
    out = [("model of dim 16384 x 200 layers", join(big, payload))]
    mib, size = bytes(1 << 20), header["streams"][0]["payload_size"]  # compressed a MiB at a time: this process holds no GiB
    z, b = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30), brotli.Compressor(quality=1)
    zeros = lrzip_zeros(size)
    for what, codec, data in (("1 GiB of zeros, zstd (its frame says 1 GiB)", "zstd", b"".join(z.compress(mib) for _ in range(1024)) + z.flush()),
                              ("a zstd frame claiming 1 TB", "zstd", zstd_claiming(1 << 40)),
                              ("1 GiB of zeros, brotli", "brotli", b"".join(b.process(mib) for _ in range(1024)) + b.finish()),
                              ("1 GiB of zeros, lrzip", "lrzip", zeros),
                              ("lrzip header claiming 900 MiB", "lrzip", b"LRZI\0\x06" + (900 << 20).to_bytes(8, "little") + bytes(64)),
                              ("lrzip, encrypted", "lrzip", lrzip_zeros(size, encrypted=True)),
                              ("lrzip, cut short", "lrzip", zeros[:500]),
                              ("lrzip, corrupt", "lrzip", zeros[:640] + bytes(40) + zeros[680:])):
        bomb = copy.deepcopy(header)  # stream 0 declares its true payload size; its data is the bomb
        bomb["streams"][0].update(codec=codec, size=len(data))
        out.append((what, join(bomb, data + payload[header["streams"][0]["size"] :])))
    matching = copy.deepcopy(header)  # tensors that do cover 900 MiB: refused by size before decompressing
    matching["tensors"].append({"name": "pad", "dtype": "float32", "shape": [225 << 20], "bits": 8, "filter": "raw", "stream": 0,
                                "offset": header["streams"][0]["payload_size"], "length": 900 << 20})
    matching["streams"][0]["payload_size"] += 900 << 20
    out.append(("tensors of 900 MiB", join(matching, payload)))
    return out


def run(cases: int, seed: int) -> dict:
    rng = random.Random(seed)
    blob = tiny_artifact()
    header, payload = split(blob)
    path = Path(tempfile.mkdtemp()) / "model.pgolf"
    path.write_bytes(blob)
    artifact.load_model(path)  # the unmutated artifact loads
    outcomes = {"refused": 0, "loaded": [], "other": [], "bombs": {}}
    mutants = [(f"bomb: {name}", b) for name, b in bombs(header, payload)]
    for i in range(cases):
        if i % 5 == 4:  # one stream's bytes replaced, its size updated so that the streams still tile the file
            h, k = copy.deepcopy(header), rng.randrange(len(header["streams"]))
            at = sum(st["size"] for st in header["streams"][:k])
            p, what = mutate_payload(payload[at : at + h["streams"][k]["size"]], rng)
            h["streams"][k]["size"] = len(p)
            mutants.append((f"payload {what}", join(h, payload[:at] + p + payload[at + header["streams"][k]["size"] :])))
        else:
            h, what = mutate(header, rng)
            mutants.append(("; ".join(what), join(h, payload)))
    for what, data in mutants:
        path.write_bytes(data)
        try:
            artifact.load_model(path)
            outcomes["loaded"].append(what)
        except InputError as exc:
            outcomes["refused"] += 1
            if what.startswith("bomb: "):
                outcomes["bombs"][what[6:]] = str(exc).removeprefix(f"{path}: ")
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
        except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzz looks for
            outcomes["other"].append(f"{what}: {type(exc).__name__}: {exc}"[:300])
    outcomes["cases"] = len(mutants)
    outcomes["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    outcomes["max_rss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return outcomes


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
