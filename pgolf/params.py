"""params.yaml, one dataclass per section. Unknown, missing or mistyped keys fail by name."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pgolf.errors import InputError

PARAMS_FILE = Path("params.yaml")
MAX_VOCAB = 65_536  # token ids are stored as uint16 in the challenge shards

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: str  # builtin | docs | shards
    docs: str | list[str] | None  # docs: files, folders, globs or URLs (.jsonl, .parquet, .txt)
    shards: str | None  # shards: a folder holding fineweb_{train,val}_*.bin
    val_docs: int | None  # validation = the first val_docs documents (null: all of them, shards only)
    shard_tokens: int  # tokens per shard file
    workers: int  # encoding processes; 0 = one per core
    download_dir: str  # where URLs in data.docs are downloaded to

    def __post_init__(self) -> None:
        sources = ("builtin", "docs", "shards")
        if self.source not in sources:
            raise InputError(f"params.yaml: data.source is {self.source!r}; use one of {', '.join(sources)}")
        if self.source == "docs" and not self.docs:
            raise InputError("params.yaml: data.source is 'docs' but data.docs is empty")
        if self.source == "shards" and not self.shards:
            raise InputError("params.yaml: data.source is 'shards' but data.shards is empty")
        if self.source != "shards" and (self.val_docs is None or self.val_docs < 1):
            raise InputError("params.yaml: data.val_docs must be a positive document count")
        if self.shard_tokens < 1:
            raise InputError("params.yaml: data.shard_tokens must be positive")
        if self.workers < 0:
            raise InputError("params.yaml: data.workers must be 0 (all cores) or more")


@dataclasses.dataclass(frozen=True)
class TokenizerParams:
    model: str | None  # an existing SentencePiece model; null = train one on the training documents
    vocab_size: int  # vocabulary of a trained tokenizer
    train_docs: int | None  # train it on the first N training documents (null: all)
    train_on_val: bool  # also feed it the validation documents (the official tokenizer saw them)

    def __post_init__(self) -> None:
        if not 8 <= self.vocab_size <= MAX_VOCAB:
            raise InputError(
                f"params.yaml: tokenizer.vocab_size is {self.vocab_size}; it must be 8..{MAX_VOCAB:,} "
                "so that every token id fits the shards' uint16"
            )
        if self.train_docs is not None and self.train_docs < 1:
            raise InputError("params.yaml: tokenizer.train_docs must be positive or null")


@dataclasses.dataclass(frozen=True)
class ModelParams:
    layers: int
    dim: int
    heads: int
    kv_heads: int  # grouped-query attention: heads share kv_heads key/value heads
    mlp_mult: int  # MLP hidden width = mlp_mult * dim, relu² activation
    vocab_size: int
    tie_embeddings: bool  # the output head is the token embedding
    logit_softcap: float  # logits = cap * tanh(logits / cap)
    rope_base: float
    qk_gain_init: float  # initial per-head gain on the RMS-normed queries
    tied_embed_init_std: float

    def __post_init__(self) -> None:
        for key in ("layers", "dim", "heads", "kv_heads", "mlp_mult", "vocab_size"):
            if getattr(self, key) < 1:
                raise InputError(f"params.yaml: model.{key} must be positive")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise InputError(f"params.yaml: model.dim ({self.dim}) must be an even multiple of model.heads ({self.heads}) for rotary")
        if self.heads % self.kv_heads:
            raise InputError(f"params.yaml: model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if self.vocab_size > MAX_VOCAB:
            raise InputError(f"params.yaml: model.vocab_size is {self.vocab_size}; shards hold ids below {MAX_VOCAB:,}")
        if not self.logit_softcap > 0 or not self.rope_base > 0 or not self.tied_embed_init_std >= 0:
            raise InputError("params.yaml: model.logit_softcap and model.rope_base must be positive, model.tied_embed_init_std >= 0")


@dataclasses.dataclass(frozen=True)
class TrainParams:
    seq_len: int
    batch_tokens: int  # tokens per optimizer step, over all processes
    grad_accum: int  # micro-batches per step over all processes (each process runs grad_accum / world)
    iterations: int  # stop after this many steps ...
    max_seconds: float  # ... or this much training time, whichever comes first (0 = no limit)
    warmdown_iters: int  # linear LR decay to 0 over the last N steps (of the time budget, if one is set)
    warmup_steps: int  # steps run and then undone before timing starts (primes torch.compile)
    embed_lr: float  # untied input embedding (Adam)
    head_lr: float  # untied output head (Adam)
    tied_embed_lr: float  # tied embedding (Adam)
    matrix_lr: float  # block matrices (Muon)
    scalar_lr: float  # vectors and control tensors (Adam)
    muon_momentum: float
    muon_backend_steps: int  # Newton-Schulz iterations
    muon_momentum_warmup_start: float
    muon_momentum_warmup_steps: int
    beta1: float
    beta2: float
    adam_eps: float
    grad_clip_norm: float  # 0 = off
    val_tokens: int  # score the first N validation tokens after training (0 = all)
    val_batch_seqs: int  # sequences per evaluation batch on each process
    log_every: int  # steps between progress lines
    checkpoint_every: int  # steps between resumable checkpoints in the run folder (0 = off)
    resume: bool  # continue from the newest checkpoint in the run folder
    compile: bool  # torch.compile on CUDA (CPU always runs eagerly)

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.grad_accum < 1 or self.iterations < 1:
            raise InputError("params.yaml: train.seq_len, train.grad_accum and train.iterations must be positive")
        if self.batch_tokens % (self.grad_accum * self.seq_len):
            raise InputError(
                f"params.yaml: train.batch_tokens ({self.batch_tokens}) must be a multiple of "
                f"train.grad_accum * train.seq_len ({self.grad_accum} * {self.seq_len})"
            )
        if self.max_seconds < 0:
            raise InputError("params.yaml: train.max_seconds must be 0 (no limit) or positive")


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
class QuantParams:
    method: str  # gptq | rtn
    bits: QuantBits
    calib_seqs: int  # calibration sequences from the train shards (never validation)
    seq_len: int  # tokens per calibration sequence
    damp: float  # Hessian damping, a fraction of its mean diagonal
    act_order: bool  # quantize columns in order of decreasing Hessian diagonal
    block_size: int  # columns per lazy GPTQ update block

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise InputError(f"params.yaml: quant.method is {self.method!r}; use gptq or rtn")
        if self.calib_seqs < 1 or self.seq_len < 1 or self.block_size < 1:
            raise InputError("params.yaml: quant.calib_seqs, quant.seq_len and quant.block_size must be positive")
        if not 0 <= self.damp < 1:
            raise InputError("params.yaml: quant.damp must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class PackParams:
    level: int  # zstd level
    byte_limit: int  # the challenge's cap on code + compressed weights

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 22:
            raise InputError(f"params.yaml: pack.level is {self.level}; zstd levels are 1..22")



@dataclasses.dataclass(frozen=True)
class EvalParams:
    seq_len: int  # scoring window length (context + scored tokens)
    stride: int  # each window scores its last `stride` targets; stride == seq_len: non-overlapping windows
    batch: int  # windows per forward pass
    doc_isolated: bool  # a window never reaches back past its document's BOS

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch < 1:
            raise InputError("params.yaml: eval.seq_len and eval.batch must be positive")
        if not 1 <= self.stride <= self.seq_len:
            raise InputError(f"params.yaml: eval.stride is {self.stride}; it must be 1..eval.seq_len ({self.seq_len})")

    @property
    def mode(self) -> str:
        kind = "non-overlapping" if self.stride == self.seq_len else f"sliding-{self.stride}"
        return f"{kind}-doc-isolated" if self.doc_isolated else kind


@dataclasses.dataclass(frozen=True)
class CacheParams:
    max_order: int  # n-gram orders 1..max_order (context of max_order - 1 tokens)
    mix: str  # fixed | online: how λ is chosen (see pgolf/cache.py)
    lam: float  # fixed: λ; online: the prior λ of every bucket
    entropy_bins: int  # online: buckets of the model's entropy, one per nat
    prior: float  # online: pseudo-count of the prior λ
    update_every: int  # online: λ is re-estimated after every this many scored tokens
    max_state_bytes: int  # cap on the cache's tables and λ state

    def __post_init__(self) -> None:
        if self.mix not in ("fixed", "online"):
            raise InputError(f"params.yaml: cache.mix is {self.mix!r}; use fixed or online")
        if not 1 <= self.max_order <= 16:
            raise InputError("params.yaml: cache.max_order must be 1..16")
        if not 0.0 <= self.lam <= 1.0:
            raise InputError("params.yaml: cache.lam must be in [0, 1]")
        if self.entropy_bins < 1 or self.update_every < 1 or self.prior <= 0:
            raise InputError("params.yaml: cache.entropy_bins, cache.update_every and cache.prior must be positive")
        if self.max_state_bytes < 1:
            raise InputError("params.yaml: cache.max_state_bytes must be positive")


@dataclasses.dataclass(frozen=True)
class VerifyParams:
    positions: int  # sampled positions whose full distribution is rebuilt and checked
    audit_tokens: int  # the streaming audits look at the first this many targets (0: all)
    byte_limit: int  # artifact + code
    max_state_bytes: int  # eval-time auxiliary state
    max_overhead: float  # cache seconds over neural scoring seconds
    strict: bool  # fail the stage, after writing the report, when a rule is broken

    def __post_init__(self) -> None:
        if self.positions < 1 or self.audit_tokens < 0 or self.byte_limit < 1 or self.max_state_bytes < 1 or self.max_overhead <= 0:
            raise InputError("params.yaml: verify.positions, byte_limit, max_state_bytes and max_overhead must be positive, audit_tokens >= 0")

def load(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: params file not found (run stages from the repository root)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise InputError(f"{path}: expected a mapping of sections")
    return params


def scalar(params: dict[str, Any], name: str, kind: type[T], path: Path = PARAMS_FILE) -> T:
    """A top-level scalar param such as `seed`."""
    if name not in params:
        raise InputError(f"{path}: missing key {name}")
    value = _number(params[name], kind)
    if not _matches(value, kind):
        raise InputError(f"{path}: {name} is {params[name]!r}; expected {_describe(kind)}")
    return value


def section(params: dict[str, Any], name: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Build dataclass `cls` from section `name`, naming the key of any mistake."""
    return _build(cls, params.get(name), name, path)


def _build(cls: type[T], raw: Any, prefix: str, path: Path) -> T:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: section '{prefix}' is missing or not a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InputError(f"{path}: unknown key {prefix}.{unknown[0]} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, field in fields.items():
        if key not in raw:
            if field.default is not dataclasses.MISSING:
                continue
            raise InputError(f"{path}: missing key {prefix}.{key}")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], raw[key], f"{prefix}.{key}", path)
            continue
        value = _number(raw[key], hints[key])
        if not _matches(value, hints[key]):
            raise InputError(f"{path}: {prefix}.{key} is {raw[key]!r}; expected {_describe(hints[key])}")
        values[key] = value
    return cls(**values)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value: Any, hint: Any) -> Any:
    """A string written as a number, for a numeric key: YAML 1.1 reads `1e6` (no dot) as a string."""
    if not isinstance(value, str) or not _NUMBER.fullmatch(value.strip()):
        return value
    number = float(value)
    if _matches(number, hint):
        return number
    return int(number) if number.is_integer() and _matches(0, hint) else value


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__
