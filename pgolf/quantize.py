"""Quantize a trained GPT: Hessians from calibration tokens, GPTQ or RTN per matrix, a safe file of codes.

Block matrices and the token embedding become int8-stored codes of `quant.bits.<class>` bits with
float16 row scales (clip search or the records' SD clip); the small control tensors stay float32. A
tied embedding is quantized either row by row with per-row Hessians that cover both of its parts,
output head and input lookup, or as the records do, with the one Hessian of the head's input
(quant.embed_hessian). An untied input embedding has no input Hessian and is rounded to nearest.
Optionally LQER (pgolf/lqer.py) corrects the worst matrices. Calibration tokens come from the train
shards or from the float model itself (sample), so that nothing is read after training.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist

from pgolf.errors import InputError
from pgolf import gptq, lqer
from pgolf.codes import weight
from pgolf.lqer import LqerParams
from pgolf.model import BOS_ID, GPT, CastedLinear
from pgolf.params import Range
from pgolf.progress import Progress


@dataclasses.dataclass(frozen=True)
class QuantBits:
    attn: int  # attention matrices (q, k, v, output projection)
    mlp: int  # MLP matrices
    embed: int  # token embedding (and an untied output head)

    def __post_init__(self) -> None:
        for key in ("attn", "mlp", "embed"):
            if not 2 <= getattr(self, key) <= 8:
                raise InputError(f"params.yaml: quant.bits.{key} is {getattr(self, key)}; use 2..8")


@dataclasses.dataclass(frozen=True)
class QuantSigmas:
    attn: Annotated[float, Range(gt=0)]  # the SD clip's k per class: scale = k * std(row) / qmax
    mlp: Annotated[float, Range(gt=0)]
    embed: Annotated[float, Range(gt=0)]


@dataclasses.dataclass(frozen=True)
class QuantParams:
    method: str  # gptq | rtn
    bits: QuantBits
    clip: str  # search (per-row clip ratio of least error) | sdclip (k standard deviations, k = sigmas.<class>)
    sigmas: QuantSigmas
    embed_hessian: str  # tied embedding: per_row (head and lookup parts, V x D x D) | shared (the head input's D x D)
    calibration: str  # train (the train shards' first tokens) | self_generated (sampled from the float model)
    temperature: Annotated[float, Range(gt=0)]  # self_generated: sampling temperature
    calib_seqs: Annotated[int, Range(ge=1)]  # calibration sequences (never validation)
    seq_len: Annotated[int, Range(ge=1)]  # tokens per calibration sequence
    damp: Annotated[float, Range(ge=0, lt=1)]  # Hessian damping, a fraction of its mean diagonal
    act_order: bool  # quantize columns in order of decreasing Hessian diagonal
    block_size: Annotated[int, Range(ge=1)]  # columns per lazy GPTQ update block
    lqer: LqerParams

    def __post_init__(self) -> None:
        for key, allowed in (("method", ("gptq", "rtn")), ("clip", ("search", "sdclip")), ("embed_hessian", ("per_row", "shared")),
                             ("calibration", ("train", "self_generated"))):
            if getattr(self, key) not in allowed:
                raise InputError(f"params.yaml: quant.{key} is {getattr(self, key)!r}; use {' or '.join(allowed)}")

    def sigmas_for(self, cls: str) -> float | None:
        """The SD clip's k for a tensor class; None means the clip search."""
        return getattr(self.sigmas, cls) if self.clip == "sdclip" else None


MAX_ROW_HESSIAN_BYTES = 4 << 30  # per_row embedding Hessians beyond this are refused: use shared


def check_memory(q: QuantParams, vocab_size: int, dim: int, tied: bool) -> None:
    """Refuse per-row embedding Hessians that would not fit (17 GB at vocab 8192 x dim 512), before any work."""
    need = vocab_size * dim * dim * 8
    if tied and q.method == "gptq" and q.embed_hessian == "per_row" and need > MAX_ROW_HESSIAN_BYTES:
        raise InputError(f"params.yaml: quant.embed_hessian is per_row, which needs {need / 2**30:.1f} GiB of float64 Hessians at "
                         f"vocabulary {vocab_size} x dim {dim} (limit {MAX_ROW_HESSIAN_BYTES / 2**30:.0f} GiB); use shared")


@torch.no_grad()
def sample(model: GPT, seqs: int, seq_len: int, temperature: float, seed: int, batch_seqs: int = 16, progress: Progress | None = None) -> np.ndarray:
    """seqs sequences of seq_len + 1 tokens that the model writes itself from BOS (seeded, on the CPU's
    generator so that every device draws the same tokens): calibration without reading any data."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = np.zeros((seqs, seq_len + 1), dtype=np.int64)
    for start in range(0, seqs, batch_seqs):
        idx = torch.full((min(batch_seqs, seqs - start), 1), BOS_ID, dtype=torch.long)
        for _ in range(seq_len):
            logits = model.logits(idx.to(device))[:, -1].float().cpu()
            probs = torch.softmax(logits / temperature, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
        out[start : start + len(idx)] = idx.numpy()
        if progress is not None:
            progress.update(len(idx))
    return out


def tensor_class(name: str) -> str | None:
    """attn | mlp | embed for quantized tensors, None for tensors kept in float."""
    if name in ("tok_emb.weight", "lm_head.weight"):
        return "embed"
    if name.endswith(".weight") and ".attn." in name:
        return "attn"
    if name.endswith(".weight") and ".mlp." in name:
        return "mlp"
    return None


VOCAB_CHUNK = 32  # vocabulary rows per step when accumulating per-row Hessians (bounds memory)


def collect_hessians(model: GPT, inputs: np.ndarray, targets: np.ndarray, batch_seqs: int = 8, progress: Progress | None = None,
                     embed_hessian: str = "per_row") -> dict[str, torch.Tensor]:
    """Float64 Hessians of every quantized matrix over calibration sequences (inputs, targets [n, seq]).

    Block matrices and an untied head get H = XᵀX of their inputs. A tied embedding gets, with
    embed_hessian "per_row", one Hessian per vocabulary row [V, dim, dim], because each row plays two
    parts: as an output-head row its loss curvature is Σ p(1-p) · c² · x xᵀ over positions (softmax
    Gauss-Newton, c the soft-cap's slope), and as the input vector of its token, the Fisher g gᵀ of the
    loss gradient at that lookup. With "shared" it gets the records' XᵀX of the head's input [dim, dim]:
    V times less memory and time, blind to the lookup part.
    """
    hessians: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).double()
        h = x.T @ x
        hessians[name] = hessians[name] + h if name in hessians else h

    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: add(f"{name}.weight", args[0]))
        for name, module in model.named_modules()
        if isinstance(module, CastedLinear) and tensor_class(f"{name}.weight")
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(inputs), batch_seqs):
            idx = torch.from_numpy(inputs[start : start + batch_seqs].astype(np.int64)).to(device)
            tgt = torch.from_numpy(targets[start : start + batch_seqs].astype(np.int64)).to(device)
            if model.lm_head is not None or embed_hessian == "shared":
                with torch.no_grad():
                    add("lm_head.weight" if model.lm_head is not None else "tok_emb.weight", model.hidden(idx))
            else:
                _add_tied_embedding(model, idx, tgt, hessians)
            if progress is not None:
                progress.update(len(idx))
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    if dist.is_initialized():
        for h in hessians.values():
            dist.all_reduce(h)
    return hessians


def _add_tied_embedding(model: GPT, idx: torch.Tensor, tgt: torch.Tensor, hessians: dict[str, torch.Tensor]) -> None:
    looked_up = {}

    def keep(module, args, out) -> None:
        out.retain_grad()  # the loss gradient at each lookup: the input part's Fisher
        looked_up["e"] = out

    hook = model.tok_emb.register_forward_hook(keep)
    try:
        x = model.hidden(idx)
    finally:
        hook.remove()
    e = looked_up["e"]
    z = torch.nn.functional.linear(x, model.tok_emb.weight)
    cap = model.p.logit_softcap
    logits = cap * torch.tanh(z / cap)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1), reduction="sum").backward()
    with torch.no_grad():
        V, D = model.tok_emb.weight.shape
        p = logits.detach().reshape(-1, V).double().softmax(-1)
        slope = 1 - torch.tanh(z.detach() / cap).reshape(-1, V).double() ** 2
        w = p * (1 - p) * slope * slope  # [positions, V]
        X = x.detach().reshape(-1, D).double()
        H = hessians.setdefault("tok_emb.weight", torch.zeros(V, D, D, dtype=torch.float64, device=X.device))
        for v in range(0, V, VOCAB_CHUNK):
            H[v : v + VOCAB_CHUNK] += torch.einsum("tv,td,te->vde", w[:, v : v + VOCAB_CHUNK], X, X)
        g = e.grad.reshape(-1, D).double()
        H.index_add_(0, idx.reshape(-1), g[:, :, None] * g[:, None, :])


def quantize_model(model: GPT, hessians: dict[str, torch.Tensor], q: QuantParams) -> tuple[dict[str, torch.Tensor], dict]:
    """Codes, scales, LQER factors and float tensors, plus per-tensor metadata (bits, method, H-weighted error).

    With several processes each quantizes every world-th matrix and broadcasts its result.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    names = [n for n in state if tensor_class(n)]
    tensors: dict[str, torch.Tensor] = {n: v for n, v in state.items() if not tensor_class(n)}
    info: dict[str, dict] = {}
    progress = Progress("calibrate: quantize", total=len(names), unit="tensors")
    for i, name in enumerate(names):
        w, cls = state[name], tensor_class(name)
        bits, sigmas = getattr(q.bits, cls), q.sigmas_for(cls)
        H = hessians.get(name)
        H = None if H is None else H.cpu()
        method = q.method if H is not None else "rtn"
        codes = torch.zeros(w.shape, dtype=torch.int8)
        scale = torch.zeros(w.shape[0], dtype=torch.float16)
        if i % world == rank:
            if method == "gptq" and H.ndim == 3:
                codes, scale = gptq.gptq_rows(w, H, bits, q.damp, sigmas)
            elif method == "gptq":
                codes, scale = gptq.gptq(w, H, bits, q.damp, q.block_size, q.act_order, sigmas)
            else:
                codes, scale = gptq.rtn(w, bits, H, sigmas)
        if world > 1:
            dist.broadcast(codes, src=i % world)
            dist.broadcast(scale, src=i % world)
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = codes, scale
        info[name] = {"class": cls, "bits": bits, "method": method, "clip": q.clip if sigmas is None else f"sdclip {sigmas:g}", "shape": list(w.shape)}
        progress.update()
    # LQER on what every process now holds alike: the same factors everywhere.
    tensors.update(lqer.correct(state, {n: weight(tensors, n) for n in names}, q.lqer))
    for name in names:
        H = hessians.get(name)
        H = None if H is None else H.cpu()
        err = state[name].double() - weight(tensors, name).double()
        # Error relative to the weight's own H-weighted energy (plain squared error without H), after any LQER.
        info[name]["h_error"] = float(gptq.h_error(err, H).sum() / gptq.h_error(state[name].double(), H).sum())
        info[name]["lqer_rank"] = int(tensors[f"{name}.lqer_a"].size(1)) if f"{name}.lqer_a" in tensors else 0
        if info[name]["lqer_rank"]:
            info[name]["lqer_bits"] = [q.lqer.a_bits, q.lqer.b_bits]
    progress.done(f"{q.method}, {q.clip}, bits attn/mlp/embed = {q.bits.attn}/{q.bits.mlp}/{q.bits.embed}, "
                  f"LQER on {sum(t['lqer_rank'] > 0 for t in info.values())}")  # its own share of the time
    return tensors, {"model": dataclasses.asdict(model.p), "quantized": names, "tensors": info}
