"""What a data folder must hold, checked before any work, and the fingerprints that identify it.

A data folder is `train/stories.jsonl` + `valid/stories.jsonl` (what `dsjax
download` writes). `dsjax run` reads any such folder and never writes into it;
the one folder it may fill itself is the default `data/stories`, and only when
that folder holds neither file (a half-present default is an error, not a
reason to overwrite what is there).

A file's fingerprint is the start of its SHA-256. Checkpoints record the
fingerprints of the data they were trained on, so `--resume` can tell a
different data folder from the same files moved elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SPLITS = ("train", "valid")
STORIES_FILE = "stories.jsonl"
DEFAULT_DATA_DIR = "data/stories"  # training.data_dir's default (dsjax/config.py)
FINGERPRINT_CHARS = 16


class DataError(ValueError):
    """The data cannot feed the requested run (missing, empty, too little); the message says what to change."""


def split_file(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / split / STORIES_FILE


def dataset_ready(data_dir: Path) -> bool:
    return all(split_file(data_dir, split).is_file() for split in SPLITS)


def is_default(data_dir: Path) -> bool:
    return Path(data_dir) == Path(DEFAULT_DATA_DIR)


def make_command(data_dir: Path) -> str:
    return f"`dsjax download --out {data_dir}` (TinyStories from the hub) or `dsjax download --out {data_dir} --from PATH` (local files)"


def check_data_dir(data_dir: Path, may_download: bool, has_data_prep: bool = True) -> bool:
    """True when the run must download TinyStories into the default folder first; else the data is usable.

    Raises DataError naming the missing or empty file and the command that makes it.
    `has_data_prep`: the command has a data_prep stage to suggest (`run`; not `eval`).
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} is a file; a data folder holds train/{STORIES_FILE} and valid/{STORIES_FILE}")
    missing = [split_file(data_dir, s) for s in SPLITS if not split_file(data_dir, s).is_file()]
    if not missing:
        for split in SPLITS:
            require_stories(split_file(data_dir, split))
        return False
    if is_default(data_dir) and len(missing) == len(SPLITS):
        if may_download:
            return True
        raise DataError(
            f"no data at {data_dir} (missing {missing[0]}); "
            + ("add the data_prep stage to download TinyStories there, " if has_data_prep else "")
            + f"make it with {make_command(data_dir)}, or pass --data-dir"
        )
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; make it with {make_command(data_dir)}")
    raise DataError(
        f"data folder {data_dir} is missing {' and '.join(str(m) for m in missing)} "
        f"(it needs train/{STORIES_FILE} and valid/{STORIES_FILE}); add the missing file, or make a complete "
        f"folder with `dsjax download --out NEW_DIR [--from PATH]` (it never writes into a folder that holds "
        f"stories) and pass --data-dir NEW_DIR"
    )


def require_stories(path: Path) -> None:
    """Raise DataError unless `path` holds at least one JSON line with a non-empty "text" (reads only up to it)."""
    lines = 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                lines += 1
                try:
                    text = json.loads(raw.decode("utf-8")).get("text")
                except (UnicodeDecodeError, ValueError, AttributeError):
                    continue
                if isinstance(text, str) and text.strip():
                    return
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    what = "is empty" if lines == 0 else f"has {lines} line(s) but none is a JSON object with a non-empty \"text\""
    raise DataError(f"{path} {what}; a stories file holds one {{\"text\": ...}} per line (`dsjax download --from PATH` writes one)")


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path, length: int = FINGERPRINT_CHARS) -> str:
    """Hex SHA-256 prefix of a file's bytes (memoised per path, size and mtime: data files are hashed once per run)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key][:length]


def fingerprints(data_dir: Path) -> dict[str, str]:
    """What a checkpoint records about its data: the folder (for messages) and each split's fingerprint."""
    return {"data_dir": str(data_dir), **{f"{s}_sha256": file_digest(split_file(data_dir, s)) for s in SPLITS}}


def same_data(recorded: dict, current: dict) -> bool:
    return all(recorded.get(f"{s}_sha256") == current.get(f"{s}_sha256") for s in SPLITS)


def describe_fingerprints(prints: dict) -> str:
    return f"{prints.get('data_dir', '?')} (train {prints.get('train_sha256', '?')}, valid {prints.get('valid_sha256', '?')})"


def publish_mode(path: Path) -> None:
    """Give a file written through mkstemp (always 0600) the mode the user's umask asks for."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
