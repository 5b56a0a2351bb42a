"""Score-first test-time training (TTT): the model adapts to the validation stream it has already scored.

chunk_sgd (PR #549's chunked TTT): the pass-1 windows are grouped into chunks of about `chunk_tokens`
targets, in stream order. Each chunk is scored first, under inference mode, with the model as the
earlier chunks left it; then, unless it is the last, the model trains on that chunk's tokens for
`epochs` epochs of SGD with momentum (learning rate cosine-decayed over the chunks, gradients clipped),
only the last `blocks` blocks (0: every parameter).

doc_lora (PR #1855's per-document LoRA): each document's targets in chunks of `lora_chunk`, each read by
a window of up to eval.seq_len inputs of its own document. A chunk is scored, its loss is recorded, then
one AdamW step on that loss changes the document's own adapters (pgolf/lora.py), which only its later
chunks see; adapters start afresh for every document, so no document sees another. Documents are
batched, `lora_docs` consecutive ones at a time, each with its own adapters.

phased (PR #1855's eval_val_ttt_phased): doc_lora, plus `phases` global phases. Once the first
phase_docs·k/phases documents have all been scored, the whole model trains on them as chunk_sgd trains
on a chunk (chunks of chunk_tokens, cosine over the phase, the phase's last chunk left out as the record
leaves it), and the documents after them are scored by the model it leaves. The record counts those
documents in the order its length-sorted batches finish; pgolf counts them in stream order, so no
document is scored by a model that trained on a later one (one left-to-right pass).

Every method is a function of the stream it is handed and of n_targets, the validation length it is
told (a public constant): learning-rate schedules are fixed by n_targets, never by how many tokens
follow, so a method run on a stream cut after target t scores t exactly as the full run does. The
black-box audits (pgolf/audit.py) rely on that.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.errors import InputError
from pgolf.lora import TARGETS, DocLoRA, adapter_params
from pgolf.model import GPT
from pgolf.params import Range
from pgolf.runtime import autocast
from pgolf.score import EvalParams, keep, log_probs, nll_and_entropy, score_batch
from pgolf.tilt import Tilt
from pgolf.windows import Windows, doc_starts, plan

METHODS = ("none", "chunk_sgd", "doc_lora", "phased")


@dataclasses.dataclass(frozen=True)
class TTTParams:
    # lora_rank and lora_docs are bounded by what their state costs: see budget().
    method: str  # none (the records are pass 1's) | chunk_sgd | doc_lora | phased
    chunk_tokens: Annotated[int, Range(ge=1)]  # chunk_sgd and the global phases: targets per chunk (PR #549: 32,768)
    epochs: Annotated[int, Range(ge=0)]  # passes over each chunk after it is scored
    lr: Annotated[float, Range(ge=0)]  # SGD learning rate of the first chunk; cosine-decayed to 0 over the chunks
    momentum: Annotated[float, Range(ge=0, lt=1)]
    grad_clip: Annotated[float, Range(ge=0)]  # max gradient norm; 0 = none
    blocks: Annotated[int, Range(ge=0)]  # train the last N blocks only; 0 = every parameter
    batch_seqs: Annotated[int, Range(ge=1)]  # training sequences of eval.seq_len per step
    lora_rank: Annotated[int, Range(ge=1)] = 8  # doc_lora, phased (#1855: 80 at dim 512)
    lora_alpha: Annotated[float, Range(gt=0)] = 144.0  # adapters are scaled by alpha / rank
    lora_targets: str = "q k v o mlp head"  # which of q k v o mlp head get adapters
    lora_chunk: Annotated[int, Range(ge=1)] = 48  # targets scored before each adapter step
    lora_lr: Annotated[float, Range(ge=0)] = 1e-4  # AdamW
    lora_beta1: Annotated[float, Range(ge=0, lt=1)] = 0.0
    lora_beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99
    lora_wd: Annotated[float, Range(ge=0)] = 0.5
    lora_docs: Annotated[int, Range(ge=1)] = 64  # documents per batch
    phases: Annotated[int, Range(ge=0)] = 3  # phased: global phases ...
    phase_docs: Annotated[int, Range(ge=0)] = 2500  # ... spread over the first this many documents

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"params.yaml: ttt.method is {self.method!r}; use {' or '.join(METHODS)}")
        if not self.targets or set(self.targets) - set(TARGETS):
            raise InputError(f"params.yaml: ttt.lora_targets is {self.lora_targets!r}; choose one or more of {' '.join(TARGETS)}")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.lora_targets.split())


# One state commit of a method: before_segment(k, model) sees the model that scores segment k (chunk k of
# chunk_sgd, phase k of phased); the report snapshots it there.
BeforeSegment = Callable[[int, GPT], None]
Scores = Iterator[tuple[int, int, np.ndarray]]  # (i, j, [2, targets] NLL and entropy) of windows i..j-1, in order


def adapt(model: GPT, tokens: np.ndarray, ev: EvalParams, tp: TTTParams, bos: int, device: torch.device, n_targets: int | None = None,
          kept: dict[int, np.ndarray] | None = None, before_segment: BeforeSegment | None = None, start: int = 0) -> tuple[Windows, Scores]:
    """tp.method on the stream: its windows and its scores (the model is changed in place). n_targets: the
    validation length the method is told (None: this stream's). kept: see pgolf.score.keep. start: resume at
    segment `start`, the model already holding that segment's state (earlier segments are neither scored nor
    trained on; the report's audits use it with a snapshot)."""
    n = len(tokens) - 1 if n_targets is None else n_targets
    tilt = ev.tilt(tokens)
    if tp.method == "chunk_sgd":
        w = plan(tokens, ev.seq_len, ev.stride, ev.doc_isolated, bos)
        return w, chunk_sgd(model, tokens, w, ev.batch, ev.seq_len, tp, device, n, before_segment, tilt, kept, start)
    if tp.method in ("doc_lora", "phased"):
        if tp.lora_chunk > ev.seq_len:  # a window must reach back to its chunk's first target
            raise InputError(f"params.yaml: ttt.lora_chunk is {tp.lora_chunk}; it must be at most eval.seq_len ({ev.seq_len})")
        w = doc_windows(tokens, bos, tp.lora_chunk, ev.seq_len)
        return w, doc_lora(model, tokens, w, bos, ev.seq_len, tp, device, before_segment, tilt, kept, start)
    raise InputError(f"ttt.method {tp.method}: nothing to adapt (the records are pass 1's)")


def chunks(w: Windows, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive runs of windows (i, j), each closed once it holds chunk_tokens scored targets or more."""
    out, start, count = [], 0, 0
    for k, n in enumerate(w.scored):
        count += int(n)
        if count >= chunk_tokens:
            out.append((start, k + 1))
            start, count = k + 1, 0
    if start < len(w):
        out.append((start, len(w)))
    return out


def trainable(model: GPT, blocks: int) -> list[torch.nn.Parameter]:
    """The parameters TTT updates: every one, or those of the last `blocks` blocks."""
    if blocks == 0:
        return list(model.parameters())
    return [p for b in model.blocks[-blocks:] for p in b.parameters()]


def cosine(lr: float, k: int, count: int) -> float:
    """Chunk k's learning rate of `count` planned chunks: lr decayed to 0 at the last one."""
    return lr * 0.5 * (1 + math.cos(math.pi * min(k, count - 1) / max(1, count - 1)))


def sgd_epochs(model: GPT, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, span: np.ndarray, seq_len: int, tp: TTTParams,
               device: torch.device) -> None:
    """tp.epochs passes of next-token training over the tokens `span`, in sequences of seq_len, tp.batch_seqs per step."""
    model.train()
    for _ in range(tp.epochs):
        for start in range(0, len(span) - 1, seq_len * tp.batch_seqs):
            piece = span[start : start + seq_len * tp.batch_seqs + 1]
            rows = (len(piece) - 1) // seq_len
            if rows == 0:  # the span's tail, shorter than one sequence
                x, y = piece[None, :-1], piece[None, 1:]
            else:
                x, y = piece[: rows * seq_len].reshape(rows, seq_len), piece[1 : rows * seq_len + 1].reshape(rows, seq_len)
            with autocast(device):
                loss = model(torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(np.ascontiguousarray(y)).to(device))
            loss.backward()
            if tp.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tp.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.eval()


def freeze_except(model: GPT, params: list[torch.nn.Parameter]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def chunk_sgd(model: GPT, tokens: np.ndarray, w: Windows, batch: int, seq_len: int, tp: TTTParams, device: torch.device, n_targets: int,
              before_segment: BeforeSegment | None = None, tilt: Tilt | None = None, kept: dict[int, np.ndarray] | None = None,
              start: int = 0) -> Scores:
    """Windows i..j-1 in stream order, each chunk scored before the model trains on it; training sees the
    plain model, scoring the token tilt where given. The cosine runs over the ceil(n_targets / chunk_tokens)
    chunks planned for the validation length the method is told."""
    params = trainable(model, tp.blocks)
    freeze_except(model, params)
    opt = torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum)
    spans, planned = chunks(w, tp.chunk_tokens), max(1, -(-n_targets // tp.chunk_tokens))
    for k, (i, j) in enumerate(spans[start:], start):
        model.eval()
        if before_segment is not None:
            before_segment(k, model)
        for b in range(i, j, batch):
            yield b, min(b + batch, j), score_batch(model, tokens, w, b, min(b + batch, j), device, tilt, kept).cpu().numpy()
        if k == len(spans) - 1 or tp.epochs == 0:
            continue
        targets = w.targets(i, j)
        for group in opt.param_groups:
            group["lr"] = cosine(tp.lr, k, planned)
        sgd_epochs(model, params, opt, tokens[int(targets[0]) - 1 : int(targets[-1]) + 1].astype(np.int64), seq_len, tp, device)
    model.eval()


def doc_windows(tokens: np.ndarray, bos: int, chunk: int, seq_len: int) -> Windows:
    """Per-document chunks in stream order: document d's targets (its first input's successor up to the
    next BOS, which it predicts) in runs of `chunk`, each read by inputs of its own document, up to seq_len
    before the chunk's full end. The record reads a document's short last chunk with the seq_len inputs before
    the document's end instead, so where that window starts depends on where the next BOS is, after the
    targets it scores; from the chunk's full end it does not."""
    starts = doc_starts(tokens, bos)
    last = np.append(starts[1:], len(tokens) - 1)
    count = -(-(last - starts) // chunk)
    doc = np.repeat(np.arange(len(starts)), count)
    ci = np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)
    score_from = starts[doc] + ci * chunk
    return Windows(np.maximum(starts[doc], score_from + chunk - seq_len), score_from, np.minimum(score_from + chunk, last[doc]))


def phase_ends(docs: int, tp: TTTParams) -> list[int]:
    """Documents scored before each global phase (phased), in stream order; none for doc_lora."""
    if tp.method != "phased" or tp.phases == 0:
        return []
    prefix = min(docs, tp.phase_docs)
    return sorted({prefix * (k + 1) // tp.phases for k in range(tp.phases)} - {0})


def doc_lora(model: GPT, tokens: np.ndarray, w: Windows, bos: int, seq_len: int, tp: TTTParams, device: torch.device,
             before_segment: BeforeSegment | None = None, tilt: Tilt | None = None, kept: dict[int, np.ndarray] | None = None,
             start: int = 0) -> Scores:
    """doc_lora and phased: windows in stream order, one batch of documents at a time; with phases, the
    segments between phase ends are scored by the model the phase before them left."""
    starts = doc_starts(tokens, bos)
    first = np.searchsorted(w.end, np.append(starts, len(tokens)), side="right")  # each document's first window
    first[-1] = len(w)
    ends = phase_ends(len(starts), tp)
    segments = list(zip([0, *ends], [*ends, len(starts)]))
    for s, (d0, d1) in enumerate(segments[start:], start):
        if d0 == d1:
            continue
        model.eval()
        if before_segment is not None:
            before_segment(s, model)
        freeze_except(model, [])  # only the adapters train
        for b0 in range(d0, d1, tp.lora_docs):
            docs = np.arange(b0, min(b0 + tp.lora_docs, d1))
            scores = adapt_documents(model, tokens, w, first, docs, seq_len, tp, device, tilt, kept)
            yield int(first[b0]), int(first[docs[-1] + 1]), np.concatenate(scores, axis=1)
        if d1 < len(starts) and tp.epochs:  # a phase only helps documents after it
            global_phase(model, tokens[int(starts[0]) : int(starts[d1]) + 1].astype(np.int64), seq_len, tp, device)
    model.eval()


def global_phase(model: GPT, span: np.ndarray, seq_len: int, tp: TTTParams, device: torch.device) -> None:
    """A phase of phased: the model trains on the scored documents `span` as chunk_sgd trains on its chunks
    (chunks of tp.chunk_tokens, a fresh SGD, cosine over the phase's chunks; its last chunk is left out, as
    the record leaves it)."""
    params = trainable(model, tp.blocks)
    freeze_except(model, params)
    opt = torch.optim.SGD(params, lr=tp.lr, momentum=tp.momentum)
    count = max(1, -(-(len(span) - 1) // tp.chunk_tokens))
    for k in range(count - 1):
        for group in opt.param_groups:
            group["lr"] = cosine(tp.lr, k, count)
        sgd_epochs(model, params, opt, span[k * tp.chunk_tokens : (k + 1) * tp.chunk_tokens + 1], seq_len, tp, device)
    freeze_except(model, [])


def adapt_documents(model: GPT, tokens: np.ndarray, w: Windows, first: np.ndarray, docs: np.ndarray, seq_len: int, tp: TTTParams,
                    device: torch.device, tilt: Tilt | None, kept: dict[int, np.ndarray] | None) -> list[np.ndarray]:
    """[2, targets] of each of the documents `docs` (document d's windows: first[d]..first[d+1]-1), each chunk
    scored with the document's adapters as its earlier chunks left them, then one step on its loss."""
    count = first[docs + 1] - first[docs]
    # Every batch has lora_docs slots, a document's slot is its place among consecutive documents, and every chunk
    # step has one shape whichever documents share the batch or have ended: kernels round differently at other
    # shapes and rows, and a record must not depend on its neighbours.
    lora = DocLoRA(model, tp.lora_docs, tp.lora_rank, tp.lora_alpha, tp.targets).to(device)
    opt = torch.optim.AdamW(lora.parameters(), lr=tp.lora_lr, betas=(tp.lora_beta1, tp.lora_beta2), eps=1e-10, weight_decay=tp.lora_wd)
    out = [[] for _ in count]
    for ci in range(int(count.max())):
        rows = np.flatnonzero(ci < count)
        wi = first[docs[rows]] + ci
        width = min(seq_len, (ci + 1) * tp.lora_chunk)
        sub = Windows(w.begin[wi], w.score_from[wi], w.end[wi])
        positions, scored = sub.targets(0, len(sub)), sub.scored
        at = sub.begin[:, None] + np.arange(width)
        inputs = np.zeros((tp.lora_docs, width), dtype=np.int64)  # right padding and empty slots never read the stream
        inputs[rows] = np.where(at < sub.end[:, None], tokens[np.minimum(at, len(tokens) - 1)], 0)
        flat = np.repeat(rows * width - sub.begin, scored) + positions - 1
        targets = torch.from_numpy(tokens[positions].astype(np.int64)).to(device)
        logits, nll = chunk_nll(model, lora, inputs, flat, targets, device)
        with torch.no_grad():
            hint = None if tilt is None else torch.from_numpy(tilt.hints[positions]).to(device)
            logp = log_probs(logits, hint, 0.0 if tilt is None else tilt.boost)
            recorded = torch.stack(nll_and_entropy(logp, targets)).cpu().numpy()
            keep(kept, positions, logp)
        bounds = np.concatenate([[0], np.cumsum(scored)])
        for r, a, b in zip(rows, bounds[:-1], bounds[1:]):
            out[r].append(recorded[:, a:b])
        train = np.flatnonzero(ci < count[rows] - 1)  # a document's last chunk is never trained on
        if len(train):
            loss = sum(nll[int(bounds[r]) : int(bounds[r + 1])].mean() for r in train)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return [np.concatenate(o, axis=1) for o in out]


def chunk_nll(model: GPT, lora: DocLoRA, inputs: np.ndarray, flat: np.ndarray, targets: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits of the scored rows `flat` of inputs [docs, width] under each row's adapters, their NLL
    with the graph the adapter step backpropagates through)."""
    with autocast(device):
        logits = lora.logits(model, torch.from_numpy(inputs).to(device))
    logits = logits.reshape(-1, logits.size(-1))[torch.from_numpy(flat).to(device)].float()
    return logits, F.cross_entropy(logits, targets, reduction="none")


def adapted_params(model: GPT, tp: TTTParams) -> tuple[int, int]:
    """(model parameters the method trains, adapter parameters of one document), from the shapes alone."""
    full = sum(p.numel() for p in trainable(model, tp.blocks)) if tp.method in ("chunk_sgd", "phased") else 0
    one = adapter_params(model, tp.lora_rank, tp.targets) if tp.method in ("doc_lora", "phased") else 0
    return full, one


def kept_bytes(model: GPT, tp: TTTParams, rank: int, docs: int, seq_len: int, device: torch.device) -> int:
    """Bytes autograd keeps from a scoring pass of `docs` documents, in windows of seq_len (the widest) with adapters
    of `rank`, until their adapter step: measured on one forward, as the device and its kernels keep them."""
    lora = DocLoRA(model, docs, rank, tp.lora_alpha, tp.targets).to(device)
    own = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *lora.parameters()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:  # weights are the artifact's and the adapters', counted apart
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    grads = [p.requires_grad for p in model.parameters()]
    freeze_except(model, [])  # as doc_lora runs: only the adapters train
    scored = min(tp.lora_chunk, seq_len)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rows = np.arange(docs)[:, None] * seq_len + np.arange(seq_len - scored, seq_len)
            chunk_nll(model, lora, np.zeros((docs, seq_len), np.int64), rows.ravel(), torch.zeros(rows.size, dtype=torch.int64, device=device), device)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return sum(kept.values())


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


@dataclasses.dataclass(frozen=True)
class State:
    """What TTT holds beyond the artifact while it scores, bytes."""

    weights: int  # the trained model parameters and their SGD momentum (chunk_sgd, phased), float32
    shared: int  # what a scoring pass keeps once however many documents it holds (autocast's weight copies, ...)
    adapters: int  # one document's adapters and AdamW's two moments (doc_lora, phased), float32
    activations: int  # what a scoring pass keeps for one document's adapter step
    docs: int  # documents side by side

    @property
    def total(self) -> int:
        return self.weights + self.shared + self.docs * (self.adapters + self.activations)


def budget(model: GPT, tp: TTTParams, seq_len: int, max_bytes: int, device: torch.device) -> State:
    """tp's state on `model` in windows of seq_len, checked against max_bytes (verify.max_state_bytes) before any
    work: over it, one InputError says what would fit. The model's share and the adapters' are counted from the
    shapes; the activations are measured on one or two documents at ranks 1 and 2 (they grow linearly with both),
    so no large adapter is ever allocated."""
    full, one = adapted_params(model, tp)
    weights = 8 * full
    limit = f"verify.max_state_bytes is {max_bytes:,}"
    if weights > max_bytes:
        fits = [k for k in range(len(model.blocks), 0, -1) if 8 * sum(p.numel() for p in trainable(model, k)) <= max_bytes]
        advice = f"at most the last {fits[0]} blocks fit (ttt.blocks {fits[0]})" if fits else "not even the last block fits"
        raise InputError(f"params.yaml: ttt.method {tp.method} trains {full:,} model parameters, {_size(weights)} with their momentum; {limit}: {advice}")
    if not one:
        return State(weights, 0, 0, 0, 0)
    per_rank = 12 * one // tp.lora_rank  # a float32 adapter parameter and AdamW's two moments
    kept = kept_bytes(model, tp, 1, 1, seq_len, device)
    doc1 = kept_bytes(model, tp, 1, 2, seq_len, device) - kept  # one more document, at rank 1
    slope = kept_bytes(model, tp, 2, 1, seq_len, device) - kept  # one more rank, of one document
    state = State(weights, kept - doc1, per_rank * tp.lora_rank, doc1 + (tp.lora_rank - 1) * slope, tp.lora_docs)
    one_doc = weights + state.shared + state.adapters + state.activations
    if one_doc > max_bytes:
        rank = (max_bytes - weights - state.shared - doc1 + slope) // (per_rank + slope)
        advice = f"at most rank {rank} fits, one document at a time" if rank >= 1 else f"not even rank 1 fits at eval.seq_len {seq_len}"
        raise InputError(f"params.yaml: ttt.lora_rank {tp.lora_rank} needs {_size(one_doc)} of adapter state for one document "
                         f"(adapters, AdamW's moments, activations of {seq_len} tokens); {limit}: {advice}")
    if state.total > max_bytes:
        docs = (max_bytes - weights - state.shared) // (state.adapters + state.activations)
        raise InputError(f"params.yaml: ttt.lora_docs {tp.lora_docs} needs {_size(state.total)} of adapter state "
                         f"({_size(state.adapters + state.activations)} a document); {limit}: at most {docs} documents side by side fit")
    return state
