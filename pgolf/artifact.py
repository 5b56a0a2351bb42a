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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import zstandard

from pgolf import params
from pgolf.errors import InputError
from pgolf.gptq import dequantize
from pgolf.model import GPT
from pgolf.params import ModelParams

MAGIC = b"PGOLFAR1"
MAX_HEADER = 1 << 20  # bytes of JSON header
BYTE_LIMIT = 16_000_000  # the challenge's cap on an artifact, code included
MAX_PARAMS = 8 * BYTE_LIMIT  # a parameter takes at least one bit of a submission
MAX_PAYLOAD = 4 * MAX_PARAMS  # bytes of decompressed payload: every parameter in float32
MAX_FILE = 16 * BYTE_LIMIT  # bytes of artifact file read at all
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


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _filters(dtype: str, bits: int) -> tuple[str, ...]:
    """The filters pack can write for a tensor of this dtype and bit width."""
    return ("raw", "transpose") + (("bitpack",) if bits < 8 else ()) if dtype == "int8" else ("raw", "bytesplit")


def _length(numel: int, dtype: str, filt: str, bits: int) -> int:
    return (numel * bits + 7) // 8 if filt == "bitpack" else numel * np.dtype(DTYPES[dtype][1]).itemsize


def _header(blob: bytes, where: str) -> tuple[dict, int]:
    """The checked header of an artifact and where its payload starts.

    Every field is checked before anything is allocated: the tensors' sizes follow from their shapes,
    dtypes, filters and bit widths, they tile the payload exactly, and together they hold no more
    than MAX_PARAMS values (a parameter takes at least a bit of a BYTE_LIMIT-byte artifact).
    """
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
        if not isinstance(dtype, str) or dtype not in DTYPES or not _int(bits) or not 1 <= bits <= 8 or filt not in _filters(dtype, bits):
            raise bad(f"{what}: dtype {dtype!r}, bits {bits!r} and filter {filt!r} are not a combination pack writes")
        if not isinstance(shape, list) or len(shape) > 4 or not all(_int(n) and n >= 0 for n in shape):
            raise bad(f"{what}: shape {shape!r} is not a list of at most 4 sizes >= 0")
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        values += numel
        if values > 2 * MAX_PARAMS:
            raise bad(f"the tensors hold over {2 * MAX_PARAMS:,} values: no {BYTE_LIMIT:,}-byte artifact can")
        length = _length(numel, dtype, filt, bits)
        if e.get("offset") != offset or e.get("length") != length or not _int(e.get("offset")) or not _int(e.get("length")):
            raise bad(f"{what} lies outside the payload: offset {e.get('offset')!r}, length {e.get('length')!r}; "
                      f"its shape and filter put it at {offset}, {length} bytes")
        offset += length
    if size != offset:
        raise bad(f"payload claims {size} bytes but its tensors take {offset}")
    return header, start + header_len


def _decode(blob: bytes, header: dict, start: int, where: str) -> dict[str, torch.Tensor]:
    size = header["payload_size"]
    try:
        payload = zstandard.ZstdDecompressor().decompress(blob[start:-32], max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise InputError(f"{where}: payload does not decompress to its {size} bytes ({exc})") from None
    if len(payload) != size:
        raise InputError(f"{where}: payload is {len(payload)} bytes, header says {size}")
    return {e["name"]: decode(payload[e["offset"] : e["offset"] + e["length"]], e["filter"], e["dtype"], e["shape"], e["bits"]) for e in header["tensors"]}


def unpack(blob: bytes, where: str = "artifact") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an artifact; any damage or absurd size is an InputError naming `where`."""
    header, start = _header(blob, where)
    return _decode(blob, header, start, where), header["meta"]


def read(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: artifact not found")
    if path.stat().st_size > MAX_FILE:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes; no artifact is over {MAX_FILE:,}")
    return path.read_bytes()


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return unpack(read(path), str(Path(path)))


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
    try:
        p = params.section(meta, "model", ModelParams, Path(where))
    except InputError as exc:
        raise bad(f"model params in the header: {str(exc).removeprefix(f'{where}: ').removeprefix('params.yaml: ')}") from None
    state = {n: e["shape"] for n, e in entries.items() if not n.endswith((".codes", ".scale"))}
    for name in quantized:
        codes, scale = entries.get(f"{name}.codes"), entries.get(f"{name}.scale")
        if (name in state or codes is None or scale is None or codes["dtype"] != "int8" or len(codes["shape"]) != 2
                or scale["dtype"] != "float16" or scale["shape"] != codes["shape"][:1]):
            raise bad(f"quantized tensor {name!r} needs int8 {name}.codes [rows, cols] and float16 {name}.scale [rows]")
        state[name] = codes["shape"]
    if len(state) + len(quantized) != len(entries) or any(entries[n]["dtype"] == "int8" for n in state if n in entries):
        raise bad("the artifact holds codes or scales of no quantized tensor, or integer tensors that are not codes")
    one, two = _shapes(replace(p, layers=1)), _shapes(replace(p, layers=2))
    expected = len(one) + (p.layers - 1) * (len(two) - len(one))
    if expected != len(state):  # checked before building the declared model, whose size is then bounded
        raise bad(f"the header declares {p.layers} layers ({expected} tensors) but holds {len(state)} tensors")
    shapes = _shapes(p)
    for name in sorted(set(shapes) | set(state)):
        if tuple(state.get(name, ())) != shapes.get(name, ()) or name not in state or name not in shapes:
            raise bad(f"tensor {name!r}: {state.get(name)} in the artifact, {shapes.get(name)} in the declared model")
    n = sum(int(np.prod(s, dtype=object)) for s in shapes.values())
    if n > MAX_PARAMS:
        raise bad(f"the declared model has {n:,} parameters; a {BYTE_LIMIT:,}-byte artifact holds at most {MAX_PARAMS:,}")
    return p


def model_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> GPT:
    """The float network the codes stand for: codes times row scales, in the network meta["model"] names."""
    state = {k: v for k, v in tensors.items() if not k.endswith((".codes", ".scale"))}
    for name in meta["quantized"]:
        state[name] = dequantize(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
    model = GPT(ModelParams(**meta["model"]))
    model.load_state_dict(state, strict=True)
    return model


def load_model(path: Path) -> GPT:
    """What a fresh evaluator runs: the model of the artifact alone, every header field checked first."""
    blob, where = read(path), str(Path(path))
    header, start = _header(blob, where)
    check_model(header, where)
    return model_from_tensors(_decode(blob, header, start, where), header["meta"])
