"""Stage 2: train shards -> float checkpoint, training curve, pre-quantization validation score.

python -m stages.train                    one process: CPU, or one GPU
PGOLF_NPROC=8 python -m stages.train      relaunches itself under torchrun with 8 processes (NCCL on
                                          GPUs, gloo on CPU); `PGOLF_NPROC=8 dvc repro` does the same
Reads params.yaml: model, train, seed. The process count is no param: it changes no result.
With train.import_from set, a record's float weights (imports/<file>, see pgolf.convert) stand in for
training: nothing is trained, and the checkpoint, curve and validation score are written as usual.
"""
import csv
import io
import time
from pathlib import Path

from pgolf import checkpoint, convert, params, runtime, shards, tokenizer, trainer
from pgolf.bpb import ByteTables, val_position_bytes
from pgolf.errors import InputError
from pgolf.validation import evaluate, validation_tokens
from pgolf.files import sha256_file, staged, write_bytes, write_json
from pgolf.layout import CHECKPOINT, METRICS, SHARDS, TOKENIZER, TRAIN_RUN
from pgolf.model import ModelParams
from pgolf.trainer import TrainParams
from pgolf.stage import run_stage


def main() -> None:
    runtime.relaunch_under_torchrun("stages.train")
    p = params.load()
    model_p = params.section(p, "model", ModelParams)
    train_p = params.section(p, "train", TrainParams)
    seed = params.scalar(p, "seed", int)
    if model_p.vocab_size > shards.MAX_VOCAB:
        raise InputError(f"params.yaml: model.vocab_size is {model_p.vocab_size}; shards hold ids below {shards.MAX_VOCAB:,}")
    vocab = tokenizer.load(TOKENIZER).vocab_size()
    if vocab > model_p.vocab_size:
        raise InputError(f"params.yaml: model.vocab_size is {model_p.vocab_size} but {TOKENIZER} has {vocab} tokens")
    d = runtime.setup()
    try:
        if train_p.import_from:  # a record's weights instead of training: nothing is trained, the rest is as usual
            model, source = convert.imported_model(Path(train_p.import_from), model_p)
            model, run = model.to(d.device), trainer.Run(stopped_by="imported")
        else:
            model, source = trainer.build(model_p, seed, d.device), None
        n_params = sum(t.numel() for t in model.parameters())
        if d.main:
            print(f"train: {n_params:,} parameters, {d.world} process(es) on {d.device.type}, seed {seed}")
        if source is None:
            run = trainer.train(model, train_p, d, SHARDS, TRAIN_RUN, seed)
        t = time.perf_counter()
        val = validation_tokens(SHARDS, train_p.seq_len, train_p.val_tokens)
        tables = ByteTables.from_sentencepiece(TOKENIZER, model_p.vocab_size)
        nbytes = val_position_bytes(SHARDS, shards.split_tokens(SHARDS, "val"), tables)[: len(val)]
        val_loss, val_bpb = evaluate(model, val, train_p.seq_len, train_p.val_batch_seqs, nbytes, d)
        eval_s = time.perf_counter() - t
    finally:
        runtime.teardown()
    if not d.main:
        return
    meta = {"step": run.step, "seed": seed, "val_bpb": val_bpb, "tokenizer_sha256": sha256_file(TOKENIZER)}
    if source:
        meta["imported"] = source
    curve = io.StringIO()
    writer = csv.writer(curve, lineterminator="\n")
    writer.writerow(["step", "train_loss", "lr_scale", "train_ms"])
    writer.writerows(run.curve)
    ms = run.train_ms / max(run.step, 1)
    # All three outputs replace the last good ones together, or not at all.
    with staged(CHECKPOINT, METRICS / "train_curve.csv", METRICS / "train.json") as (ckpt, curve_csv, train_json):
        checkpoint.save_model(ckpt, model, meta)
        write_bytes(curve_csv, curve.getvalue().encode())
        write_json(
            train_json,
            {
                "params": n_params,
                "steps": run.step,
                "stopped_by": run.stopped_by,
                "ms_per_step": round(ms, 2),
                "tokens_per_s": round(train_p.batch_tokens / ms * 1000, 1) if ms else 0.0,
                "train_seconds": round(run.train_ms / 1000, 2),
                "train_loss": round(run.train_loss, 6) if run.curve else None,
                "uniform_loss_steps": run.uniform_steps,
                "val_loss": round(val_loss, 6),
                "val_bpb": round(val_bpb, 6),
                "val_tokens": len(val) - 1,
                "eval_seconds": round(eval_s, 2),
                "processes": d.world,
                "device": d.device.type,
            },
        )
    print(
        f"train: {run.step} steps ({run.stopped_by}) in {run.train_ms / 1000:.1f}s, {ms:.0f} ms/step; "
        f"train_loss {run.train_loss:.4f}, val_loss {val_loss:.4f}, val_bpb {val_bpb:.4f} -> {CHECKPOINT}"
    )


if __name__ == "__main__":
    run_stage(main, "train")
