"""Pass-1 neural scoring: the NLL and entropy of every validation target under a window plan.

Windows go through the model in batches; only the positions a window scores go through the output
head, so a stride-64 window of 256 pays for 64 rows of logits, not 256. Batch b runs on process
b % world and all processes gather each round's results, so rank 0 receives them in stream order
and every batch is computed the same way for any process count.
"""
from __future__ import annotations

import dataclasses

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pgolf.errors import InputError
from pgolf.bpb import bits_per_byte
from pgolf.files import check_finite
from pgolf.params import Range
from pgolf.runtime import Dist, autocast
from pgolf.model import GPT
from pgolf.progress import Progress
from pgolf.tilt import Tilt, tilted
from pgolf.windows import Windows, doc_of, doc_starts


@dataclasses.dataclass(frozen=True)
class EvalParams:
    seq_len: Annotated[int, Range(ge=1)]  # scoring window length (context + scored tokens)
    stride: int  # each window scores its last `stride` targets; stride == seq_len: non-overlapping windows
    batch: Annotated[int, Range(ge=1)]  # windows per forward pass
    doc_isolated: bool  # a window never reaches back past its document's BOS
    # The token tilt's hint: the most frequent follower of the last N tokens so far; 0 = no tilt. Its table keeps a
    # tuple of N tokens per distinct context, up to one per target: N is bounded as cache.max_order is.
    tilt_order: Annotated[int, Range(ge=0, le=16)] = 0
    tilt_threshold: Annotated[int, Range(ge=1)] = 2  # ... once it has followed them this many times
    # β: the hint's probability is raised by e^β, then renormalised. In float32, below about -17 the normaliser
    # 1 + p(h)(e^β - 1) rounds to 0 where the model is sure of the hint, and above 88 e^β overflows: the records
    # would be NaN. ±16 multiplies the hint's odds by up to 9 million, far past any useful tilt.
    tilt_boost: Annotated[float, Range(ge=-16, le=16)] = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.seq_len:
            raise InputError(f"params.yaml: eval.stride is {self.stride}; it must be 1..eval.seq_len ({self.seq_len})")

    def tilt(self, tokens: np.ndarray) -> Tilt | None:
        """The token tilt of this stream (None when eval.tilt_order is 0)."""
        return Tilt.for_stream(tokens, self.tilt_order, self.tilt_threshold, self.tilt_boost)

    @property
    def mode(self) -> str:
        kind = "non-overlapping" if self.stride == self.seq_len else f"sliding-{self.stride}"
        kind = f"{kind}-doc-isolated" if self.doc_isolated else kind
        return f"{kind}-tilt{self.tilt_order}" if self.tilt_order else kind


SCHEMA = pa.schema(
    [
        ("position", pa.int64()),  # of the target in the validation stream (1..N)
        ("doc", pa.int32()),  # validation document the target belongs to (a BOS target ends the previous one)
        ("target", pa.int32()),
        ("context", pa.int32()),  # inputs the prediction saw: x[position - context : position]
        ("nll", pa.float32()),  # nats
        ("entropy", pa.float32()),  # of the model's distribution at this position, nats
        ("bytes", pa.int32()),  # of the target, by the challenge's byte tables
    ]
)
ROW_GROUP = 1 << 20


def log_probs(logits: torch.Tensor, hint: torch.Tensor | None = None, boost: float = 0.0) -> torch.Tensor:
    """float32 log-probabilities of rows of logits, tilted towards each row's hint where given: what records are made of."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp if hint is None else tilted(logp, hint, boost)


def nll_and_entropy(logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of each target, entropy) of rows of log_probs."""
    return -logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def keep(kept: dict[int, np.ndarray] | None, positions: np.ndarray, logp: torch.Tensor) -> None:
    """Fill kept[t] with the full distribution behind target t's record, exp of the very log-probabilities its
    record took (float64 of float32, numpy's exp as the audits take exp(-nll)), for each t the caller put in
    `kept`: what the method would record for every candidate there, bit for bit, for the report's audits."""
    for i in np.flatnonzero(np.isin(positions, list(kept or ()))):
        kept[int(positions[i])] = np.exp(logp[i].detach().cpu().numpy().astype(np.float64))


@torch.inference_mode()
def score_batch(model: GPT, tokens: np.ndarray, w: Windows, i: int, j: int, device: torch.device, tilt: Tilt | None = None,
                kept: dict[int, np.ndarray] | None = None) -> torch.Tensor:
    """[2, targets] float32 NLL and entropy of the targets windows i..j-1 score, in order (with the token tilt, if any);
    `kept`: see keep()."""
    begin, end = w.begin[i:j], w.end[i:j]
    width = int((end - begin).max())
    # Right padding with real tokens: a causal model's earlier positions never see it.
    inputs = tokens[np.minimum(begin[:, None] + np.arange(width), len(tokens) - 1)]
    rows = np.repeat(np.arange(j - i) * width - begin, w.scored[i:j]) + w.targets(i, j) - 1
    targets = torch.from_numpy(tokens[w.targets(i, j)].astype(np.int64)).to(device)
    with autocast(device):
        h = model.hidden(torch.from_numpy(inputs.astype(np.int64)).to(device))
        logits = model.head(h.reshape(-1, h.size(-1))[torch.from_numpy(rows).to(device)])
    hint = None if tilt is None else torch.from_numpy(tilt.hints[w.targets(i, j)]).to(device)
    logp = log_probs(logits, hint, 0.0 if tilt is None else tilt.boost)
    keep(kept, w.targets(i, j), logp)
    return torch.stack(nll_and_entropy(logp, targets))


def score_stream(model: GPT, tokens: np.ndarray, w: Windows, batch: int, d: Dist, tilt: Tilt | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (i, j, [2, targets] NLL and entropy) for windows i..j-1, in order, on rank 0.

    Every process must iterate it: each round, each computes one batch and all exchange them.
    """
    n_batches = -(-len(w) // batch)
    was_training = model.training
    model.eval()
    for first in range(0, n_batches, d.world):
        spans = [(b * batch, min((b + 1) * batch, len(w))) for b in range(first, min(first + d.world, n_batches))]
        mine = spans[d.rank] if d.rank < len(spans) else None
        result = score_batch(model, tokens, w, *mine, d.device, tilt) if mine else torch.zeros(2, 0, device=d.device)
        if d.distributed:
            width = max(int(w.scored[i:j].sum()) for i, j in spans)
            padded = torch.zeros(2, width, dtype=torch.float32, device=d.device)
            padded[:, : result.size(1)] = result
            gathered = [torch.empty_like(padded) for _ in range(d.world)]
            dist.all_gather(gathered, padded)
        else:
            gathered = [result]
        if d.main:
            for (i, j), got in zip(spans, gathered):
                yield i, j, got[:, : int(w.scored[i:j].sum())].cpu().numpy()
    model.train(was_training)


def records(tokens: np.ndarray, w: Windows, i: int, j: int, scores: np.ndarray, nbytes: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """The per-token record columns (SCHEMA's order) of windows i..j-1 given their [2, targets] scores and the
    bytes of every target by position (pgolf.bpb.position_bytes)."""
    pos = w.targets(i, j)
    return [
        pos,
        doc_of(pos, starts),
        tokens[pos].astype(np.int32),
        w.contexts(i, j).astype(np.int32),
        scores[0].astype(np.float32),
        scores[1].astype(np.float32),
        nbytes[pos].astype(np.int32),
    ]


class RowGroups:
    """Records written to parquet in row groups of ROW_GROUP rows, through one preallocated buffer.

    Each batch's columns are copied in and dropped at once. Holding every batch until its row group
    was full kept thousands of small arrays alive between the model's large activation buffers, and
    they pinned glibc's heap: at stride 1 (8-row batches) the score stage grew by about 65 MB/s.
    """

    def __init__(self, writer: pq.ParquetWriter | None):
        self.writer, self.fill = writer, 0
        self.columns = [np.empty(ROW_GROUP if writer else 0, f.type.to_pandas_dtype()) for f in SCHEMA]

    def add(self, columns: list[np.ndarray]) -> None:
        n, start = len(columns[0]), 0
        while self.writer and start < n:
            take = min(n - start, ROW_GROUP - self.fill)
            for buf, col in zip(self.columns, columns):
                buf[self.fill : self.fill + take] = col[start : start + take]
            self.fill, start = self.fill + take, start + take
            if self.fill == ROW_GROUP:
                self.flush()

    def flush(self) -> None:
        if self.writer and self.fill:
            table = pa.Table.from_arrays([pa.array(buf[: self.fill]) for buf in self.columns], schema=self.writer.schema)
            self.writer.write_table(table, row_group_size=ROW_GROUP)
        self.fill = 0


@dataclass(frozen=True)
class Totals:
    tokens: int
    nll: float  # nats, summed in float64 over the float32 records
    bytes: int

    @property
    def val_loss(self) -> float:
        return self.nll / self.tokens

    @property
    def val_bpb(self) -> float:
        return bits_per_byte(self.nll, self.bytes)


def write_records(
    model: GPT, tokens: np.ndarray, w: Windows, batch: int, nbytes: np.ndarray, bos_id: int, d: Dist, path: Path | None, progress: Progress | None = None,
    scores: Iterator[tuple[int, int, np.ndarray]] | None = None, tilt: Tilt | None = None,
) -> Totals | None:
    """Score every window, streaming the records to `path` (None: nowhere) on rank 0; the totals there.

    Every process calls it; the others compute their batches, hand them over and return None. `scores`
    replaces pass 1's batches with another scorer's (i, j, [2, targets]) in window order (adaptation). A NaN
    or infinite NLL or entropy is a StageError naming `path` and its position: write inside `staged`, and the
    last good records stay.
    """
    stream = score_stream(model, tokens, w, batch, d, tilt) if scores is None else scores
    if not d.main:
        for _ in stream:
            pass
        return None
    starts = doc_starts(tokens, bos_id)
    n_tokens, nll, n_bytes = 0, 0.0, 0
    schema = SCHEMA.with_metadata({"vocab_size": str(model.p.vocab_size)})  # the distribution's support, for rescore
    writer = pq.ParquetWriter(path, schema, compression="zstd") if path else None
    groups = RowGroups(writer)
    for i, j, scores in stream:
        columns = records(tokens, w, i, j, scores, nbytes, starts)
        check_finite(path or "records", columns[0], nll=columns[4], entropy=columns[5])
        nll += float(np.sum(scores[0], dtype=np.float64))
        n_bytes += int(np.sum(columns[-1], dtype=np.int64))
        n_tokens += len(columns[0])
        groups.add(columns)
        if progress:
            progress.update(len(columns[0]))
    if writer:
        groups.flush()
        writer.close()
    return Totals(n_tokens, nll, n_bytes)


@torch.inference_mode()
def score_reference(model: GPT, tokens: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """[2, N] NLL and entropy of every target t = 1..N, each from its own run on x[t - contexts[t-1] : t]."""
    model.eval()
    out = np.zeros((2, len(tokens) - 1), dtype=np.float32)
    for t in range(1, len(tokens)):
        x = torch.from_numpy(tokens[t - contexts[t - 1] : t].astype(np.int64))[None]
        logits = model.logits(x)[0, -1:]
        nll, entropy = nll_and_entropy(log_probs(logits), torch.tensor([int(tokens[t])]))
        out[:, t - 1] = nll.item(), entropy.item()
    return out
