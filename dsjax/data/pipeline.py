"""Token cache and the Grain input pipeline.

JSONL -> tokenize each story, add BOS/EOS -> one token stream per split, cached on
disk with the UTF-8 byte count each token stands for (for bits per byte) ->
non-overlapping windows of seq_len + 1 tokens -> this process's share of windows
-> seeded shuffle, reshuffled every epoch -> batches. The Grain iterator's state
is a small dict that checkpoints save and restore.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from dsjax.data.download import SplitStats, iter_run_stories
from dsjax.data.layout import DataError, file_digest, publish_mode
from dsjax.data.tokenizer import Tokenizer
from dsjax.progress import progress_bar

log = logging.getLogger(__name__)

ENCODE_CHUNK = 4096
# bump when what goes into a cache changes (2: empty stories are dropped, as `download` drops them)
CACHE_FORMAT = 2

__all__ = ["DataError", "TokenizedSplit", "tokenize_split", "train_dataset", "eval_batches"]


@dataclass
class TokenizedSplit:
    tokens: np.ndarray  # [N] token stream: <s> story </s> <s> story </s> ...
    byte_counts: np.ndarray  # [N] UTF-8 bytes of story text per token (0 for <s> and </s>)
    stories: int
    malformed: int
    source: str = ""  # the JSONL file, for messages

    def windows(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Non-overlapping [n, seq_len + 1] windows of tokens and byte counts; the tail is dropped."""
        width = seq_len + 1
        n = len(self.tokens) // width
        if n == 0:
            raise DataError(
                f"{self.source or 'the split'}: its {len(self.tokens)} tokens cannot fill one window of {width} "
                "(seq_len + 1); use more stories or a smaller training.seq_len"
            )
        return self.tokens[: n * width].reshape(n, width), self.byte_counts[: n * width].reshape(n, width)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir_for(work_dir: Path, tokenizer: Tokenizer, jsonl: Path) -> Path:
    return Path(work_dir) / "tokens" / f"{file_digest(tokenizer.path, 12)}-{file_digest(jsonl, 12)}"


def tokenize_split(jsonl: Path, tokenizer: Tokenizer, work_dir: Path, name: str) -> TokenizedSplit:
    """Tokenize a JSONL split once; later calls load the cached arrays."""
    jsonl = Path(jsonl)
    cache = cache_dir_for(work_dir, tokenizer, jsonl)
    tokens_path, bytes_path, meta_path = (cache / f"{name}.{kind}" for kind in ("tokens.npy", "bytes.npy", "json"))
    meta = _read_meta(meta_path)
    if meta is not None and tokens_path.is_file() and bytes_path.is_file():
        return TokenizedSplit(
            np.load(tokens_path, mmap_mode="r"), np.load(bytes_path, mmap_mode="r"), meta["stories"], meta["malformed"],
            str(jsonl),
        )
    cache.mkdir(parents=True, exist_ok=True)
    stats = SplitStats()
    token_chunks: list[np.ndarray] = []
    byte_chunks: list[np.ndarray] = []
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    stories = iter_run_stories(jsonl, stats)
    with progress_bar(f"tokenize {name}", total=None) as advance:
        while True:
            batch = [s for _, s in zip(range(ENCODE_CHUNK), stories)]
            if not batch:
                break
            for ids in tokenizer.encode_batch(batch):
                token_chunks.append(np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype))
                counts = tokenizer.story_byte_counts(ids)
                byte_chunks.append(np.concatenate([[0], counts, [0]]).astype(np.uint8))
            stats.stories += len(batch)
            advance(len(batch))
    if stats.malformed:
        log.warning("%s: skipped %d malformed line(s) (bad JSON, no 'text', or invalid UTF-8)", jsonl, stats.malformed)
    if stats.dropped_empty:
        log.info("%s: dropped %d empty stor%s", jsonl, stats.dropped_empty, "y" if stats.dropped_empty == 1 else "ies")
    if not token_chunks:
        raise DataError(f"{jsonl}: no stories to tokenize (no line holds a non-empty \"text\")")
    tokens, byte_counts = np.concatenate(token_chunks), np.concatenate(byte_chunks)
    _save_npy_atomic(tokens_path, tokens)
    _save_npy_atomic(bytes_path, byte_counts)
    meta = {"format": CACHE_FORMAT, "stories": stats.stories, "malformed": stats.malformed, "tokens": len(tokens)}
    _write_text_atomic(meta_path, json.dumps(meta))  # written last: its presence marks a complete cache
    return TokenizedSplit(tokens, byte_counts, stats.stories, stats.malformed, str(jsonl))


def _read_meta(path: Path) -> dict | None:
    """A cache's metadata, or None when it is missing, unreadable or from an older format (then re-tokenize)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_dataset(
    split: TokenizedSplit,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Infinite, seeded, per-epoch reshuffled batches [batch_size / process_count, seq_len + 1] (int32).

    Every process walks the same shuffled order of global batches and keeps its own
    contiguous block of rows, so the global batch (and the training run) is the same
    whatever the number of processes.
    """
    if batch_size % process_count:
        raise DataError(f"global batch {batch_size} does not divide over {process_count} processes")
    windows, _ = split.windows(seq_len)
    if len(windows) < batch_size:
        raise DataError(
            f"only {len(windows)} windows of {seq_len + 1} tokens for a batch of {batch_size}; "
            "use more data, a smaller batch or a shorter seq_len"
        )
    local = batch_size // process_count
    first = process_index * local
    # Grain shuffles and batches window *indices*; the rows are gathered in one take per batch.
    # Same batches as shuffling the windows themselves, at a third of the cost per batch.
    dataset = (
        grain.MapDataset.range(len(windows))
        .shuffle(seed=seed)
        .repeat(None)
        .batch(batch_size, drop_remainder=True)
        .map(lambda rows: np.asarray(windows[np.asarray(rows[first : first + local])], dtype=np.int32))
    )
    # One reader thread with a short queue: it gathers the next batches while the loop's step call
    # (which releases the GIL) launches the step, so next() only takes a batch off the queue
    # (156 us against 778 us without a thread, on a 2-core CPU). Grain's default, 16 threads and
    # 500 batches, made next() 739 us here: the threads fought over the GIL.
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))


def eval_batches(split: TokenizedSplit, seq_len: int, batch_size: int, max_batches: int = 0):
    """Every valid window, in order, as (windows_BT1, bytes_BT, weight_B); the last batch is zero-padded."""
    windows, byte_counts = split.windows(seq_len)
    n = len(windows)
    if max_batches:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        w = np.asarray(windows[start : start + batch_size], dtype=np.int32)
        b = np.asarray(byte_counts[start : start + batch_size], dtype=np.int32)
        weight = np.ones(len(w), np.float32)
        if len(w) < batch_size:
            pad = batch_size - len(w)
            w = np.concatenate([w, np.zeros((pad, w.shape[1]), np.int32)])
            b = np.concatenate([b, np.zeros((pad, b.shape[1]), np.int32)])
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
        yield w, b, weight
