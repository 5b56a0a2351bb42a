"""Forward + backward time of the model family: the baseline against every record feature on.

python -m bench.model                      CPU, the demo shape (eager, as the trainer runs on CPU)
python -m bench.model --device cuda [--record-code DIR]
                                           GPU, the record shape in bf16 under torch.compile, and beside
                                           it the record's own GPT (its train_gpt.py from DIR, a checkout
                                           of openai/parameter-golf's records/track_10min_16mb) on the same GPU

One micro-batch per measurement: the demo's (4 sequences of 256) on CPU, one GPU's share of the
records' 786,432-token step (48 sequences of 2048; the baseline's 64 of 1024) on CUDA. Each model is
timed in rounds that alternate with the others; medians. Saves bench/results/model_{cpu,cuda}.json.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import REPO, save
from pgolf import convert, params
from pgolf.model import BOS_ID, GPT, ModelParams

DEMO_FEATURES = dict(mlp_activation="leaky_relu2", rope_dims=16, layer_norm_scale=True, xsa_last=4, skip_gates=True, parallel_start=3,
                     loops=2, loop_start=1, loop_end=2, smear_gate=True, attn_gate=True, attn_gate_scale=0.5, doc_attention=True, init="orthogonal")


RECORD = "record-1855 (its own GPT, SDPA for FA3)"


def profile_model(name: str) -> ModelParams:
    return params.section(params.load(REPO / "profiles" / f"{name}.yaml"), "model", ModelParams)


def batch(vocab: int, seqs: int, seq_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, vocab, (seqs, seq_len + 1), generator=g)
    tokens[:, :: max(seq_len // 3, 1)] = BOS_ID  # a few documents per sequence, as packed training data has
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def step_ms(step, sync, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def make_step(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor, bf16: bool, loss_of=None):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(idx, tgt) if loss_of is None else loss_of(idx, tgt)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def record_gpt(code_dir: Path, p: ModelParams, seq_len: int, device: str, as_trained: bool = False):
    """PR #1855's own GPT at profile p, flash attention 3 replaced by PyTorch's SDPA (FA3 is not installed on a stock
    image). as_trained: set up as its train_model does (bf16 weights, its restore_fp32_params for matrices and controls)."""
    sys.path.insert(0, str(REPO / "tests"))
    from record_code import RECORD_DIRS, load_record_module, record_hyperparameters, record_settings

    folder, name = RECORD_DIRS["1855"]
    module = load_record_module(code_dir / folder / name)
    settings = {**record_settings(p, seq_len), "fused_ce_enabled": True}
    net = module.GPT(record_hyperparameters(module, **settings)).to(device)
    if as_trained:
        module.restore_fp32_params(net.bfloat16())
    net.looping_active = True
    return module, net


def cuda_agreement(code_dir: Path | None) -> dict:
    """Float32 logits of a small every-feature model: CUDA against CPU, and against the record's own evaluation
    forward on CUDA (document boundaries as its eval_val passes them) on the same weights."""
    p = dataclasses.replace(profile_model("record-1855"), layers=5, dim=64, heads=4, kv_heads=2, vocab_size=256, loop_start=1,
                            loop_end=2, parallel_start=3, xsa_last=5, rope_dims=8)
    idx, _ = batch(256, 1, 96, "cpu")
    torch.manual_seed(0)
    if code_dir:
        module, net = record_gpt(code_dir, p, 2048, "cpu")
        net.eval()
        with torch.no_grad():
            for t in net.parameters():
                t.add_(torch.randn_like(t) * 0.2)
        model = GPT(p)
        model.load_state_dict(convert.to_pgolf(net.state_dict(), p))
    else:
        model = GPT(p)
        with torch.no_grad():
            for t in model.parameters():
                t.add_(torch.randn_like(t) * 0.2)
    with torch.no_grad():
        cpu = model.eval().logits(idx)
        gpu = model.cuda().logits(idx.cuda())
    out = {"cuda_vs_cpu_max_abs": float((gpu.cpu() - cpu).abs().max())}
    if code_dir:
        cu, longest = module._build_cu_seqlens((idx[0] == BOS_ID).nonzero()[:, 0].tolist(), idx.size(1), torch.device("cuda"), 2048, 64)
        with torch.no_grad():
            want = net.cuda().forward_logits(idx.cuda(), cu_seqlens=cu, max_seqlen=longest)
        out["cuda_vs_record_forward_max_abs"] = float((gpu - want).abs().max())
    print(f"agreement (float32 logits, small every-feature model): {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each times every model once (CUDA: 5 steps each)")
    ap.add_argument("--record-code", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    if cuda:
        base = profile_model("8xh100")
        record = profile_model("record-1855")
        setups = {  # name: (model params, sequences, sequence length)
            "baseline 9x512": (base, 64, 1024),
            "record-1855 (ours)": (record, 48, 2048),
            "record-1855 (ours, doc_attention off)": (dataclasses.replace(record, doc_attention=False), 48, 2048),
        }
    else:
        demo = params.section(params.load(REPO / "params.yaml"), "model", ModelParams)
        setups = {"baseline demo 4x128": (demo, 4, 256), "every feature on": (dataclasses.replace(demo, **DEMO_FEATURES), 4, 256),
                  "every feature on, mlp_mult 4": (dataclasses.replace(demo, **DEMO_FEATURES, mlp_mult=4.0), 4, 256)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    agreement = cuda_agreement(args.record_code) if cuda else {}
    steps, info = {}, {}
    for name, (p, seqs, seq_len) in setups.items():
        model = GPT(p).to(args.device).train()
        idx, tgt = batch(p.vocab_size, seqs, seq_len, args.device)
        run = torch.compile(model, dynamic=False) if cuda else model
        steps[name] = make_step(model, idx, tgt, cuda, run)
        info[name] = {"params": sum(t.numel() for t in model.parameters()), "tokens": seqs * seq_len, "shape": f"{p.layers}x{p.dim}"}
    if cuda and args.record_code:
        p = setups["record-1855 (ours, doc_attention off)"][0]
        net = record_gpt(args.record_code, p, 2048, "cuda", as_trained=True)[1].train()
        idx, tgt = batch(p.vocab_size, 48, 2048, "cuda")
        compiled = torch.compile(net, dynamic=False, fullgraph=True)
        steps[RECORD] = make_step(net, idx, tgt, True, compiled)
        info[RECORD] = {"params": sum(t.numel() for t in net.parameters()), "tokens": 48 * 2048, "shape": "11x512"}
    failed = {}
    for name, step in list(steps.items()):  # warm-up: compiles on CUDA
        t = time.perf_counter()
        try:
            for _ in range(3 if cuda else 1):
                step()
            sync()
        except Exception as exc:  # noqa: BLE001 - the record's script needs kernels we do not control: report, keep ours
            if RECORD not in name:
                raise
            failed[name] = f"{type(exc).__name__}: {str(exc)[:400]}"
            del steps[name]
            print(f"{name}: failed: {failed[name]}", flush=True)
            continue
        info[name]["warmup_s"] = round(time.perf_counter() - t, 1)
        print(f"{name}: warm-up {info[name]['warmup_s']} s", flush=True)
    times = {name: [] for name in steps}
    peak = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[name] += step_ms(step, sync, 5 if cuda else 1)
            if cuda:
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
    rows = []
    first = next(iter(steps))
    for name in steps:
        ms = statistics.median(times[name])
        row = {"model": name, **info[name], "fwd_bwd_ms": round(ms, 2), "tokens_per_s": round(info[name]["tokens"] / ms * 1e3),
               "ratio_to_first": round(ms / statistics.median(times[first]), 3)}
        if cuda:
            row["peak_gib"] = round(peak[name], 2)
        rows.append(row)
        print(f"{name}: {info[name]['params']:,} params, {ms:.1f} ms fwd+bwd for {info[name]['tokens']:,} tokens "
              f"({row['tokens_per_s']:,} tokens/s), {row['ratio_to_first']:.2f}x the first" + (f", peak {peak[name]:.1f} GiB" if cuda else ""))
    device = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} CPU threads"
    out = args.out or REPO / "bench" / "results" / f"model_{args.device}.json"
    save({"device": device, "torch": torch.__version__, "bf16": cuda, "compiled": cuda, "repeats": args.repeats, "agreement": agreement,
          "rows": rows, "failed": failed}, out)


if __name__ == "__main__":
    main()
