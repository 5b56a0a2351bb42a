"""Newton-Schulz orthogonalisation (Muon's inner loop) on this CPU: float32 against bfloat16.

python -m bench.newton_schulz [--repeats 7]

pgolf/muon.py runs it in float32 on CPUs; this measures what bf16 would cost or save at the demo's
and the baseline's matrix shapes (median of --repeats timings of 10 calls each, both dtypes
alternating). Saves bench/results/newton_schulz.json.
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import REPO, save
from pgolf import muon

SHAPES = [(128, 128), (512, 128), (512, 512), (2048, 512)]  # demo attention / MLP; baseline attention / MLP


def seconds(g: torch.Tensor, dtype: torch.dtype) -> float:
    muon.ns_dtype = lambda device: dtype
    t = time.perf_counter()
    for _ in range(10):
        muon.zeropower_via_newtonschulz5(g, 5)
    return (time.perf_counter() - t) / 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "newton_schulz.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        g = torch.randn(*shape)
        times = {torch.float32: [], torch.bfloat16: []}
        for _ in range(args.repeats):
            for dtype in times:
                times[dtype].append(seconds(g, dtype))
        fp32, bf16 = (statistics.median(times[d]) for d in (torch.float32, torch.bfloat16))
        rows.append({"shape": list(shape), "float32_ms": round(fp32 * 1e3, 3), "bfloat16_ms": round(bf16 * 1e3, 3), "bf16_over_fp32": round(bf16 / fp32, 3)})
        print(f"{shape}: float32 {fp32 * 1e3:.2f} ms, bfloat16 {bf16 * 1e3:.2f} ms, bf16/fp32 {bf16 / fp32:.2f}")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    save({"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "avx512_bf16": "avx512_bf16" in flags,
                      "amx_bf16": "amx_bf16" in flags}, "repeats": args.repeats, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
