"""Packing calibrate's output into the artifact: candidate plans of filters, streams and codecs, the smallest kept.

pgolf/artifact.py defines the format and loads it (its code is counted in every artifact); this module
only writes it, so it is not. Filters are reversible byte re-orderings of one tensor:
    raw        the tensor's bytes
    bitpack    integer codes offset to unsigned and packed at their bit width
    bytesplit  floats with the k-th byte of every value stored together (exponents apart from mantissas)
    transpose  int8 codes column by column (rows of a matrix often share column statistics)
    sorted     int8 codes with similar rows made neighbours (a greedy L1 chain), then transposed
A stream is a run of filtered tensors, optionally byte-shuffled (the records' stride-2 shuffle, PR #1394)
and compressed by one codec. pack.compressor chooses the plans tried:
    zstd    one zstd stream, four filter layouts (the best-alone layout picks each tensor's smallest filter)
    brotli  one brotli-11 stream: the best zstd layout, and the records' raw bytes with the stride-2 shuffle
    lrzip   per group (PR #1855): each matrix role's codes of every layer in one lrzip -z -L 9 -T (ZPAQ) stream,
            sorted or transposed, raw int8; the rest (scales, floats, factors, row orders) in one brotli stream
    auto    all of them
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import struct
import time

import brotli
import numpy as np
import torch
import zstandard

from pgolf.artifact import DTYPES, MAGIC, ORDER, filters, lrzip, threaded
from pgolf.errors import InputError

COMPRESSORS = ("zstd", "brotli", "lrzip")
SORTED_ROLES = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")  # the records' row-sorted groups


@dataclasses.dataclass(frozen=True)
class PackParams:
    level: int  # zstd level
    compressor: str  # zstd | brotli | lrzip | auto (every one; the smallest artifact is kept)
    code: str  # which code bytes count toward the limit: raw (the loader's source) | compressed (a self-extracting script)
    byte_limit: int  # the challenge's cap on code + compressed weights

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 22:
            raise InputError(f"params.yaml: pack.level is {self.level}; zstd levels are 1..22")
        if self.compressor not in COMPRESSORS + ("auto",):
            raise InputError(f"params.yaml: pack.compressor is {self.compressor!r}; use zstd, brotli, lrzip or auto")
        if self.code not in ("raw", "compressed"):
            raise InputError(f"params.yaml: pack.code is {self.code!r}; use raw or compressed")


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    filters: dict[str, str]  # tensor -> filter
    stream: dict[str, int]  # tensor -> stream index
    streams: tuple[tuple[str, int], ...]  # per stream: (codec, shuffle stride)


def shuffle(data: bytes, stride: int) -> bytes:
    """The byte shuffle: every stride-th byte from offset 0, then from offset 1, ... (artifact.unshuffle inverts it)."""
    a = np.frombuffer(data, dtype=np.uint8)
    return np.concatenate([a[k::stride] for k in range(stride)]).tobytes()


def similarity_order(codes: np.ndarray) -> np.ndarray:
    """Rows in a greedy nearest-neighbour chain by L1 distance, from row 0 (the records' order), as int16."""
    rows = torch.from_numpy(codes.astype(np.int32))
    left = torch.ones(len(rows), dtype=torch.bool)
    order, cur = [0], 0
    left[0] = False
    for _ in range(len(rows) - 1):
        idx = left.nonzero().squeeze(1)
        cur = int(idx[(rows[idx] - rows[cur]).abs().sum(1).argmin()])  # argmin takes the first of equals
        order.append(cur)
        left[cur] = False
    return np.array(order, dtype=np.int16)


def _bitpack(u: np.ndarray, bits: int) -> bytes:
    # Each value becomes `bits` bits, most significant first; the last byte is zero-padded.
    planes = ((u[:, None].astype(np.uint16) >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1)).tobytes()


def encode(t: torch.Tensor, filt: str, bits: int = 8, order: np.ndarray | None = None) -> bytes:
    a = t.contiguous().numpy()
    if filt == "raw":
        return a.tobytes()
    if filt == "bitpack":
        return _bitpack((a.reshape(-1).astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8), bits)
    if filt == "bytesplit":
        return a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T.tobytes()
    if filt == "transpose":
        return np.ascontiguousarray(a.T).tobytes()
    if filt == "sorted":
        return np.ascontiguousarray(a[order].T).tobytes()
    raise ValueError(f"unknown filter {filt}")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def zstd_layouts(tensors: dict[str, torch.Tensor], bits: dict[str, int], cctx: zstandard.ZstdCompressor) -> dict[str, dict[str, str]]:
    """Whole-artifact filter choices to try: uniform ones, and each tensor's best when compressed alone."""
    def uniform(codes: str, floats: str) -> dict[str, str]:
        return {n: codes if t.dtype == torch.int8 else floats for n, t in tensors.items()}

    alone = {}
    for name, t in tensors.items():
        choices = [f for f in filters(_dtype(t), bits.get(name, 8)) if f != "sorted"]  # sorting is the lrzip plan's
        sizes = {f: len(cctx.compress(encode(t, f, bits.get(name, 8)))) for f in choices}
        alone[name] = min(sizes, key=lambda f: (sizes[f], f))
    return {
        "raw": uniform("raw", "raw"),
        "raw+bytesplit": uniform("raw", "bytesplit"),
        "transpose+bytesplit": uniform("transpose", "bytesplit"),
        "best-alone": alone,
    }


def group_plan(tensors: dict[str, torch.Tensor], bits: dict[str, int]) -> Plan:
    """The records' per-group plan: the codes of each matrix role (every layer's) in one lrzip stream, rows
    similarity-sorted for the roles in SORTED_ROLES and transposed; everything else in one brotli stream."""
    roles = sorted({_role(n) for n, t in tensors.items() if _role(n) and t.ndim == 2})
    chosen, stream = {}, {}
    for name, t in tensors.items():
        role = _role(name) if t.ndim == 2 else None
        if role:
            sort = role in SORTED_ROLES and t.size(0) <= np.iinfo(np.int16).max + 1
            chosen[name], stream[name] = ("sorted" if sort else "transpose"), 1 + roles.index(role)
        else:
            chosen[name] = "bitpack" if t.dtype == torch.int8 and bits.get(name, 8) < 8 else "bytesplit" if t.is_floating_point() else "raw"
            stream[name] = 0
    return Plan("lrzip per-group", chosen, stream, (("brotli", 1),) + (("lrzip", 1),) * len(roles))


def _role(name: str) -> str | None:
    """A matrix's role for grouping its codes: the name without its layer, e.g. mlp.fc.weight."""
    return re.sub(r"^blocks\.\d+\.", "", name.removesuffix(".codes")) if name.endswith(".codes") else None


def plans(tensors: dict[str, torch.Tensor], bits: dict[str, int], compressor: str, cctx: zstandard.ZstdCompressor) -> dict[str, list[Plan]]:
    """The plans each compressor tries (all three for auto)."""
    layouts = zstd_layouts(tensors, bits, cctx)
    one = {n: 0 for n in tensors}
    out = {
        "zstd": [Plan(name, f, one, (("zstd", 1),)) for name, f in layouts.items()],
        "brotli": [Plan("brotli best-alone", layouts["best-alone"], one, (("brotli", 1),)),
                   Plan("brotli raw shuffled", layouts["raw"], one, (("brotli", 2),))],
        "lrzip": [group_plan(tensors, bits)],
    }
    return out if compressor == "auto" else {compressor: out[compressor]}


def compress(data: bytes, codec: str, cctx: zstandard.ZstdCompressor) -> bytes:
    if codec == "zstd":
        return cctx.compress(data)
    if codec == "brotli":
        return brotli.compress(data, quality=11, lgwin=24)
    # -T: no LZ4 pre-test. With the records' flags alone lrzip stores a group uncompressed whenever LZ4
    # finds nothing to gain, which quantized codes often are (bench/pack.py), and ZPAQ never runs.
    return lrzip(["-z", "-L", "9", "-T"], data, "pack.compressor")


def assemble(tensors: dict[str, torch.Tensor], bits: dict[str, int], meta: dict, plan: Plan, level: int) -> bytes:
    """The artifact of one plan. Tensors go into their stream grouped by dtype (codes, then row orders, float16,
    float32), which compresses better than any interleaving; row orders are computed here for sorted tensors."""
    tensors = dict(tensors)
    for name in [n for n, f in plan.filters.items() if f == "sorted"]:
        tensors[name + ORDER] = torch.from_numpy(similarity_order(tensors[name].numpy()))
        plan.filters[name + ORDER], plan.stream[name + ORDER] = "bytesplit", 0
    order = sorted(tensors, key=lambda n: (list(DTYPES).index(_dtype(tensors[n])), n))
    entries, chunks = [], [[] for _ in plan.streams]
    offsets = [0] * len(plan.streams)
    for name in order:
        t, b, k = tensors[name], bits.get(name, 8), plan.stream[name]
        rows = tensors[name + ORDER].numpy() if plan.filters[name] == "sorted" else None
        data = encode(t, plan.filters[name], b, rows)
        entries.append({"name": name, "dtype": _dtype(t), "shape": list(t.shape), "bits": b, "filter": plan.filters[name],
                        "stream": k, "offset": offsets[k], "length": len(data)})
        chunks[k].append(data)
        offsets[k] += len(data)
    payloads = [b"".join(parts) for parts in chunks]

    def compressed(k: int) -> bytes:  # a zstd context per stream: contexts are not shared across threads
        (codec, stride), payload = plan.streams[k], payloads[k]
        return compress(shuffle(payload, stride) if stride > 1 else payload, codec, zstandard.ZstdCompressor(level=level))

    blobs = threaded(compressed, range(len(payloads)))
    streams = [{"codec": c, "shuffle": st, "size": len(b), "payload_size": len(p)} for (c, st), b, p in zip(plan.streams, blobs, payloads)]
    header = json.dumps({"version": 2, "meta": meta, "streams": streams, "tensors": entries}, separators=(",", ":"))
    header_z = zstandard.ZstdCompressor(level=level).compress(header.encode())
    body = MAGIC + struct.pack("<I", len(header_z)) + header_z + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def pack(tensors: dict[str, torch.Tensor], bits: dict[str, int], meta: dict, level: int = 22, compressor: str = "zstd") -> tuple[bytes, dict]:
    """The artifact bytes, and a report: the plan kept, its filter per tensor, every plan's size, and per
    compressor its best size and the seconds its plans took.

    bits[name] gives the width of int8 code tensors (8 if absent). With `auto`, lrzip is tried only
    where the program is installed (the report says when it is not).
    """
    cctx = zstandard.ZstdCompressor(level=level)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if _dtype(t) not in DTYPES or t.dtype == torch.int16:
            raise ValueError(f"{name}: cannot pack dtype {t.dtype}")
    tried = plans(tensors, bits, compressor, cctx)
    if compressor == "auto" and shutil.which("lrzip") is None:
        tried.pop("lrzip")
    best, sizes, by_compressor = None, {}, {}
    for codec, candidates in tried.items():
        t = time.perf_counter()
        for plan in candidates:
            blob = assemble(tensors, bits, meta, dataclasses.replace(plan, filters=dict(plan.filters), stream=dict(plan.stream)), level)
            sizes[plan.name] = len(blob)
            if best is None or len(blob) < len(best[1]):
                best = (plan, blob)
        by_compressor[codec] = {"bytes": min(sizes[p.name] for p in candidates), "seconds": round(time.perf_counter() - t, 2)}
    plan, blob = best
    report = {"layout": plan.name, "compressor": "+".join(sorted({c for c, _ in plan.streams})), "filters": plan.filters,
              "layout_bytes": sizes, "compressors": by_compressor}
    if compressor == "auto" and "lrzip" not in tried:
        report["compressors"]["lrzip"] = {"skipped": "the lrzip program is not installed"}
    return blob, report


def pack_quantized(tensors: dict[str, torch.Tensor], meta: dict, level: int = 22, compressor: str = "zstd") -> tuple[bytes, dict]:
    """pack() for calibrate's output: codes and LQER factors at their bit widths, the network's params in the header."""
    bits = {}
    for name, info in meta["tensors"].items():
        bits[f"{name}.codes"] = info["bits"]
        if info.get("lqer_rank"):
            bits[f"{name}.lqer_a"], bits[f"{name}.lqer_b"] = info["lqer_bits"]
    header = {"model": meta["model"], "quantized": meta["quantized"], "bits": {n: info["bits"] for n, info in meta["tensors"].items()}}
    return pack(tensors, bits, header, level, compressor)
