"""Stage 3: float checkpoint + train shards -> quantized weights (integer codes + scales).

python -m stages.calibrate    (PGOLF_NPROC=N: N torchrun processes share the Hessians and the matrices)
Reads params.yaml: quant, seed. Calibration tokens come from the train shards, or from the float model
itself (quant.calibration: self_generated, seeded), never from validation.
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
    p = params.load()
    q, seed = params.section(p, "quant", QuantParams), params.scalar(p, "seed", int)
    d = runtime.setup()
    try:
        model, _ = checkpoint.load_model(CHECKPOINT)
        quantize.check_memory(q, model.p.vocab_size, model.p.dim, model.lm_head is None)
        model.to(d.device).eval()
        n_tokens = q.calib_seqs * q.seq_len
        t = time.perf_counter()
        if q.calibration == "train":
            stream = TokenStream(shards.list_shards(SHARDS, "train")).take(n_tokens + 1)
            seqs = np.stack([stream[:-1], stream[1:]]).reshape(2, q.calib_seqs, q.seq_len)
            calibration, sample_s = {"split": "train", "first_tokens": n_tokens + 1}, 0.0
        else:  # every process draws the same sequences (a CPU generator) and takes its share below
            progress = Progress("calibrate: sampling", q.calib_seqs, "seqs")
            sampled = quantize.sample(model, q.calib_seqs, q.seq_len, q.temperature, seed, progress=progress)
            sample_s = progress.done(f"{q.calib_seqs} x {q.seq_len} tokens from BOS at temperature {q.temperature}")
            seqs = np.stack([sampled[:, :-1], sampled[:, 1:]])
            calibration = {"split": "self_generated", "seed": seed, "temperature": q.temperature}
        progress = Progress("calibrate: hessians", len(seqs[0, d.rank :: d.world]), "seqs")
        hessians = quantize.collect_hessians(model, seqs[0, d.rank :: d.world], seqs[1, d.rank :: d.world], progress=progress, embed_hessian=q.embed_hessian)
        hessian_s = progress.done(f"{len(hessians)} matrices")
        tensors, meta = quantize.quantize_model(model, hessians, q)
        seconds = time.perf_counter() - t
    finally:
        runtime.teardown()
    if not d.main:
        return
    meta["calibration"] = {**calibration, "seqs": q.calib_seqs, "seq_len": q.seq_len}
    per_tensor = meta["tensors"]
    by_class = {
        cls: round(float(np.mean([t["h_error"] for t in per_tensor.values() if t["class"] == cls])), 6)
        for cls in sorted({t["class"] for t in per_tensor.values()})
    }
    headline = {"method": q.method, "clip": q.clip, "bits_attn": q.bits.attn, "bits_mlp": q.bits.mlp, "bits_embed": q.bits.embed,
                "calibration": q.calibration, "calib_tokens": n_tokens, "lqer_tensors": sum(t["lqer_rank"] > 0 for t in per_tensor.values()),
                **{f"h_error_{cls}": e for cls, e in by_class.items()}, "seconds": round(seconds, 2),
                "hessian_seconds": round(hessian_s + sample_s, 2)}  # sampling included: both count toward the training budget
    tensor_rows = {name: {"bits": t["bits"], "method": t["method"], "clip": t["clip"], "lqer_rank": t["lqer_rank"], "h_error": round(t["h_error"], 8)}
                   for name, t in per_tensor.items()}
    with staged(QUANTIZED, METRICS / "quant.json", DETAILS / "quant.json") as (out, quant_json, details_json):
        checkpoint.write_safetensors(out, tensors, meta)
        write_json(quant_json, headline)
        write_json(details_json, {"tensors": tensor_rows})
    print(f"calibrate: {len(per_tensor)} matrices, {q.method}, relative H-weighted error by class {by_class}, "
          f"{seconds:.1f}s ({hessian_s:.1f}s of it Hessians) -> {QUANTIZED}")


if __name__ == "__main__":
    run_stage(main, "calibrate")
