"""Stage 4: quantized weights -> the artifact, with honest size accounting.

python -m stages.pack   (reads params.yaml: pack)
Size = compressed weights + the code needed to load and run the model: pgolf/artifact.py and the pgolf
modules it imports, found by reading their imports, counted as their UTF-8 source (pack.code: raw) or as
the self-extracting script that carries them compressed (pack.code: compressed). Both are recorded.
"""
import time

import torch

from pgolf import artifact, checkpoint, pack, params
from pgolf.errors import InputError
from pgolf.files import staged, write_bytes, write_json
from pgolf.layout import ARTIFACT, DETAILS, LOADER_MODULE, METRICS, QUANTIZED
from pgolf.pack import PackParams
from pgolf.sources import code_bytes, code_files, self_extracting
from pgolf.stage import run_stage


def main() -> None:
    pk = params.section(params.load(), "pack", PackParams)
    t = time.perf_counter()
    tensors, meta = checkpoint.read_safetensors(QUANTIZED)
    blob, report = pack.pack_quantized(tensors, meta, pk.level, pk.compressor)
    filters = report["filters"]
    files = code_files(LOADER_MODULE)
    code = {"raw": code_bytes(files), "compressed": len(self_extracting(files))}
    n_code = code[pk.code]
    total = len(blob) + n_code
    if total > pk.byte_limit:
        raise InputError(
            f"params.yaml: pack.byte_limit is {pk.byte_limit:,} but the artifact is {total:,} bytes "
            f"({len(blob):,} weights + {n_code:,} code): {total - pk.byte_limit:,} bytes over"
        )
    pack_s = time.perf_counter() - t
    # What would be submitted must load back to exactly what calibrate wrote.
    t = time.perf_counter()
    back, _ = artifact.unpack(blob)
    unpack_s = time.perf_counter() - t
    if back.keys() != tensors.keys() or not all(torch.equal(back[k], tensors[k]) for k in tensors):
        raise RuntimeError("pack: the artifact does not unpack to the calibrated tensors")
    raw = sum(v.numel() * v.element_size() for v in tensors.values())
    headline = {
        "total_bytes": total,
        "weight_bytes": len(blob),
        "code_bytes": n_code,
        "code": pk.code,
        "code_bytes_raw": code["raw"],
        "code_bytes_compressed": code["compressed"],
        "byte_limit": pk.byte_limit,
        "headroom_bytes": pk.byte_limit - total,
        "raw_tensor_bytes": raw,
        "compression_ratio": round(raw / len(blob), 3),
        "compressor": report["compressor"],
        "layout": report["layout"],
        "level": pk.level,
        **{f"{c}_{k}": v for c, r in report["compressors"].items() for k, v in r.items() if k in ("bytes", "seconds")},
        "seconds": round(pack_s, 2),
        "unpack_seconds": round(unpack_s, 2),
    }
    details = {
        "code_files": [str(f) for f in files],
        "compressors": report["compressors"],
        "layout_bytes": report["layout_bytes"],
        "filters": {f: sorted(n for n, v in filters.items() if v == f) for f in sorted(set(filters.values()))},
    }
    with staged(ARTIFACT, METRICS / "pack.json", DETAILS / "pack.json") as (out, pack_json, details_json):
        write_bytes(out, blob)
        write_json(pack_json, headline)
        write_json(details_json, details)
    print(f"pack: {total:,} bytes = {len(blob):,} weights ({report['layout']}) + {n_code:,} code ({pk.code}, {len(files)} files); "
          f"limit {pk.byte_limit:,}; {pack_s:.1f}s, unpack {unpack_s:.1f}s -> {ARTIFACT}")


if __name__ == "__main__":
    run_stage(main, "pack")
