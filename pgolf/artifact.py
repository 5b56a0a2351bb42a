"""The submission artifact: the format and its loader (this file's imports are counted in every artifact).

Layout (integers little-endian): b"PGOLFAR1" | u32 header length | header (zstd JSON: each tensor's name,
dtype, shape, bits, filter, offset, length; the payload size; meta) | payload (zstd) | sha256 of all before.
Loading checks everything the file says before allocating anything. pgolf/pack.py writes the format.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import zstandard

from pgolf.codes import model_from_tensors
from pgolf.errors import InputError
from pgolf.model import GPT, ModelParams

MAGIC = b"PGOLFAR1"
MAX_HEADER = 1 << 20  # bytes of JSON header
BYTE_LIMIT = 16_000_000  # the challenge's cap on an artifact, code included
MAX_PARAMS = 8 * BYTE_LIMIT  # a parameter takes at least one bit of a submission
MAX_PAYLOAD = 4 * MAX_PARAMS  # bytes of decompressed payload: every parameter in float32
MAX_FILE = 16 * BYTE_LIMIT  # bytes of file read at all
DTYPES = {"int8": (torch.int8, np.int8), "float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}


def _bitunpack(data: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.uint16)
    return (planes << np.arange(bits - 1, -1, -1, dtype=np.uint16)).sum(1).astype(np.uint8)


def decode(data: bytes, filt: str, dtype: str, shape: list[int], bits: int = 8) -> torch.Tensor:
    np_dtype = DTYPES[dtype][1]
    n = int(np.prod(shape))
    if filt == "raw":
        a = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    elif filt == "bitpack":
        a = (_bitunpack(data, bits, n).astype(np.int16) - (2 ** (bits - 1) - 1)).astype(np.int8).reshape(shape)
    elif filt == "bytesplit":
        size = np.dtype(np_dtype).itemsize
        a = np.frombuffer(data, dtype=np.uint8).reshape(size, n).T.copy().view(np_dtype).reshape(shape)
    else:
        a = np.frombuffer(data, dtype=np_dtype).reshape(shape[::-1]).T  # transpose
    return torch.from_numpy(np.array(a))  # a writable copy in C order


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is(x: object, kind: str) -> bool:
    if kind in ("bool", "str"):
        return isinstance(x, bool if kind == "bool" else str)
    return _int(x) or (kind == "float" and isinstance(x, float))


def filters(dtype: str, bits: int) -> tuple[str, ...]:
    """The filters pack can write for a tensor of this dtype and bit width."""
    return ("raw", "transpose") + (("bitpack",) if bits < 8 else ()) if dtype == "int8" else ("raw", "bytesplit")


def _length(numel: int, dtype: str, filt: str, bits: int) -> int:
    return (numel * bits + 7) // 8 if filt == "bitpack" else numel * np.dtype(DTYPES[dtype][1]).itemsize


def _header(blob: bytes, where: str) -> tuple[dict, int]:
    """The header, every field checked, and where the payload starts: lengths follow from shape, dtype, filter
    and bits, and the tensors tile the payload exactly."""
    def bad(msg: str) -> InputError:
        return InputError(f"{where}: {msg}")

    if len(blob) < len(MAGIC) + 4 + 32 or blob[: len(MAGIC)] != MAGIC:
        raise bad("not a pgolf artifact (bad magic or too short)")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise bad("checksum mismatch: the artifact is truncated or altered")
    (header_len,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    if header_len > MAX_HEADER or start + header_len > len(body):
        raise bad(f"header claims {header_len} bytes (limit {MAX_HEADER}, file {len(body)})")
    try:
        header = json.loads(zstandard.ZstdDecompressor().decompress(body[start : start + header_len], max_output_size=MAX_HEADER))
    except (zstandard.ZstdError, ValueError):
        raise bad(f"unreadable header (over {MAX_HEADER} bytes, or not zstd JSON)") from None
    if not isinstance(header, dict) or header.get("version") != 1 or not isinstance(header.get("meta"), dict):
        raise bad("the header is not a version-1 mapping with a 'meta' mapping")
    size, entries = header.get("payload_size"), header.get("tensors")
    if not _int(size) or not 0 <= size <= MAX_PAYLOAD:
        raise bad(f"payload claims {size!r} bytes (limit {MAX_PAYLOAD})")
    if not isinstance(entries, list):
        raise bad("the header's 'tensors' is not a list")
    offset, values, names = 0, 0, set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e["name"] in names:
            raise bad(f"tensor #{i} is not a mapping with a name of its own")
        names.add(e["name"])
        what = f"tensor {e['name']!r}"
        dtype, shape, bits, filt = e.get("dtype"), e.get("shape"), e.get("bits"), e.get("filter")
        if not isinstance(dtype, str) or dtype not in DTYPES or not _int(bits) or not 1 <= bits <= 8 or filt not in filters(dtype, bits):
            raise bad(f"{what}: dtype {dtype!r}, bits {bits!r} and filter {filt!r} are not a combination pack writes")
        if not isinstance(shape, list) or len(shape) > 4 or not all(_int(n) and n >= 0 for n in shape):
            raise bad(f"{what}: shape {shape!r} is not a list of at most 4 sizes >= 0")
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        values += numel
        if values > 2 * MAX_PARAMS:
            raise bad(f"the tensors hold over {2 * MAX_PARAMS:,} values")
        length = _length(numel, dtype, filt, bits)
        if e.get("offset") != offset or e.get("length") != length or not _int(e.get("offset")) or not _int(e.get("length")):
            raise bad(f"{what} lies outside the payload: offset, length {e.get('offset')!r}, {e.get('length')!r}, not {offset}, {length}")
        offset += length
    if size != offset:
        raise bad(f"payload claims {size} bytes but its tensors take {offset}")
    return header, start + header_len


def _decode(blob: bytes, header: dict, start: int, where: str) -> dict[str, torch.Tensor]:
    size = header["payload_size"]
    try:
        payload = zstandard.ZstdDecompressor().decompress(blob[start:-32], max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise InputError(f"{where}: payload does not decompress ({exc})") from None
    if len(payload) != size:
        raise InputError(f"{where}: payload is {len(payload)} bytes, header says {size}")
    return {e["name"]: decode(payload[e["offset"] : e["offset"] + e["length"]], e["filter"], e["dtype"], e["shape"], e["bits"]) for e in header["tensors"]}


def unpack(blob: bytes, where: str = "artifact") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of an artifact; any damage is an InputError naming `where`."""
    header, start = _header(blob, where)
    return _decode(blob, header, start, where), header["meta"]


def read(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: artifact not found")
    if path.stat().st_size > MAX_FILE:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes; no artifact is over {MAX_FILE:,}")
    return path.read_bytes()


def _shapes(p: ModelParams) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {k: tuple(v.shape) for k, v in GPT(p).state_dict().items()}


def check_model(header: dict, where: str) -> ModelParams:
    """The model the header declares, checked against its tensors and bounded before it is built."""
    def bad(msg: str) -> InputError:
        return InputError(f"{where}: {msg}")

    meta, entries = header["meta"], {e["name"]: e for e in header["tensors"]}
    quantized = meta.get("quantized")
    if not isinstance(meta.get("model"), dict) or not isinstance(quantized, list) or not all(isinstance(q, str) for q in quantized):
        raise bad("the header's meta needs a 'model' mapping and a 'quantized' list of names")
    raw, kinds = meta["model"], {f.name: f.type for f in fields(ModelParams)}  # annotations: 'int', 'float', 'bool'
    wrong = sorted(set(kinds) ^ set(raw)) + [k for k in kinds if k in raw and not _is(raw[k], kinds[k])]
    if wrong:
        raise bad(f"model params in the header: {wrong[0]!r} is missing, unknown or not {kinds.get(wrong[0], 'known')}")
    try:
        p = ModelParams(**raw)
    except InputError as exc:
        raise bad(f"model params in the header: {str(exc).removeprefix('params.yaml: ')}") from None
    state = {n: e["shape"] for n, e in entries.items() if not n.endswith((".codes", ".scale"))}
    for name in quantized:
        codes, scale = entries.get(f"{name}.codes"), entries.get(f"{name}.scale")
        if (name in state or codes is None or scale is None or codes["dtype"] != "int8" or len(codes["shape"]) != 2
                or scale["dtype"] != "float16" or scale["shape"] != codes["shape"][:1]):
            raise bad(f"quantized tensor {name!r} needs int8 {name}.codes [rows, cols] and float16 {name}.scale [rows]")
        state[name] = codes["shape"]
    if len(state) + len(quantized) != len(entries) or any(entries[n]["dtype"] == "int8" for n in state if n in entries):
        raise bad("codes or scales of no quantized tensor, or integer tensors that are not codes")
    if p.layers > len(state) or max(p.vocab_size, int(p.mlp_mult * p.dim)) * p.dim > MAX_PARAMS:  # bounds the meta build below
        raise bad(f"the header declares {p.layers} layers of {p.dim} (vocabulary {p.vocab_size}) for {len(state)} tensors of at most {MAX_PARAMS:,} values")
    shapes = _shapes(p)
    for name in sorted(set(shapes) | set(state)):
        if tuple(state.get(name, ())) != shapes.get(name, ()) or name not in state or name not in shapes:
            raise bad(f"tensor {name!r}: {state.get(name)} in the artifact, {shapes.get(name)} in the declared model")
    n = sum(int(np.prod(s, dtype=object)) for s in shapes.values())
    if n > MAX_PARAMS:
        raise bad(f"the declared model has {n:,} parameters (at most {MAX_PARAMS:,})")
    return p


def load_model(path: Path) -> GPT:
    """What a fresh evaluator runs: the model of the artifact alone, every header field checked first."""
    blob, where = read(path), str(Path(path))
    header, start = _header(blob, where)
    check_model(header, where)
    return model_from_tensors(_decode(blob, header, start, where), header["meta"])
