"""SentencePiece tokenizers: load one with checks, or train a BPE model with the challenge's settings."""
from __future__ import annotations

import dataclasses

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from pgolf.errors import InputError
from pgolf.files import write_bytes
from pgolf.shards import MAX_VOCAB


@dataclasses.dataclass(frozen=True)
class TokenizerParams:
    model: str | None  # an existing SentencePiece model; null = train one on the training documents
    vocab_size: int  # vocabulary of a trained tokenizer
    train_docs: int | None  # train it on the first N training documents (null: all)
    train_on_val: bool  # also feed it the validation documents (the official tokenizer saw them)
    transform: str = "none"  # none | caseops (pgolf/caseops.py: documents transformed before tokenizing and training)

    def __post_init__(self) -> None:
        if self.transform not in ("none", "caseops"):
            raise InputError(f"params.yaml: tokenizer.transform is {self.transform!r}; use none or caseops")
        if not 8 <= self.vocab_size <= MAX_VOCAB:
            raise InputError(
                f"params.yaml: tokenizer.vocab_size is {self.vocab_size}; it must be 8..{MAX_VOCAB:,} "
                "so that every token id fits the shards' uint16"
            )
        if self.train_docs is not None and self.train_docs < 1:
            raise InputError("params.yaml: tokenizer.train_docs must be positive or null")


# The settings of the official exporter (data/download_hf_docs_and_tokenize.py).
CHALLENGE_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def load(path: Path | str) -> spm.SentencePieceProcessor:
    """A SentencePiece model whose ids fit uint16 shards and which has a BOS token."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer model not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{path}: not a SentencePiece model ({exc})") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise InputError(f"{path}: vocabulary of {sp.vocab_size():,} tokens; shards hold ids below {MAX_VOCAB:,}")
    if sp.bos_id() != CHALLENGE_SETTINGS["bos_id"]:  # the model masks SmearGate and document attention at this id
        raise InputError(f"{path}: the tokenizer's BOS is id {sp.bos_id()}; documents start with BOS, id {CHALLENGE_SETTINGS['bos_id']} as the challenge's")
    return sp


def train_bpe(texts: Iterable[str], vocab_size: int, out_model: Path, symbols: tuple[str, ...] = ()) -> spm.SentencePieceProcessor:
    """Train a BPE model on `texts` with the challenge's settings; write it to out_model. `symbols`: pieces of
    their own right after the special ids (CaseOps' operators: ids 4..7, the records' layout).

    The model's bytes depend only on the texts and the settings, so DVC sees a rerun as unchanged.
    """

    fed, failure = [0], []

    def sentences():
        # As the official exporter feeds its trainer: NULs to spaces, stripped, empty skipped. An error
        # while reading (a bad document) is kept and raised as it is, not as SentencePiece's INTERNAL.
        try:
            for text in texts:
                text = text.replace("\x00", " ").strip()
                if text:
                    fed[0] += 1
                    yield text
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the trainer has returned
            failure.append(exc)

    model = io.BytesIO()  # written in memory: a model_prefix path would be recorded in the model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, minloglevel=2, **CHALLENGE_SETTINGS,
            **({"user_defined_symbols": list(symbols)} if symbols else {}),
        )
    except RuntimeError as exc:
        if not failure and not fed[0]:
            raise InputError("params.yaml: no documents left to train the tokenizer on: data.val_docs takes them all "
                             "(the tokenizer never sees validation); lower data.val_docs, add documents or set tokenizer.model") from None
        if not failure:
            raise InputError(f"tokenizer training failed (tokenizer.vocab_size={vocab_size}): {str(exc).splitlines()[-1]}") from None
    if failure:
        raise failure[0]
    write_bytes(out_model, model.getvalue())
    return load(out_model)
