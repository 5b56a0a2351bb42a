"""The training loop: the official baseline's (Muon + Adam, LR warm-down, a wallclock budget) with the records'
recipe as params (Muon variants, weight decay, warm-down fraction and floor, depth recurrence switched on, EMA).

One call trains on this process's share of every global batch. Gradient accumulation keeps the
global batch the same for any process count; the wallclock decision is shared by all processes.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pgolf import checkpoint, shards
from pgolf.runtime import Dist, all_reduce, autocast
from pgolf.errors import InputError, TrainingDiverged
from pgolf.layout import IMPORTS
from pgolf.loader import TrainLoader
from pgolf.model import GPT, ModelParams
from pgolf.muon import NS_COEFFICIENTS, Muon
from pgolf.params import Range


@dataclasses.dataclass(frozen=True)
class TrainParams:
    seq_len: Annotated[int, Range(ge=1)]
    batch_tokens: int  # tokens per optimizer step, over all processes
    grad_accum: Annotated[int, Range(ge=1)]  # micro-batches per step over all processes (each process runs grad_accum / world)
    iterations: Annotated[int, Range(ge=1)]  # stop after this many steps ...
    max_seconds: Annotated[float, Range(ge=0)]  # ... or this much training time, whichever comes first (0 = no limit)
    warmdown_iters: int  # linear LR decay to 0 over the last N steps (of the time budget, if one is set)
    warmup_steps: int  # steps run and then undone before timing starts (primes torch.compile)
    embed_lr: Annotated[float, Range(ge=0)]  # untied input embedding (Adam)
    head_lr: Annotated[float, Range(ge=0)]  # untied output head (Adam)
    tied_embed_lr: Annotated[float, Range(ge=0)]  # tied embedding (Adam)
    matrix_lr: Annotated[float, Range(ge=0)]  # block matrices (Muon)
    scalar_lr: Annotated[float, Range(ge=0)]  # vectors and control tensors (Adam)
    muon_momentum: Annotated[float, Range(ge=0, lt=1)]
    muon_backend_steps: int  # Newton-Schulz iterations
    muon_momentum_warmup_start: Annotated[float, Range(ge=0, lt=1)]
    muon_momentum_warmup_steps: int
    beta1: Annotated[float, Range(ge=0, lt=1)]
    beta2: Annotated[float, Range(ge=0, lt=1)]
    adam_eps: Annotated[float, Range(gt=0)]
    grad_clip_norm: Annotated[float, Range(ge=0)]  # 0 = off
    val_tokens: int  # score the first N validation tokens after training (0 = all)
    val_batch_seqs: int  # sequences per evaluation batch on each process
    log_every: int  # steps between progress lines
    checkpoint_every: int  # steps between resumable checkpoints in the run folder (0 = off)
    resume: bool  # continue from the newest checkpoint in the run folder
    compile: bool  # torch.compile on CUDA (CPU always runs eagerly)
    import_from: str | None = None  # a record's float weights under imports/ instead of training (see pgolf.convert)
    # The records' recipe (PR #1394 -> #1855; docs/training.md); each default keeps the baseline.
    muon_ns: str = "quintic"  # quintic | polar_express: the Newton-Schulz coefficients
    muon_row_normalize: bool = False  # unit-norm rows of the momentum update before orthogonalising (MuonEq-R)
    muon_wd: Annotated[float, Range(ge=0)] = 0.0  # decoupled weight decay of the block matrices
    embed_wd: Annotated[float, Range(ge=0)] = 0.0  # ... of the embedding (AdamW)
    adam_wd: Annotated[float, Range(ge=0)] = 0.0  # ... of the control tensors (AdamW)
    warmdown_frac: Annotated[float, Range(ge=0, le=1)] = 0.0  # > 0: the warm-down is this last fraction of training (replaces warmdown_iters)
    min_lr: Annotated[float, Range(ge=0, le=1)] = 0.0  # the warm-down's floor, a fraction of each learning rate
    loop_at: Annotated[float, Range(ge=0, le=1)] = 0.0  # depth recurrence (model.loops) runs from this fraction of training on
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.0  # > 0: the checkpoint holds an exponential moving average of the weights
    order: str = "sequential"  # sequential (the official loader) | shuffled (the records' seeded sequence order)
    hessian_reserve_seconds: Annotated[float, Range(ge=0)] = 0.0  # of max_seconds, left for calibration's Hessians on training data

    def __post_init__(self) -> None:
        if self.batch_tokens % (self.grad_accum * self.seq_len):
            raise InputError(
                f"params.yaml: train.batch_tokens ({self.batch_tokens}) must be a multiple of "
                f"train.grad_accum * train.seq_len ({self.grad_accum} * {self.seq_len})"
            )
        if self.max_seconds > 0 and self.hessian_reserve_seconds >= self.max_seconds:
            raise InputError("params.yaml: train.hessian_reserve_seconds must be below train.max_seconds")
        if self.muon_ns not in NS_COEFFICIENTS:
            raise InputError(f"params.yaml: train.muon_ns is {self.muon_ns!r}; use {' | '.join(NS_COEFFICIENTS)}")
        if self.order not in ("sequential", "shuffled"):
            raise InputError(f"params.yaml: train.order is {self.order!r}; use sequential | shuffled")
        if self.import_from is not None and Path(self.import_from).parent != IMPORTS:
            raise InputError(f"params.yaml: train.import_from is {self.import_from!r}; put the file in {IMPORTS}/ (dvc.yaml tracks that folder)")


# Train settings that cannot change the trained weights: the only ones a resume may differ in.
NOT_RESULT = ("resume", "log_every", "checkpoint_every", "val_tokens", "val_batch_seqs", "import_from")
UNIFORM_NATS = 0.01  # a loss this close to ln(vocab) is a uniform prediction ...
UNIFORM_STEPS = 10  # ... and this many such steps in a row get a warning in the log
clock = time.perf_counter  # the training clock (tests replace it: no test depends on the machine's speed)


@dataclass
class Run:
    """What the loop hands back, and what a resumable checkpoint stores besides tensors."""

    step: int = 0
    train_ms: float = 0.0  # training time, without evaluation or compile warm-up
    stopped_by: str = "iterations"
    curve: list[list[float]] = field(default_factory=list)  # [step, train_loss, lr_scale, train_ms]
    loader: dict = field(default_factory=lambda: {"file": 0, "pos": 0})
    uniform_steps: int = 0  # steps whose loss was ln(vocab): the model predicted nothing

    @property
    def train_loss(self) -> float:
        return self.curve[-1][1] if self.curve else math.nan


def build(p: ModelParams, seed: int, device: torch.device) -> GPT:
    torch.manual_seed(seed)
    return GPT(p).to(device)


# Small control tensors: optimized with Adam, kept in float32 (and left unquantized by the baseline).
CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "attn.gate")


def param_groups(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """The baseline's optimizer split: Muon for the blocks' matrices, Adam for the embedding, the head and
    every small control tensor (scales, mixes, gains, gates, skip and lane weights)."""
    embed, head = [model.tok_emb.weight], [] if model.lm_head is None else [model.lm_head.weight]
    matrix = [p for n, p in model.blocks.named_parameters() if p.ndim == 2 and not any(c in n for c in CONTROL_PATTERNS)]
    taken = {id(p) for p in embed + head + matrix}
    scalar = [p for p in model.parameters() if id(p) not in taken and p.numel()]
    return {"matrix": matrix, "scalar": scalar, "embed": embed, "head": head}


def optimizers(model: GPT, t: TrainParams, device: torch.device) -> list[torch.optim.Optimizer]:
    """The baseline's split: Adam for the embedding (and untied head) and scalars, Muon for block matrices."""
    groups = param_groups(model)
    fused = device.type == "cuda"

    def adam(params: list, lr: float, wd: float = 0.0) -> torch.optim.AdamW:
        return torch.optim.AdamW([{"params": params, "lr": lr, "base_lr": lr}], betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                 weight_decay=wd, fused=fused)

    embed_lr = t.tied_embed_lr if model.p.tie_embeddings else t.embed_lr
    opts: list[torch.optim.Optimizer] = [adam(groups["embed"], embed_lr, t.embed_wd)]
    if groups["head"]:
        opts.append(adam(groups["head"], t.head_lr))
    muon = Muon(groups["matrix"], lr=t.matrix_lr, momentum=t.muon_momentum, backend_steps=t.muon_backend_steps,
                weight_decay=t.muon_wd, row_normalize=t.muon_row_normalize, ns=t.muon_ns)
    for group in muon.param_groups:
        group["base_lr"] = t.matrix_lr
    opts += [muon, adam(groups["scalar"], t.scalar_lr, t.adam_wd)]
    return opts


def budget_ms(t: TrainParams) -> float:
    """Training time allowed: the budget less the Hessians' reserve (0: no budget)."""
    return 1000 * (t.max_seconds - t.hessian_reserve_seconds) if t.max_seconds > 0 else 0.0


def fraction(t: TrainParams, step: int, elapsed_ms: float) -> float:
    """How far training is: of the time budget when one is set, else of the steps."""
    return elapsed_ms / budget_ms(t) if t.max_seconds > 0 else step / t.iterations


def lr_scale(t: TrainParams, step: int, elapsed_ms: float) -> float:
    """1, then a linear decay over the last warmdown_frac of training, or the last warmdown_iters steps (of the
    time budget when one is set), to 0 or the floor min_lr."""
    if t.warmdown_frac > 0:
        frac = fraction(t, step, elapsed_ms)
        return max((1 - frac) / t.warmdown_frac, t.min_lr) if frac >= 1 - t.warmdown_frac else 1.0
    if t.warmdown_iters <= 0:
        return 1.0
    if t.max_seconds <= 0:
        start = max(t.iterations - t.warmdown_iters, 0)
        scale = max((t.iterations - step) / t.warmdown_iters, 0.0) if start <= step < t.iterations else 1.0
    else:
        warmdown_ms = t.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(budget_ms(t) - elapsed_ms, 0.0)
        scale = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return max(scale, t.min_lr)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("step_*.safetensors"))


def identity(model: GPT, t: TrainParams, seed: int, shards_dir: Path) -> dict:
    """Everything a run's weights depend on: a resume continues only a run with the same identity."""
    train = {k: v for k, v in dataclasses.asdict(t).items() if k not in NOT_RESULT}
    return {"seed": seed, "model": dataclasses.asdict(model.p), "train": train, "data": shards.fingerprint(shards_dir, "train")}


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key saved -> now' for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _resumable(path: Path, ident: dict) -> str:
    """Why the checkpoint at `path` cannot continue a run of identity `ident` ('' if it can)."""
    saved = checkpoint.read_meta(path).get("identity")
    if saved is None:
        return "it records no settings (saved by an older pgolf)"
    diff = differences(saved, ident)
    return f"it was saved with other settings: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}" if diff else ""


def _non_finite(d: Dist, model: GPT, opts: list[torch.optim.Optimizer]) -> list[str]:
    """Names of non-finite weights and optimizer states, the same list on every process."""
    bad = [f"model/{n}" for n, v in model.state_dict().items() if not torch.isfinite(v).all()]
    for i, opt in enumerate(opts):
        for index, state in opt.state_dict()["state"].items():
            bad += [f"opt{i}/{index}/{k}" for k, v in state.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    any_bad = all_reduce(torch.tensor(float(len(bad)), device=d.device), "max").item()
    return bad or (["(on another process)"] if any_bad else [])


def _diverged(what: str, run_dir: Path) -> TrainingDiverged:
    last = checkpoints(run_dir)
    where = (f"last good checkpoint: {last[-1]} (every tensor finite; resumed with the same settings it replays the same steps)"
             if last else "no checkpoint was saved (train.checkpoint_every is 0 or not reached)")
    return TrainingDiverged(f"train: {what}; {where}. Lower the learning rates or set train.grad_clip_norm (other settings start afresh)")


def train(
    model: GPT,
    t: TrainParams,
    d: Dist,
    shards_dir: Path,
    run_dir: Path,
    seed: int,
    on_step: Callable[[Run], None] | None = None,
) -> Run:
    """Train `model` in place; return where the loop ended, with its loss curve."""
    if t.grad_accum % d.world:
        raise InputError(f"params.yaml: train.grad_accum ({t.grad_accum}) must be a multiple of the {d.world} processes")
    accum = t.grad_accum // d.world
    local_tokens = t.batch_tokens // t.grad_accum
    opts = optimizers(model, t, d.device)
    muon = next(o for o in opts if isinstance(o, Muon))
    net: torch.nn.Module = model
    if d.device.type == "cuda" and t.compile:
        net = torch.compile(model, dynamic=False, fullgraph=True)
    if d.distributed:
        net = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)
    loader = TrainLoader(shards_dir, d.rank, d.world, d.device, t.order, t.seq_len, seed)
    ema = {n: v.detach().float().clone() for n, v in model.state_dict().items()} if t.ema_decay else {}

    def step_once(scale: float, momentum: float) -> torch.Tensor:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            if d.distributed:
                net.require_backward_grad_sync = micro == accum - 1  # all-reduce once per step
            x, y = loader.next_batch(local_tokens, t.seq_len)
            with autocast(d.device):
                loss = net(x, y)
            loss_sum += loss.detach()
            (loss / accum).backward()
        for group in muon.param_groups:
            group["momentum"] = momentum
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if t.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        for opt in opts:
            opt.step()
        return all_reduce(loss_sum / accum) / d.world

    run = Run()
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = checkpoints(run_dir)
    ident = identity(model, t, seed, shards_dir)
    why_not = _resumable(saved[-1], ident) if t.resume and saved else "train.resume is false"
    if saved and not why_not:
        meta, extra = checkpoint.load_state(saved[-1], model, opts)
        ema = {n[len("ema/") :]: v.to(d.device) for n, v in extra.items() if n.startswith("ema/")}
        run = Run(**meta["run"])
        loader.stream.restore(run.loader)
        _log(d, f"train: resuming from {saved[-1]} at step {run.step}")
    else:
        if t.resume and saved:
            _log(d, f"train: not resuming {saved[-1]}: {why_not}; starting afresh")
        if d.distributed:
            dist.barrier()  # every process has read the checkpoints before they go
        if d.main:
            for old in saved:  # a fresh run: stale checkpoints must not be resumed later
                old.unlink()
    if t.warmup_steps and not run.step:
        # Prime compiled paths (both layer orders when recurrence switches on later), then restore the initial
        # state so that timing starts from the true init.
        initial = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts], loader.stream.state()
        for model.looping in [False, True] if model.p.loops and t.loop_at > 0 else [True]:
            for _ in range(t.warmup_steps):
                step_once(1.0, t.muon_momentum_warmup_start)
        model.load_state_dict(initial[0])
        for opt, state in zip(opts, initial[1]):
            opt.load_state_dict(state)
        loader.stream.restore(initial[2])

    _sync(d)
    t0 = clock()
    base_ms = run.train_ms
    uniform_loss, streak = math.log(model.p.vocab_size), 0
    while run.step < t.iterations:
        elapsed = base_ms + 1000 * (clock() - t0)
        scale = lr_scale(t, run.step, elapsed)
        model.looping = fraction(t, run.step, elapsed) >= t.loop_at
        frac = min(run.step / t.muon_momentum_warmup_steps, 1.0) if t.muon_momentum_warmup_steps > 0 else 1.0
        loss = step_once(scale, (1 - frac) * t.muon_momentum_warmup_start + frac * t.muon_momentum).item()
        if ema:
            with torch.no_grad():
                for name, w in model.state_dict().items():
                    ema[name].mul_(t.ema_decay).add_(w.float(), alpha=1 - t.ema_decay)
        run.step += 1
        run.train_ms = base_ms + 1000 * (clock() - t0)
        run.curve.append([run.step, loss, scale, round(run.train_ms, 1)])
        run.loader = loader.stream.state()
        if not math.isfinite(loss):
            raise _diverged(f"the loss is {loss} at step {run.step}", run_dir)
        streak = streak + 1 if abs(loss - uniform_loss) < UNIFORM_NATS else 0
        run.uniform_steps += UNIFORM_STEPS if streak == UNIFORM_STEPS else streak > UNIFORM_STEPS  # long streaks only
        if streak == UNIFORM_STEPS:
            _log(d, f"train: warning: the loss has been {uniform_loss:.4f} = ln(vocab), a uniform prediction, for {streak} steps "
                    f"(steps {run.step - streak + 1}..{run.step}): the model is not learning; are the learning rates too high?")
        if t.max_seconds > 0:
            over = torch.tensor(float(run.train_ms >= budget_ms(t)), device=d.device)
            if all_reduce(over, "max").item():
                run.stopped_by = "time"
        if d.main and t.log_every and (run.step % t.log_every == 0 or run.step == 1):
            _log_step(d, run, t)
        if t.checkpoint_every and run.step % t.checkpoint_every == 0:
            bad = _non_finite(d, model, opts)  # a non-finite state is never saved as resumable
            if bad:
                raise _diverged(f"the update of step {run.step} made {len(bad)} tensors non-finite ({', '.join(bad[:3])})", run_dir)
            if d.main:
                extra = {f"ema/{n}": v for n, v in ema.items()}
                checkpoint.save_state(run_dir / f"step_{run.step:06d}.safetensors", model, opts, {"run": run.__dict__, "identity": ident}, extra)
        if on_step is not None:
            on_step(run)
        if run.stopped_by == "time":
            break
    model.looping = True  # evaluation runs the full layer order
    if ema:  # what the checkpoint holds and every later stage uses
        model.load_state_dict({n: v.to(model.state_dict()[n].dtype) for n, v in ema.items()})
    return run


def _sync(d: Dist) -> None:
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def _log_step(d: Dist, run: Run, t: TrainParams) -> None:
    ms = run.train_ms / run.step
    left = (t.iterations - run.step) * ms
    if t.max_seconds > 0:
        left = min(left, 1000 * t.max_seconds - run.train_ms)
    eta = int(max(left, 0) / 1000)
    _log(
        d,
        f"train: step {run.step}/{t.iterations} loss {run.train_loss:.4f} lr x{run.curve[-1][2]:.3f} | "
        f"{ms:.0f} ms/step, {t.batch_tokens / ms * 1000:,.0f} tok/s | ETA {eta // 60}:{eta % 60:02d}",
    )
