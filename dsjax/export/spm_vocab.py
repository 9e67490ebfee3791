"""Our SentencePiece model <-> llama.cpp's `llama` (SPM) vocabulary arrays.

GGUF stores an SPM vocabulary as three parallel arrays (pieces, scores, token types)
plus the special ids. SentencePiece's own piece types are the GGUF token types, value
for value (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6), so the
chat tokens stay user-defined (llama.cpp, like SentencePiece, never splits them) and
the byte-fallback pieces `<0x00>`..`<0xFF>` stay BYTE.

Going back, a SentencePiece BPE model is rebuilt from those arrays (the protobuf
SentencePiece itself reads), so an imported GGUF tokenizes as the original did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

BYTE, USER_DEFINED = 6, 4
WHITESPACE = "\u2581"


@dataclass(frozen=True)
class SpmVocab:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the model has none
    add_dummy_prefix: bool


def read_spm(path: Path) -> SpmVocab:
    """The vocabulary arrays of a SentencePiece .model file."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    t = proto.trainer_spec
    return SpmVocab(
        pieces=[p.piece for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        unk_id=t.unk_id,
        bos_id=t.bos_id,
        eos_id=t.eos_id,
        pad_id=t.pad_id,
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def write_spm(vocab: SpmVocab, path: Path) -> Path:
    """A SentencePiece BPE .model built from vocabulary arrays (identity normalisation, byte fallback if present)."""
    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(vocab.pieces, vocab.scores, vocab.types):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = len(vocab.pieces)
    t.byte_fallback = BYTE in vocab.types
    # encoding reads this one: runs of spaces may be pieces of their own
    t.allow_whitespace_only_pieces = any(len(p) > 1 and set(p) == {WHITESPACE} for p in vocab.pieces)
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id
    t.user_defined_symbols.extend(p for p, k in zip(vocab.pieces, vocab.types) if k == USER_DEFINED)
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = vocab.add_dummy_prefix
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    Path(path).write_bytes(proto.SerializeToString())
    return Path(path)
