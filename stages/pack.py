"""Stage 4: quantized weights -> the artifact, with honest size accounting.

python -m stages.pack   (reads params.yaml: pack)
Size = compressed weights + the UTF-8 source of every module needed to load and run the model:
pgolf/artifact.py and the pgolf modules it imports, found by reading their imports.
"""
import time

import torch

from pgolf import artifact, checkpoint, pack, params
from pgolf.errors import InputError
from pgolf.files import staged, write_bytes, write_json
from pgolf.layout import ARTIFACT, DETAILS, LOADER_MODULE, METRICS, QUANTIZED
from pgolf.pack import PackParams
from pgolf.sources import code_bytes, code_files
from pgolf.stage import run_stage


def main() -> None:
    pk = params.section(params.load(), "pack", PackParams)
    t = time.perf_counter()
    tensors, meta = checkpoint.read_safetensors(QUANTIZED)
    blob, report = pack.pack_quantized(tensors, meta, pk.level)
    filters = report["filters"]
    files = code_files(LOADER_MODULE)
    n_code = code_bytes(files)
    total = len(blob) + n_code
    if total > pk.byte_limit:
        raise InputError(
            f"params.yaml: pack.byte_limit is {pk.byte_limit:,} but the artifact is {total:,} bytes "
            f"({len(blob):,} weights + {n_code:,} code): {total - pk.byte_limit:,} bytes over"
        )
    # What would be submitted must load back to exactly what calibrate wrote.
    back, _ = artifact.unpack(blob)
    if back.keys() != tensors.keys() or not all(torch.equal(back[k], tensors[k]) for k in tensors):
        raise RuntimeError("pack: the artifact does not unpack to the calibrated tensors")
    raw = sum(v.numel() * v.element_size() for v in tensors.values())
    seconds = time.perf_counter() - t
    headline = {
        "total_bytes": total,
        "weight_bytes": len(blob),
        "code_bytes": n_code,
        "byte_limit": pk.byte_limit,
        "headroom_bytes": pk.byte_limit - total,
        "raw_tensor_bytes": raw,
        "compression_ratio": round(raw / len(blob), 3),
        "layout": report["layout"],
        "level": pk.level,
        "seconds": round(seconds, 2),
    }
    details = {
        "code_files": [str(f) for f in files],
        "layout_bytes": report["layout_bytes"],
        "filters": {f: sorted(n for n, v in filters.items() if v == f) for f in sorted(set(filters.values()))},
    }
    with staged(ARTIFACT, METRICS / "pack.json", DETAILS / "pack.json") as (out, pack_json, details_json):
        write_bytes(out, blob)
        write_json(pack_json, headline)
        write_json(details_json, details)
    print(f"pack: {total:,} bytes = {len(blob):,} weights + {n_code:,} code ({len(files)} files); limit {pk.byte_limit:,} -> {ARTIFACT}")


if __name__ == "__main__":
    run_stage(main, "pack")
