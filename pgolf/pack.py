"""Packing calibrate's output into the artifact: filters tried as whole-artifact layouts, the smallest kept.

pgolf/artifact.py defines the format and loads it (its code is counted in every artifact); this module
only writes it, so it is not. Filters are reversible byte re-orderings:
    raw        the tensor's bytes
    bitpack    integer codes offset to unsigned and packed at their bit width
    bytesplit  floats with the k-th byte of every value stored together (exponents apart from mantissas)
    transpose  int8 codes column by column (rows of a matrix often share column statistics)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import numpy as np
import torch
import zstandard

from pgolf.artifact import DTYPES, MAGIC, filters
from pgolf.errors import InputError


@dataclasses.dataclass(frozen=True)
class PackParams:
    level: int  # zstd level
    byte_limit: int  # the challenge's cap on code + compressed weights

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 22:
            raise InputError(f"params.yaml: pack.level is {self.level}; zstd levels are 1..22")


def _bitpack(u: np.ndarray, bits: int) -> bytes:
    # Each value becomes `bits` bits, most significant first; the last byte is zero-padded.
    planes = ((u[:, None].astype(np.uint16) >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1)).tobytes()


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


def candidate_filters(t: torch.Tensor, bits: int) -> tuple[str, ...]:
    return filters(str(t.dtype).removeprefix("torch."), bits)


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
    for layout, chosen in layouts(tensors, bits, cctx).items():
        entries, chunks, offset = [], [], 0
        for name in order:
            t, b = tensors[name], bits.get(name, 8)
            data = encode(t, chosen[name], b)
            dtype = str(t.dtype).removeprefix("torch.")
            entries.append({"name": name, "dtype": dtype, "shape": list(t.shape), "bits": b, "filter": chosen[name], "offset": offset, "length": len(data)})
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
