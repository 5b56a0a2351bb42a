"""CaseOps (the records' lossless_caps_caseops_v1): capitalisation moved into four operator characters.

Every maximal run of ASCII letters (a word) is written in lower case, preceded by what its case was:

    lower          -> unchanged                       "the"    -> "the"
    Title          -> TITLE + lower                   "The"    -> TITLE "the"
    ALLCAPS (2+)   -> ALLCAPS + lower                 "NASA"   -> ALLCAPS "nasa"
    anything else  -> [TITLE] + lower, CAPNEXT before every later capital
                                                      "McDonald" -> TITLE "mc" CAPNEXT "donald"

An operator character that is in the text already is written ESC + itself. Nothing else changes, so the
transform is a bijection onto well-formed text and `decode(encode(x)) == x` for every string. A tokenizer
trained on transformed text reuses one set of lower-case pieces for every capitalisation. BPB stays on the
original bytes: `position_bytes` gives each token the UTF-8 bytes of the decoded original text it stands for
(operators 0), which tokenize writes as the validation byte sidecar.

The records count a token's bytes from its surface in the text before SentencePiece's normalisation
(nmt_nfkc); pgolf counts the text the tokens decode to, as the challenge's byte tables do for any
tokenizer. The two differ only where normalisation changes a character's length (1 of the 650 shared
FineWeb documents: "º" becomes "o"); the report's bytes_are_utf8 holds pgolf's count to the decoded text.

The tokenizer normalises text after the transform, so what its tokens decode to can be no CaseOps text:
NFKC writes unmarked capitals (™ -> "TM", 𝕏, fullwidth letters, Ⅻ), letters beside an operator ("ｃAB" ->
"c" ALLCAPS "ab") and composes a lowered capital with the combining accent after it (TITLE "e" U+0301 ->
TITLE "é"). `decode(text, normalised=True)` inverts such text to the original as the tokenizer normalises
it, up to that normalisation; where normalisation merged two originals it cannot tell them apart ("ABｃ"
and "ABC" both become ALLCAPS "abc", "ABé" and "ABE" U+0301 both ALLCAPS "abé": the literal reading wins).
"""
from __future__ import annotations

import unicodedata
from collections.abc import Callable

import numpy as np
import sentencepiece as spm

from pgolf.bpb import ByteTables, position_bytes as table_bytes
from pgolf.errors import InputError

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)


class CaseOpsError(ValueError):
    """Transformed text that no original text encodes to."""


def _letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def encode(text: str) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if not _letter(ch):
            out.append(ESC + ch if ch in OPERATORS else ch)
            i += 1
            continue
        j = i + 1
        while j < n and _letter(text[j]):
            j += 1
        word, lower = text[i:j], text[i:j].lower()
        if word == lower:
            out.append(word)
        elif len(word) >= 2 and word == word.upper():
            out.append(ALLCAPS + lower)
        else:
            out.append(TITLE if word[0] != lower[0] else "")
            out.append(lower[0])
            out.extend(CAPNEXT + low if ch != low else low for ch, low in zip(word[1:], lower[1:]))
        i = j
    return "".join(out)


def _composed(ch: str) -> str | None:
    """The ASCII letter a character composes on (é -> e; only combining marks after it), else None: what NFKC
    makes of a lowered letter and the accent after it."""
    parts = unicodedata.normalize("NFD", ch)
    return parts[0] if len(parts) > 1 and _letter(parts[0]) and all(unicodedata.combining(c) for c in parts[1:]) else None


def decode(text: str, normalised: bool = False) -> str:
    """The original of transformed text; CaseOpsError where no original encodes to it. normalised: the text as a
    tokenizer's NFKC normalisation left it (see above), inverted to the original as that normalisation leaves
    it; strict decoding refuses what only normalisation writes, as the records' decoder does."""
    out: list[str] = []
    escaped, mode, capnext, in_word, allcaps, letters = False, None, False, False, False, 0
    for ch in text:
        if escaped:  # a literal character; an operator pending before it has no letter to apply to
            if mode is not None and not _letter(ch):
                raise CaseOpsError("an escaped character after a word operator")
            out.append(ch)
            escaped, in_word = False, _letter(ch)
            allcaps = allcaps and in_word
            continue
        if ch == ESC:
            escaped = True
        elif ch in (TITLE, ALLCAPS):
            if mode is not None or capnext or (in_word and not normalised):  # normalised: NFKC made the letter before it
                raise CaseOpsError("a word operator inside a word or after another operator")
            mode, in_word = ch, False
        elif ch == CAPNEXT:
            if capnext:
                raise CaseOpsError("two CAPNEXT in a row")
            capnext = True
        elif _letter(ch):
            if not in_word:
                allcaps = mode == ALLCAPS
                out.append(ch.upper() if mode is not None or capnext else ch)
                mode, capnext, in_word, letters = None, False, True, 1
            else:
                if mode is not None:
                    raise CaseOpsError("a word operator inside a word")
                out.append(ch.upper() if allcaps or capnext else ch)
                capnext, letters = False, letters + 1
        elif normalised and (mode is not None or capnext or (allcaps and letters == 1)) and (base := _composed(ch)):
            # A capital and its accent, composed after the transform lowered it: the operator's letter (or an
            # ALLCAPS word's second: the transform writes none of one letter). The accent ended the word.
            out.append(unicodedata.normalize("NFC", base.upper() + unicodedata.normalize("NFD", ch)[1:]))
            mode, capnext, in_word, allcaps = None, False, False, False
        else:
            if mode is not None or capnext:
                raise CaseOpsError("an operator not followed by a letter")
            out.append(ch)
            in_word = allcaps = False
    if escaped or mode is not None or capnext:
        raise CaseOpsError("an operator at the end of the text")
    return "".join(out)


def normalizer(sp: spm.SentencePieceProcessor) -> Callable[[str], str]:
    """The tokenizer's own normalisation (nmt_nfkc, whitespace folded) as text: what its tokens can decode to."""
    return lambda text: sp.normalize(text).replace("\u2581", " ")


def operator_ids(sp: spm.SentencePieceProcessor, model: str) -> np.ndarray:
    """The ids of TITLE, ALLCAPS, CAPNEXT, ESC: each must be one piece of its own (a user-defined symbol), as
    in the records' tokenizer (ids 4..7), or transformed text would be split unpredictably."""
    ids = [sp.piece_to_id(op) for op in OPERATORS]
    missing = [f"U+{ord(op):04X}" for op, i in zip(OPERATORS, ids) if i == sp.unk_id() or sp.id_to_piece(i) != op]
    if missing:
        raise InputError(f"{model}: tokenizer.transform is caseops but the tokenizer has no piece for the operator(s) {', '.join(missing)} "
                         "(train it with them as user-defined symbols, or use the records' caseops model)")
    return np.array(ids, dtype=np.int64)


def position_bytes(tokens: np.ndarray, tables: ByteTables, ops: np.ndarray) -> np.ndarray:
    """Bytes of each target of a transformed stream by position (pgolf.bpb.position_bytes' layout): the tables'
    count, except that an operator counts 0, or its own 3 bytes when an ESC before it makes it literal."""
    out = table_bytes(tokens, tables)
    at = np.flatnonzero(np.isin(tokens, ops))
    out[at] = 0
    literal = -1  # the position an ESC has made literal
    for t in at.tolist():  # operators are rare: walk them in order
        if t == literal:
            out[t] = len(OPERATORS[0].encode("utf-8"))
        elif tokens[t] == ops[3]:
            literal = t + 1
    out[0] = 0
    return out
