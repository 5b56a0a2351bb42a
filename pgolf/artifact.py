"""The submission artifact: the format and its loader (this file's imports are counted in every artifact).

Layout (integers little-endian): b"PGOLFAR1" | u32 header length | header (zstd JSON: meta; the streams,
each a codec, a byte-shuffle stride, its compressed and decompressed sizes; each tensor's name, dtype,
shape, bits, filter, stream, offset and length in that stream) | the streams, one after another |
sha256 of all before. Codecs: zstd, brotli, and lrzip (ZPAQ; the operating system's program, run only
for an artifact that uses it). Loading checks everything the file says before allocating anything, and
decompresses no stream past the size it declares. pgolf/pack.py writes the format.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterable

import brotli
import numpy as np
import torch
import zstandard

from pgolf.codes import SUFFIXES, model_from_tensors
from pgolf.errors import InputError
from pgolf.model import GPT, ModelParams

MAGIC = b"PGOLFAR1"
MAX_HEADER = 1 << 20  # bytes of JSON header
BYTE_LIMIT = 16_000_000  # the challenge's cap on an artifact, code included
MAX_PARAMS = 8 * BYTE_LIMIT  # a parameter takes at least one bit of a submission
MAX_PAYLOAD = 4 * MAX_PARAMS  # bytes of decompressed payload: every parameter in float32
MAX_FILE = 16 * BYTE_LIMIT  # bytes of file read at all
MAX_STREAMS = 64
DTYPES = {"int8": (torch.int8, np.int8), "int16": (torch.int16, np.int16), "float16": (torch.float16, np.float16),
          "float32": (torch.float32, np.float32)}
CODECS = ("zstd", "brotli", "lrzip")
ORDER = ".order"  # int16 row order of a tensor stored with the "sorted" filter, consumed when decoding it
LRZIP_DIR = "pgolf-lrzip-"  # + pid: the next lrzip run removes those of processes killed by kill -9
LRZIP_TIME = 60, 50_000  # an lrzip run's time limit: 60 s + 1 s per 50 kB (ZPAQ -L 9 decodes ~250 kB/s a core)
ZPAQ_BLOCK = 256 << 20  # address space per block lrzip decodes at once (ZPAQ -L 9's model: ~240 MiB)
_running: set[subprocess.Popen] = set()  # lrzip programs under way: threaded() kills them when interrupted
_stopping = threading.Event()  # set while a failed threaded() waits for its threads: lrzip runs are killed


def _bitunpack(data: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.uint16)
    return (planes << np.arange(bits - 1, -1, -1, dtype=np.uint16)).sum(1).astype(np.uint8)


def decode(data: bytes, filt: str, dtype: str, shape: list[int], bits: int = 8, order: np.ndarray | None = None) -> torch.Tensor:
    np_dtype = DTYPES[dtype][1]
    n = int(np.prod(shape))
    if filt == "raw":
        a = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    elif filt == "bitpack":  # codes in [-2^(bits-1), 2^(bits-1) - 1], offset to unsigned
        a = (_bitunpack(data, bits, n).astype(np.int16) - 2 ** (bits - 1)).astype(np.int8).reshape(shape)
    elif filt == "bytesplit":
        size = np.dtype(np_dtype).itemsize
        a = np.frombuffer(data, dtype=np.uint8).reshape(size, n).T.copy().view(np_dtype).reshape(shape)
    elif filt == "sorted":  # rows in `order`, then transposed
        a = np.empty(shape, dtype=np_dtype)
        a[order] = np.frombuffer(data, dtype=np_dtype).reshape(shape[::-1]).T
    else:
        a = np.frombuffer(data, dtype=np_dtype).reshape(shape[::-1]).T  # transpose
    return torch.from_numpy(np.array(a))  # a writable copy in C order


def unshuffle(data: bytes, stride: int) -> bytes:
    """Undo the byte shuffle: the stream held every stride-th byte from offset 0, then from offset 1, ..."""
    n = len(data)
    out = np.empty(n, dtype=np.uint8)
    src, start = np.frombuffer(data, dtype=np.uint8), 0
    for k in range(stride):
        count = len(range(k, n, stride))
        out[k::stride] = src[start : start + count]
        start += count
    return out.tobytes()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's
        pass
    return False


def _lower(limits: list[tuple[int, int]]) -> None:  # in the child, before lrzip starts: the soft limits, never raised
    for k, v in limits:
        soft, hard = resource.getrlimit(k)
        resource.setrlimit(k, (v if soft == resource.RLIM_INFINITY else min(v, soft), hard))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)


def threaded(fn: Callable, *args: Iterable) -> list:
    """fn over args in threads (codecs and lrzip run outside the GIL). On a failure or an interruption (Ctrl-C, SIGTERM
    made SystemExit by pgolf/stage.py) the lrzip programs are killed: the threads end at once, removing their folders."""
    pool = ThreadPoolExecutor()
    try:
        return list(pool.map(fn, *args))
    except BaseException:
        _stopping.set()
        for proc in list(_running):
            _kill(proc)
        raise
    finally:
        pool.shutdown()
        _stopping.clear()


def lrzip(args: list[str], data: bytes, where: str, size: int | None = None) -> bytes:
    """Run the lrzip program on data through files (it handles pipes badly) in a session of its own (no terminal
    to ask a passphrase on), stdin closed, config ignored, in a time limit, its messages in one line. With `size`
    (decompressing), the kernel stops it past `size` bytes written or past memory for its blocks and threads."""
    if shutil.which("lrzip") is None:
        raise InputError(f"{where}: needs the lrzip program, which is not installed (apt-get install lrzip)")
    for old in Path(tempfile.gettempdir()).glob(LRZIP_DIR + "*-*"):
        if old.name.split("-")[2].isdigit() and _gone(int(old.name.split("-")[2])):
            shutil.rmtree(old, ignore_errors=True)
    limits, seconds = [], LRZIP_TIME[0] + max(len(data), size or 0) / LRZIP_TIME[1]
    if size is not None:  # lrzip writes blocks of 10 MiB or more: a thread for each, up to the cores
        threads = max(1, min(os.cpu_count() or 1, -(-size // (10 << 20))))
        args = [*args, "-p", str(threads)]
        limits = [(resource.RLIMIT_FSIZE, size), (resource.RLIMIT_AS, 2 * size + (threads + 2) * ZPAQ_BLOCK)]
    with tempfile.TemporaryDirectory(prefix=f"{LRZIP_DIR}{os.getpid()}-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(data)
        proc = subprocess.Popen(["lrzip", "-q", "-f", *args, "-o", str(dst), str(src)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                env=dict(os.environ, LRZIP="NOCONFIG"),
                                preexec_fn=(lambda: _lower(limits)) if limits else None)
        _running.add(proc)
        try:
            if _stopping.is_set():  # started as its caller was interrupted
                _kill(proc)
            text = proc.communicate(timeout=seconds)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            raise InputError(f"{where}: lrzip ran past its time limit of {seconds:.0f} s") from None
        finally:
            _kill(proc)
            proc.wait()
            _running.discard(proc)
        if proc.returncode == -signal.SIGXFSZ:
            raise InputError(f"{where}: an lrzip stream decompresses past its declared {size} bytes")
        if proc.returncode != 0 or not dst.is_file():
            text = "; ".join(line.strip() for line in text.splitlines() if line.strip())[-200:]
            raise InputError(f"{where}: lrzip failed (exit status {proc.returncode}): {text}")
        return dst.read_bytes()


def decompress(data: bytes, codec: str, size: int, where: str) -> bytes:
    """A stream's bytes, refused unless they decompress to exactly `size` bytes: the decoder stops one byte past
    `size` (zstd exactly, brotli within 96 KiB), and never holds more."""
    try:
        if codec == "zstd":  # a frame that declares its size must declare this one; more frames or bytes are refused
            claimed = zstandard.get_frame_parameters(data).content_size
            if claimed not in (size, zstandard.CONTENTSIZE_UNKNOWN):
                raise InputError(f"{where}: a zstd frame declares {claimed} bytes, the header {size}")
            out = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read(size + 1)
        elif codec == "brotli":  # output_buffer_limit is where the output stops growing (up to 2x on): 96 KiB at a time
            d, parts, n = brotli.Decompressor(), [], 0
            more = d.process(data, output_buffer_limit=1 << 16)
            while more and n <= size:
                parts.append(more)
                n += len(more)
                more = d.process(b"", output_buffer_limit=1 << 16)
            if not d.is_finished():
                raise InputError(f"{where}: a brotli stream decompresses past its declared {size} bytes or is cut short")
            out = b"".join(parts)
        else:  # an lrzip file (format 0.6 on) declares its size in bytes 6..13 and encryption in byte 22
            if len(data) < 24 or data[:5] != b"LRZI\0" or data[5] < 6 or data[22]:
                raise InputError(f"{where}: an lrzip stream is not an unencrypted lrzip 0.6 file")
            if int.from_bytes(data[6:14], "little") != size:
                raise InputError(f"{where}: an lrzip stream does not declare its {size} bytes")
            out = lrzip(["-d"], data, where, size)
    except (zstandard.ZstdError, brotli.error) as exc:
        raise InputError(f"{where}: a {codec} stream does not decompress ({exc})") from None
    if len(out) != size:
        raise InputError(f"{where}: a {codec} stream is {len(out)} bytes, its header says {size}")
    return out


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is(x: object, kind: str) -> bool:
    if kind in ("bool", "str"):
        return isinstance(x, bool if kind == "bool" else str)
    return _int(x) or (kind == "float" and isinstance(x, float))


def filters(dtype: str, bits: int) -> tuple[str, ...]:
    """The filters pack can write for a tensor of this dtype and bit width."""
    if dtype == "int8":
        return ("raw", "transpose", "sorted") + (("bitpack",) if bits < 8 else ())
    return ("raw", "bytesplit")


def _length(numel: int, dtype: str, filt: str, bits: int) -> int:
    return (numel * bits + 7) // 8 if filt == "bitpack" else numel * np.dtype(DTYPES[dtype][1]).itemsize


def _header(blob: bytes, where: str) -> tuple[dict, list[int]]:
    """The header, every field checked, and where each stream starts: lengths follow from shape, dtype,
    filter and bits; the tensors tile each stream's payload exactly and the streams tile the file."""
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
    if not isinstance(header, dict) or header.get("version") != 2 or not isinstance(header.get("meta"), dict):
        raise bad("the header is not a version-2 mapping with a 'meta' mapping")
    streams, entries = header.get("streams"), header.get("tensors")
    if not isinstance(streams, list) or not 1 <= len(streams) <= MAX_STREAMS or not isinstance(entries, list):
        raise bad(f"the header needs 1..{MAX_STREAMS} 'streams' and a list of 'tensors'")
    starts, at, total = [], start + header_len, 0
    for k, st in enumerate(streams):
        if (not isinstance(st, dict) or st.get("codec") not in CODECS or not _int(st.get("shuffle")) or not 1 <= st["shuffle"] <= 8
                or not _int(st.get("size")) or st["size"] < 0 or not _int(st.get("payload_size")) or st["payload_size"] < 0):
            raise bad(f"stream #{k} is not a codec of {CODECS}, a shuffle stride 1..8 and two sizes")
        total += st["payload_size"]
        if total > MAX_PAYLOAD:
            raise bad(f"the streams claim over {MAX_PAYLOAD:,} bytes of payload")
        starts.append(at)
        at += st["size"]
    if at != len(body):
        raise bad(f"the streams take {at - start - header_len:,} bytes but the file holds {len(body) - start - header_len:,} after the header")
    offsets, values, by_name = [0] * len(streams), 0, {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e["name"] in by_name:
            raise bad(f"tensor #{i} is not a mapping with a name of its own")
        by_name[e["name"]] = e
        what = f"tensor {e['name']!r}"
        dtype, shape, bits, filt, k = e.get("dtype"), e.get("shape"), e.get("bits"), e.get("filter"), e.get("stream")
        if not isinstance(dtype, str) or dtype not in DTYPES or not _int(bits) or not 1 <= bits <= 8 or filt not in filters(dtype, bits):
            raise bad(f"{what}: dtype {dtype!r}, bits {bits!r} and filter {filt!r} are not a combination pack writes")
        if not isinstance(shape, list) or len(shape) > 4 or not all(_int(n) and n >= 0 for n in shape):
            raise bad(f"{what}: shape {shape!r} is not a list of at most 4 sizes >= 0")
        if not _int(k) or not 0 <= k < len(streams):
            raise bad(f"{what}: stream {k!r} is not one of the {len(streams)} streams")
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        values += numel
        if values > 2 * MAX_PARAMS:
            raise bad(f"the tensors hold over {2 * MAX_PARAMS:,} values")
        length = _length(numel, dtype, filt, bits)
        if e.get("offset") != offsets[k] or e.get("length") != length or not _int(e.get("offset")) or not _int(e.get("length")):
            raise bad(f"{what} lies outside stream {k}: offset, length {e.get('offset')!r}, {e.get('length')!r}, not {offsets[k]}, {length}")
        offsets[k] += length
    for k, st in enumerate(streams):
        if st["payload_size"] != offsets[k]:
            raise bad(f"stream {k} claims {st['payload_size']} bytes but its tensors take {offsets[k]}")
    for name, e in by_name.items():  # a sorted tensor has its row order; an order belongs to a sorted tensor
        order = by_name.get(name + ORDER)
        if e["filter"] == "sorted" and (len(e["shape"]) != 2 or order is None or order["dtype"] != "int16" or order["shape"] != e["shape"][:1]):
            raise bad(f"tensor {name!r} is stored sorted: it needs a 2-D shape and an int16 {name + ORDER} [rows]")
        if e["dtype"] == "int16" and by_name.get(name.removesuffix(ORDER), {}).get("filter") != "sorted":
            raise bad(f"tensor {name!r}: an int16 tensor must be the row order of a sorted tensor")
    return header, starts


def _decode(blob: bytes, header: dict, starts: list[int], where: str) -> dict[str, torch.Tensor]:
    def stream(st: dict, at: int) -> bytes:
        data = decompress(blob[at : at + st["size"]], st["codec"], st["payload_size"], where)
        return unshuffle(data, st["shuffle"]) if st["shuffle"] > 1 else data

    payloads = threaded(stream, header["streams"], starts)

    def data(e: dict) -> bytes:
        return payloads[e["stream"]][e["offset"] : e["offset"] + e["length"]]

    entries = {e["name"]: e for e in header["tensors"]}
    orders = {n: decode(data(e), e["filter"], e["dtype"], e["shape"]).numpy() for n, e in entries.items() if e["dtype"] == "int16"}
    for name, order in orders.items():
        if not np.array_equal(np.sort(order), np.arange(len(order))):
            raise InputError(f"{where}: tensor {name!r} is not a permutation of its rows")
    return {n: decode(data(e), e["filter"], e["dtype"], e["shape"], e["bits"], orders.get(n + ORDER)) for n, e in entries.items() if n not in orders}


def unpack(blob: bytes, where: str = "artifact") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of an artifact; any damage is an InputError naming `where`."""
    header, starts = _header(blob, where)
    return _decode(blob, header, starts, where), header["meta"]


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
    entries = {n: e for n, e in entries.items() if e["dtype"] != "int16"}  # row orders: checked by _header, consumed by _decode
    state = {n: e["shape"] for n, e in entries.items() if not n.endswith(SUFFIXES)}
    parts = 0
    for name in quantized:
        codes, scale = entries.get(f"{name}.codes"), entries.get(f"{name}.scale")
        if (name in state or codes is None or scale is None or codes["dtype"] != "int8" or len(codes["shape"]) != 2
                or scale["dtype"] != "float16" or scale["shape"] != codes["shape"][:1]):
            raise bad(f"quantized tensor {name!r} needs int8 {name}.codes [rows, cols] and float16 {name}.scale [rows]")
        state[name] = codes["shape"]
        parts += 2
        if f"{name}.lqer_a" in entries:
            _check_lqer(entries, name, codes["shape"], bad)
            parts += 4
    if len(state) + parts - len(quantized) != len(entries) or any(entries[n]["dtype"] == "int8" for n in state if n in entries):
        raise bad("codes, scales or LQER factors of no quantized tensor, or integer tensors that are not codes")
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


def _check_lqer(entries: dict, name: str, shape: list[int], bad) -> None:
    """A, B codes int8 [rows, r], [r, cols] with 1 <= r <= min(rows, cols); float16 scales, each a whole number of groups."""
    a, a_scale, b, b_scale = (entries.get(f"{name}.{part}") for part in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale"))
    ok = None not in (a, a_scale, b, b_scale) and a["dtype"] == b["dtype"] == "int8" and a_scale["dtype"] == b_scale["dtype"] == "float16"
    ok = ok and len(a["shape"]) == len(b["shape"]) == 2 and len(a_scale["shape"]) == len(b_scale["shape"]) == 1
    if ok:
        (rows, r), (r2, cols), na, nb = a["shape"], b["shape"], a_scale["shape"][0], b_scale["shape"][0]
        ok = [rows, cols] == shape and r == r2 and 1 <= r <= min(rows, cols) and 0 < na and (rows * r) % na == 0 and 0 < nb and (r * cols) % nb == 0
    if not ok:
        raise bad(f"LQER of {name!r} needs int8 .lqer_a [rows, r] and .lqer_b [r, cols] of its shape {shape}, "
                  "and float16 .lqer_a_scale, .lqer_b_scale that divide them into equal groups")


def load_model(path: Path) -> GPT:
    """What a fresh evaluator runs: the model of the artifact alone, every header field checked first."""
    blob, where = read(path), str(Path(path))
    header, starts = _header(blob, where)
    check_model(header, where)
    return model_from_tensors(_decode(blob, header, starts, where), header["meta"])
