"""Stage 5b: the packed artifact + val shards -> per-target records after score-first test-time training.

python -m stages.adapt    (reads params.yaml: ttt, eval, verify.max_state_bytes)
ttt.method none copies pass 1's records; chunk_sgd, doc_lora and phased score each chunk before they train
on it (pgolf/ttt.py). Their state (trained weights, adapters, what a scoring pass keeps for its step) is
counted before any work and held to verify.max_state_bytes. The records have the score stage's schema
(eval/adapt.parquet), so every audit and BPB reads them the same way; metrics/adapt.json sets them beside
pass 1's on the same targets.
"""
import shutil
import time
from typing import Annotated

import numpy as np
import pyarrow.parquet as pq

from pgolf import artifact, params, runtime, shards, tokenizer, ttt
from pgolf.bpb import ByteTables, bits_per_byte, val_position_bytes
from pgolf.errors import InputError
from pgolf.files import staged, write_json
from pgolf.layout import ADAPTED, ARTIFACT, METRICS, SCORES, SHARDS, TOKENIZER
from pgolf.params import Range
from pgolf.progress import Progress
from pgolf.score import EvalParams, write_records
from pgolf.stage import run_stage
from pgolf.ttt import TTTParams


def main() -> None:
    p = params.load()
    tp, ev = params.section(p, "ttt", TTTParams), params.section(p, "eval", EvalParams)
    max_state = params.scalar(p, "verify.max_state_bytes", Annotated[int, Range(ge=1)])
    model = artifact.load_model(ARTIFACT)
    d = runtime.setup()  # one process: each chunk's training needs the whole model before the next chunk is scored
    model.to(d.device)
    state = ttt.budget(model, tp, ev.seq_len, max_state, d.device)
    sp = tokenizer.load(TOKENIZER)
    tokens = shards.split_tokens(SHARDS, "val")
    pass1 = pq.read_table(SCORES, columns=["nll", "bytes"])
    if pass1.num_rows != len(tokens) - 1:
        raise InputError(f"{SCORES}: {pass1.num_rows} records for {len(tokens) - 1} validation targets (run dvc repro)")
    nbytes = val_position_bytes(SHARDS, tokens, ByteTables.from_sentencepiece(sp, model.p.vocab_size))
    t = time.perf_counter()
    progress = Progress(f"adapt: {tp.method}", len(tokens) - 1, "tokens")
    with staged(ADAPTED, METRICS / "adapt.json") as (out, adapt_json):
        if tp.method == "none":
            shutil.copyfile(SCORES, out)
            progress.update(len(tokens) - 1)
        else:
            plan, scores = ttt.adapt(model, tokens, ev, tp, sp.bos_id(), d.device)
            write_records(model, tokens, plan, ev.batch, nbytes, sp.bos_id(), d, out, progress, scores=scores)
        seconds = time.perf_counter() - t
        adapted = pq.read_table(out, columns=["nll", "bytes"])
        nbytes = int(np.sum(pass1.column("bytes").to_numpy(), dtype=np.int64))
        bpb = bits_per_byte(float(np.sum(adapted.column("nll").to_numpy(), dtype=np.float64)), nbytes)
        base = bits_per_byte(float(np.sum(pass1.column("nll").to_numpy(), dtype=np.float64)), nbytes)
        progress.done(f"val_bpb {bpb:.4f} (pass 1 {base:.4f}, gain {base - bpb:+.4f}) -> {ADAPTED}")
        write_json(adapt_json, {
            "val_bpb": round(bpb, 6),
            "pass1_val_bpb": round(base, 6),
            "gain": round(base - bpb, 6),
            "seconds": round(seconds, 2),
            "tokens_per_s": round((len(tokens) - 1) / max(seconds, 1e-9), 1),
            "method": tp.method,
            "chunks": len(plan) if tp.method in ("doc_lora", "phased") else len(ttt.chunks(plan, tp.chunk_tokens)) if tp.method != "none" else 0,
            "adapted_params": ttt.adapted_params(model, tp)[0],
            "adapter_params_per_doc": ttt.adapted_params(model, tp)[1],
            "state_bytes": state.total,
            "max_state_bytes": max_state,
        })


if __name__ == "__main__":
    try:
        run_stage(main, "adapt")
    finally:
        runtime.teardown()
