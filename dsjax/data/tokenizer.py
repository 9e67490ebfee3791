"""SentencePiece BPE tokenizer, trained on the train split like llama2.c's TinyStories tokenizer.

Byte fallback (no unknown tokens), split digits, identity normalisation and no
whitespace collapsing, so `decode(encode(text)) == text` for any text. Ids:
0 = <unk>, 1 = <s> (BOS), 2 = </s> (EOS), 3 = <pad>, then the chat template's
special tokens (CHAT_TOKENS, ids 4..6), reserved when the tokenizer is trained so a
pretrained checkpoint can be fine-tuned on chat data with no vocabulary change.

Tokenizers live under the working folder, keyed by the train data's hash and the
vocab size (`<work_dir>/tokenizers/sp<V>-v2-<hash>/tokenizer.model`), never in the
input data folder, which may be read-only or shared.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from dsjax.data.download import SplitStats, iter_run_stories
from dsjax.data.layout import file_digest

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# user-defined pieces: SentencePiece never splits them and plain story text never produces them
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
# bumped when training options change, so a cached tokenizer of the old kind is not reused
TOKENIZER_VERSION = "v2"
TOKENIZER_FILE = "tokenizer.model"
# enough text for a 32k vocabulary; the full TinyStories train split is ~1.9 GB
MAX_TRAINING_CHARS = 200_000_000


class TokenizerError(RuntimeError):
    pass


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            first = str(err).strip().splitlines()[-1][:160] if str(err).strip() else err.__class__.__name__
            raise TokenizerError(f"{self.path} is not a readable SentencePiece model ({first})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self._byte_lengths, self._starts_with_space = self._piece_tables()

    def _piece_tables(self) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.zeros(self.vocab_size, np.int32)
        space = np.zeros(self.vocab_size, bool)
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            if self.sp.is_byte(i):
                lengths[i] = 1
                continue
            lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
            space[i] = piece.startswith("\u2581")
        return lengths, space

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def story_byte_counts(self, ids: list[int]) -> np.ndarray:
        """UTF-8 bytes of the original text each token stands for (the dummy-prefix space is not text)."""
        counts = self._byte_lengths[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, np.int32)
        if ids and self._starts_with_space[ids[0]]:
            counts = counts.copy()
            counts[0] -= 1
        return counts


def tokenizer_dir(work_dir: Path, train_file: Path, vocab_size: int) -> Path:
    return Path(work_dir) / "tokenizers" / f"sp{vocab_size}-{TOKENIZER_VERSION}-{file_digest(train_file)}"


def train_tokenizer(train_file: Path, vocab_size: int, out_dir: Path) -> Path:
    """Train a BPE model on the stories of `train_file` (JSONL); returns the model path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = SplitStats()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        text_path = Path(tmp) / "train.txt"
        chars = 0
        with open(text_path, "w", encoding="utf-8") as f:
            for story in iter_run_stories(Path(train_file), stats):
                f.write(story.strip() + "\n")
                chars += len(story)
                if chars >= MAX_TRAINING_CHARS:
                    break
        prefix = Path(tmp) / "tokenizer"
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_path),
                model_prefix=str(prefix),
                model_type="bpe",
                vocab_size=vocab_size,
                self_test_sample_size=0,
                input_format="text",
                character_coverage=1.0,
                num_threads=os.cpu_count() or 1,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                byte_fallback=True,
                unk_surface=r" \342\201\207 ",
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                max_sentence_length=16384,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                user_defined_symbols=list(CHAT_TOKENS),
                minloglevel=2,
            )
        except RuntimeError as err:
            raise TokenizerError(
                f"SentencePiece could not train a {vocab_size}-piece vocabulary on {train_file}: {err}. "
                "Use a smaller model.vocab_size or more training text."
            ) from None
        final = out_dir / TOKENIZER_FILE
        os.replace(f"{prefix}.model", final)
    return final


def load_or_train_tokenizer(data_dir: Path, work_dir: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer for this data and vocab size, training it on first use."""
    train_file = Path(data_dir) / "train" / "stories.jsonl"
    folder = tokenizer_dir(work_dir, train_file, vocab_size)
    model_path = folder / TOKENIZER_FILE
    if not model_path.is_file():
        log.info("training a %d-piece SentencePiece BPE tokenizer on %s", vocab_size, train_file)
        train_tokenizer(train_file, vocab_size, folder)
    tokenizer = Tokenizer(model_path)
    check_vocab(tokenizer, vocab_size)
    return tokenizer


def stash_tokenizer(model_path: Path, work_dir: Path) -> Tokenizer:
    """Load a checkpoint's tokenizer from a copy under `<work_dir>/tokenizers/run-<hash>/`.

    `--resume` always tokenizes with the checkpoint's own tokenizer; the copy keeps it
    readable after checkpoint retention deletes the step folder it came from.
    """
    model_path = Path(model_path)
    Tokenizer(model_path)  # readable before anything is copied
    folder = Path(work_dir) / "tokenizers" / f"run-{file_digest(model_path)}"
    dest = folder / TOKENIZER_FILE
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{TOKENIZER_FILE}.tmp"
        shutil.copyfile(model_path, tmp)
        os.replace(tmp, dest)
    return Tokenizer(dest)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size != vocab_size:
        raise TokenizerError(
            f"model.vocab_size={vocab_size} but the tokenizer at {tokenizer.path} has {tokenizer.vocab_size} pieces; "
            "set model.vocab_size to match, or remove that tokenizer to train a new one"
        )


def copy_tokenizer(tokenizer: Tokenizer, dest_dir: Path) -> Path:
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(tokenizer.path, dest_dir / TOKENIZER_FILE))
