"""Stage 3: float checkpoint + train shards -> quantized weights (integer codes + scales).

python -m stages.calibrate    (PGOLF_NPROC=N: N torchrun processes share the Hessians and the matrices)
Reads params.yaml: quant. Calibration tokens come from the train shards only, never validation.
"""
import time

import numpy as np

from pgolf import checkpoint, params, quantize, runtime, shards
from pgolf.files import staged, write_json
from pgolf.layout import CHECKPOINT, DETAILS, METRICS, QUANTIZED, SHARDS
from pgolf.loader import TokenStream
from pgolf.quantize import QuantParams
from pgolf.progress import Progress
from pgolf.stage import run_stage


def main() -> None:
    runtime.relaunch_under_torchrun("stages.calibrate")
    q = params.section(params.load(), "quant", QuantParams)
    d = runtime.setup()
    try:
        model, _ = checkpoint.load_model(CHECKPOINT)
        model.to(d.device).eval()
        n_tokens = q.calib_seqs * q.seq_len
        stream = TokenStream(shards.list_shards(SHARDS, "train")).take(n_tokens + 1)
        inputs, targets = stream[:-1].reshape(q.calib_seqs, q.seq_len), stream[1:].reshape(q.calib_seqs, q.seq_len)
        t = time.perf_counter()
        mine = inputs[d.rank :: d.world]
        progress = Progress("calibrate: hessians", len(mine), "seqs")
        hessians = quantize.collect_hessians(model, mine, targets[d.rank :: d.world], progress=progress)
        hessian_s = progress.done(f"{len(hessians)} matrices")
        tensors, meta = quantize.quantize_model(model, hessians, q)
        seconds = time.perf_counter() - t
    finally:
        runtime.teardown()
    if not d.main:
        return
    meta["calibration"] = {"split": "train", "first_tokens": n_tokens + 1, "seqs": q.calib_seqs, "seq_len": q.seq_len}
    per_tensor = meta["tensors"]
    by_class = {
        cls: round(float(np.mean([t["h_error"] for t in per_tensor.values() if t["class"] == cls])), 6)
        for cls in sorted({t["class"] for t in per_tensor.values()})
    }
    headline = {"method": q.method, "bits_attn": q.bits.attn, "bits_mlp": q.bits.mlp, "bits_embed": q.bits.embed, "calib_tokens": n_tokens,
                **{f"h_error_{cls}": e for cls, e in by_class.items()}, "seconds": round(seconds, 2), "hessian_seconds": round(hessian_s, 2)}
    tensor_rows = {name: {"bits": t["bits"], "method": t["method"], "h_error": round(t["h_error"], 8)} for name, t in per_tensor.items()}
    with staged(QUANTIZED, METRICS / "quant.json", DETAILS / "quant.json") as (out, quant_json, details_json):
        checkpoint.write_safetensors(out, tensors, meta)
        write_json(quant_json, headline)
        write_json(details_json, {"tensors": tensor_rows})
    print(f"calibrate: {len(per_tensor)} matrices, {q.method}, relative H-weighted error by class {by_class}, "
          f"{seconds:.1f}s ({hessian_s:.1f}s of it Hessians) -> {QUANTIZED}")


if __name__ == "__main__":
    run_stage(main, "calibrate")
