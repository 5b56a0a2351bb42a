"""Stage 4: quantized weights -> the artifact, with honest size accounting.

python -m stages.pack   (reads params.yaml: pack)
Size = compressed weights + the UTF-8 source of every module needed to load and run the model:
pgolf/artifact.py and the pgolf modules it imports, found by reading their imports.
"""
import ast
import time
from pathlib import Path

import torch

import pgolf

from pgolf import artifact, checkpoint, params
from pgolf.errors import InputError, run_stage
from pgolf.files import write_bytes, write_json
from pgolf.layout import ARTIFACT, LOADER_MODULE, METRICS, QUANTIZED
from pgolf.params import PackParams


SOURCE_ROOT = Path(pgolf.__file__).resolve().parent.parent  # the folder holding the pgolf package


def code_files(entry: Path) -> list[Path]:
    """entry and every pgolf module it imports, transitively (paths relative to SOURCE_ROOT)."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((SOURCE_ROOT / path).read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pgolf":
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "pgolf"]
            for name in names:
                module = Path(*name.split(".")).with_suffix(".py")
                if (SOURCE_ROOT / module).is_file():
                    todo.append(module)
    return sorted(seen)


def main() -> None:
    pk = params.section(params.load(), "pack", PackParams)
    t = time.perf_counter()
    tensors, meta = checkpoint.read_safetensors(QUANTIZED)
    bits = {f"{name}.codes": info["bits"] for name, info in meta["tensors"].items()}
    header_meta = {"model": meta["model"], "quantized": meta["quantized"], "bits": {n: i["bits"] for n, i in meta["tensors"].items()}}
    blob, report = artifact.pack(tensors, bits, header_meta, pk.level)
    filters = report["filters"]
    files = code_files(LOADER_MODULE)
    code_bytes = sum(len((SOURCE_ROOT / f).read_text(encoding="utf-8").encode("utf-8")) for f in files)
    total = len(blob) + code_bytes
    if total > pk.byte_limit:
        raise InputError(
            f"params.yaml: pack.byte_limit is {pk.byte_limit:,} but the artifact is {total:,} bytes "
            f"({len(blob):,} weights + {code_bytes:,} code): {total - pk.byte_limit:,} bytes over"
        )
    # What would be submitted must load back to exactly what calibrate wrote.
    back, _ = artifact.unpack(blob)
    if back.keys() != tensors.keys() or not all(torch.equal(back[k], tensors[k]) for k in tensors):
        raise RuntimeError("pack: the artifact does not unpack to the calibrated tensors")
    write_bytes(ARTIFACT, blob)
    raw = sum(v.numel() * v.element_size() for v in tensors.values())
    seconds = time.perf_counter() - t
    write_json(
        METRICS / "pack.json",
        {
            "total_bytes": total,
            "weight_bytes": len(blob),
            "code_bytes": code_bytes,
            "byte_limit": pk.byte_limit,
            "headroom_bytes": pk.byte_limit - total,
            "code_files": [str(f) for f in files],
            "raw_tensor_bytes": raw,
            "compression_ratio": round(raw / len(blob), 3),
            "layout": report["layout"],
            "layout_bytes": report["layout_bytes"],
            "filters": {f: sorted(n for n, v in filters.items() if v == f) for f in sorted(set(filters.values()))},
            "level": pk.level,
            "seconds": round(seconds, 2),
        },
    )
    print(f"pack: {total:,} bytes = {len(blob):,} weights + {code_bytes:,} code ({len(files)} files); limit {pk.byte_limit:,} -> {ARTIFACT}")


if __name__ == "__main__":
    run_stage(main)
