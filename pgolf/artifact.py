"""The submission artifact: one self-describing, pickle-free file of quantized weights, zstd-compressed.

Layout (all integers little-endian):
    b"PGOLFAR1" | u32 length of the next part | header (JSON, zstd) | payload (zstd) | sha256 of all before it
The header lists each tensor (name, dtype, shape, filter, offset and length in the payload) and the
payload's size. Loading checks the checksum first, refuses sizes over the limits before allocating,
and decompresses to at most the declared size; unpacking gives back the exact tensors that were packed.

Filters are reversible byte re-orderings; pack tries a few whole-artifact choices and keeps the smallest:
    raw        the tensor's bytes
    bitpack    integer codes offset to unsigned and packed at their bit width
    bytesplit  floats with the k-th byte of every value stored together (exponents apart from mantissas)
    transpose  int8 codes column by column (rows of a matrix often share column statistics)
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
import zstandard

from pgolf.errors import InputError
from pgolf.gptq import dequantize
from pgolf.model import GPT
from pgolf.params import ModelParams

MAGIC = b"PGOLFAR1"
MAX_HEADER = 1 << 20  # bytes of JSON header
MAX_PAYLOAD = 1 << 30  # bytes of decompressed payload: far over any 16 MB artifact
DTYPES = {"int8": (torch.int8, np.int8), "float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}


def _bitpack(u: np.ndarray, bits: int) -> bytes:
    # Each value becomes `bits` bits, most significant first; the last byte is zero-padded.
    planes = ((u[:, None].astype(np.uint16) >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1)).tobytes()


def _bitunpack(data: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.uint16)
    return (planes << np.arange(bits - 1, -1, -1, dtype=np.uint16)).sum(1).astype(np.uint8)


def encode(t: torch.Tensor, filt: str, bits: int = 8) -> bytes:
    a = t.contiguous().numpy()
    if filt == "raw":
        return a.tobytes()
    if filt == "bitpack":
        return _bitpack((a.reshape(-1).astype(np.int16) + (2 ** (bits - 1) - 1)).astype(np.uint8), bits)
    if filt == "bytesplit":
        return a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T.tobytes()
    if filt == "transpose":
        return np.ascontiguousarray(a.T).tobytes()
    raise ValueError(f"unknown filter {filt}")


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
    elif filt == "transpose":
        a = np.frombuffer(data, dtype=np_dtype).reshape(shape[::-1]).T
    else:
        raise InputError(f"artifact: unknown filter {filt!r}")
    return torch.from_numpy(np.array(a))  # a writable copy in C order


def candidate_filters(t: torch.Tensor, bits: int) -> list[str]:
    if t.dtype == torch.int8:
        return ["raw", "transpose"] + (["bitpack"] if bits < 8 else [])
    return ["raw", "bytesplit"]


def layouts(tensors: dict[str, torch.Tensor], bits: dict[str, int], cctx: zstandard.ZstdCompressor) -> dict[str, dict[str, str]]:
    """Whole-artifact filter choices to try: uniform ones, and each tensor's best when compressed alone."""
    def uniform(codes: str, floats: str) -> dict[str, str]:
        return {n: codes if t.dtype == torch.int8 else floats for n, t in tensors.items()}

    alone = {}
    for name, t in tensors.items():
        sizes = {f: len(cctx.compress(encode(t, f, bits.get(name, 8)))) for f in candidate_filters(t, bits.get(name, 8))}
        alone[name] = min(sizes, key=lambda f: (sizes[f], f))
    return {
        "raw": uniform("raw", "raw"),
        "raw+bytesplit": uniform("raw", "bytesplit"),
        "transpose+bytesplit": uniform("transpose", "bytesplit"),
        "best-alone": alone,
    }


def pack(tensors: dict[str, torch.Tensor], bits: dict[str, int], meta: dict, level: int = 22) -> tuple[bytes, dict]:
    """The artifact bytes, and a report: the layout kept, its filter per tensor, every layout's size.

    bits[name] gives the width of int8 code tensors (8 if absent). Tensors are stored grouped by
    dtype (codes, then float16, then float32), which zstd compresses better than any interleaving;
    each candidate layout is compressed whole and the smallest is kept.
    """
    cctx = zstandard.ZstdCompressor(level=level)
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    for name, t in tensors.items():
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise ValueError(f"{name}: cannot pack dtype {t.dtype}")
    order = sorted(tensors, key=lambda n: (list(DTYPES).index(str(tensors[n].dtype).removeprefix("torch.")), n))
    best = None
    sizes = {}
    for layout, filters in layouts(tensors, bits, cctx).items():
        entries, chunks, offset = [], [], 0
        for name in order:
            t, b = tensors[name], bits.get(name, 8)
            data = encode(t, filters[name], b)
            entries.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bits": b, "filter": filters[name], "offset": offset, "length": len(data)})
            chunks.append(data)
            offset += len(data)
        payload = b"".join(chunks)
        compressed = cctx.compress(payload)
        sizes[layout] = len(compressed)
        if best is None or len(compressed) < len(best[2]):
            best = (layout, entries, compressed, len(payload))
    layout, entries, compressed, payload_size = best
    header = json.dumps({"version": 1, "meta": meta, "tensors": entries, "payload_size": payload_size}, separators=(",", ":"))
    header_z = cctx.compress(header.encode())
    body = MAGIC + struct.pack("<I", len(header_z)) + header_z + compressed
    report = {"layout": layout, "filters": {e["name"]: e["filter"] for e in entries}, "layout_bytes": sizes}
    return body + hashlib.sha256(body).digest(), report


def pack_quantized(tensors: dict[str, torch.Tensor], meta: dict, level: int = 22) -> tuple[bytes, dict]:
    """pack() for calibrate's output: each matrix's codes at its bit width, the network's params in the header."""
    bits = {n: info["bits"] for n, info in meta["tensors"].items()}
    header = {"model": meta["model"], "quantized": meta["quantized"], "bits": bits}
    return pack(tensors, {f"{n}.codes": b for n, b in bits.items()}, header, level)


def unpack(blob: bytes, where: str = "artifact") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an artifact; any damage or absurd size is an InputError naming `where`."""
    if len(blob) < len(MAGIC) + 4 + 32 or blob[: len(MAGIC)] != MAGIC:
        raise InputError(f"{where}: not a pgolf artifact (bad magic or too short)")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise InputError(f"{where}: checksum mismatch: the artifact is truncated or altered")
    (header_len,) = struct.unpack_from("<I", body, len(MAGIC))
    if header_len > MAX_HEADER or len(MAGIC) + 4 + header_len > len(body):
        raise InputError(f"{where}: header claims {header_len} bytes (limit {MAX_HEADER}, file {len(body)})")
    start = len(MAGIC) + 4
    try:
        raw = zstandard.ZstdDecompressor().decompress(body[start : start + header_len], max_output_size=MAX_HEADER)
        header = json.loads(raw)
        size, entries = int(header["payload_size"]), header["tensors"]
    except (zstandard.ZstdError, ValueError, KeyError, TypeError):
        raise InputError(f"{where}: unreadable header (over {MAX_HEADER} bytes, or not zstd JSON)") from None
    if not 0 <= size <= MAX_PAYLOAD:
        raise InputError(f"{where}: payload claims {size} bytes (limit {MAX_PAYLOAD})")
    for e in entries:
        if e["dtype"] not in DTYPES or e["offset"] < 0 or e["length"] < 0 or e["offset"] + e["length"] > size:
            raise InputError(f"{where}: tensor {e.get('name')!r} lies outside the payload or has an unknown dtype")
    try:
        payload = zstandard.ZstdDecompressor().decompress(body[start + header_len :], max_output_size=size)
    except zstandard.ZstdError as exc:
        raise InputError(f"{where}: payload does not decompress ({exc})") from None
    if len(payload) != size:
        raise InputError(f"{where}: payload is {len(payload)} bytes, header says {size}")
    tensors = {e["name"]: decode(payload[e["offset"] : e["offset"] + e["length"]], e["filter"], e["dtype"], e["shape"], e["bits"]) for e in entries}
    return tensors, header["meta"]


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: artifact not found")
    return unpack(path.read_bytes(), str(path))



def model_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> GPT:
    """The float network the codes stand for: codes times row scales, in the network meta["model"] names."""
    state = {k: v for k, v in tensors.items() if not k.endswith((".codes", ".scale"))}
    for name in meta["quantized"]:
        state[name] = dequantize(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
    model = GPT(ModelParams(**meta["model"]))
    model.load_state_dict(state, strict=True)
    return model


def load_model(path: Path) -> GPT:
    """What a fresh evaluator runs: the model of the artifact alone."""
    return model_from_tensors(*load(path))
