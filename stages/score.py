"""Stage 5: the packed artifact + val shards -> per-token records and the neural-only BPB.

python -m stages.score    (PGOLF_NPROC=N: N torchrun processes share the windows; same records)
Reads params.yaml: eval. The model comes from the artifact through the loader a fresh evaluator
uses, never from the training checkpoint: what is scored is what would be submitted.
"""
import contextlib


from pgolf import artifact, params, runtime, shards, tokenizer, windows
from pgolf.bpb import ByteTables, val_position_bytes
from pgolf.errors import InputError
from pgolf.files import staged, write_json
from pgolf.layout import ARTIFACT, METRICS, SCORES, SHARDS, TOKENIZER
from pgolf.score import EvalParams, write_records
from pgolf.progress import Progress
from pgolf.stage import run_stage


def main() -> None:
    runtime.relaunch_under_torchrun("stages.score")
    ev = params.section(params.load(), "eval", EvalParams)
    model = artifact.load_model(ARTIFACT)
    sp = tokenizer.load(TOKENIZER)
    if sp.vocab_size() > model.p.vocab_size:
        raise InputError(f"{ARTIFACT}: the model has {model.p.vocab_size} tokens but {TOKENIZER} has {sp.vocab_size()}")
    tokens = shards.split_tokens(SHARDS, "val")
    if len(tokens) < 2:
        raise InputError(f"{SHARDS}: the validation split has fewer than two tokens")
    nbytes = val_position_bytes(SHARDS, tokens, ByteTables.from_sentencepiece(sp, model.p.vocab_size))
    plan = windows.plan(tokens, ev.seq_len, ev.stride, ev.doc_isolated, sp.bos_id())
    docs = len(windows.doc_starts(tokens, sp.bos_id()))
    d = runtime.setup()
    if d.device.type == "cpu":
        runtime.keep_freed_memory()
    try:
        model.to(d.device)
        if d.main:
            print(f"score: {len(tokens) - 1:,} targets, {docs:,} documents, {len(plan):,} windows ({ev.mode}) on {d.world} {d.device.type} process(es)")
        progress = Progress("score", len(tokens) - 1, "tokens")
        # The records and their metrics replace the last good ones together (rank 0 writes both).
        with staged(SCORES, METRICS / "score.json") if d.main else contextlib.nullcontext([None, None]) as (out, score_json):
            totals = write_records(model, tokens, plan, ev.batch, nbytes, sp.bos_id(), d, out, progress, tilt=ev.tilt(tokens))
            if d.main:
                seconds = progress.done(f"val_loss {totals.val_loss:.4f}, val_bpb {totals.val_bpb:.4f} ({ev.mode}) -> {SCORES}")
                write_json(score_json, {
                    "val_loss": round(totals.val_loss, 6),
                    "val_bpb": round(totals.val_bpb, 6),
                    "tokens": totals.tokens,
                    "bytes": totals.bytes,
                    "docs": docs,
                    "seconds": round(seconds, 2),
                    "tokens_per_s": round(totals.tokens / seconds, 1),
                    "mode": ev.mode,
                    "seq_len": ev.seq_len,
                    "stride": ev.stride,
                    "doc_isolated": ev.doc_isolated,
                    "windows": len(plan),
                    "processes": d.world,
                    "device": d.device.type,
                })
    finally:
        runtime.teardown()


if __name__ == "__main__":
    run_stage(main, "score")
