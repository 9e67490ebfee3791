"""DATA_PREP: fetch TinyStories (or read local files) into `<out>/{train,valid}/stories.jsonl`.

Accepted local inputs (`--from`):
- a folder already in the `train/` + `valid/` layout (each with `stories.jsonl` or one `.txt`);
- a folder holding the official `TinyStories*-train.txt` / `*-valid.txt` files;
- a single `.txt` (stories separated by a line `<|endoftext|>`) or `.jsonl` file, split
  into train/valid by holding out the last `valid_fraction` of stories.

Every story is stripped, cp1252 mojibake (`â€œ` ...) is repaired, empty stories
are dropped, and each output file is written to a temporary name and renamed, so
an interrupted run never leaves a half-written `stories.jsonl`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from dsjax.data.layout import SPLITS, dataset_ready, publish_mode  # noqa: F401 - dataset_ready re-exported
from dsjax.progress import progress_bar

HF_BASE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
HUB_FILES = {
    "v1": {"train": "TinyStories-train.txt", "valid": "TinyStories-valid.txt"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"},
}
END_OF_TEXT = "<|endoftext|>"


class DownloadError(RuntimeError):
    """Data could not be fetched or read; the message says what to do."""


@dataclass
class SplitStats:
    stories: int = 0
    dropped_empty: int = 0
    repaired: int = 0
    malformed: int = 0
    notes: list[str] = field(default_factory=list)


# cp1252 bytes of common punctuation decoded as UTF-8 -> the intended character
_MOJIBAKE = {
    "â€œ": "“", "â€\x9d": "”", "â€™": "’", "â€˜": "‘", "â€”": "—", "â€“": "–",
    "â€¦": "…", "Ã©": "é", "Ã¨": "è", "Ã¯": "ï", "Ã±": "ñ", "Â ": " ", "â€": "”",
}


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 text that was decoded as cp1252 (TinyStories has a few dozen such stories)."""
    if "â€" not in text and "Ã" not in text and "Â" not in text:
        return text
    try:
        fixed = text.encode("cp1252").decode("utf-8")
        return fixed
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass
    for bad, good in _MOJIBAKE.items():  # longest patterns first by dict order
        text = text.replace(bad, good)
    return text


def clean_story(text: str, stats: SplitStats) -> str | None:
    text = text.strip()
    if not text:
        stats.dropped_empty += 1
        return None
    fixed = repair_mojibake(text)
    if fixed != text:
        stats.repaired += 1
    return fixed


def iter_txt_stories(path: Path) -> Iterator[str]:
    """Stories of an official .txt file: blocks separated by a line holding only <|endoftext|>."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip() == END_OF_TEXT:
                yield "".join(lines)
                lines = []
            else:
                lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines)


def iter_jsonl_stories(path: Path, stats: SplitStats) -> Iterator[str]:
    """`text` of each JSON line; malformed lines (bad JSON, no text, bad UTF-8) are counted and skipped."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8"))
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                if raw.strip():
                    stats.malformed += 1
                continue
            yield text


def iter_run_stories(path: Path, stats: SplitStats) -> Iterator[str]:
    """The stories a run trains on: `iter_jsonl_stories` without empty or whitespace-only texts (as `download` drops them)."""
    for text in iter_jsonl_stories(path, stats):
        if text.strip():
            yield text
        else:
            stats.dropped_empty += 1


def iter_stories(path: Path, stats: SplitStats) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from iter_jsonl_stories(path, stats)
    elif path.suffix == ".txt":
        yield from iter_txt_stories(path)
    else:
        raise DownloadError(f"{path}: expected a .txt or .jsonl file")


def write_jsonl_atomic(path: Path, stories: Iterable[str]) -> int:
    """Write one {"text": ...} per line to a temp file beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for story in stories:
                f.write(json.dumps({"text": story}, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _clean_all(stories: Iterable[str], stats: SplitStats, limit: int | None, desc: str) -> Iterator[str]:
    with progress_bar(desc, total=limit) as advance:
        for text in stories:
            if limit is not None and stats.stories >= limit:
                return
            story = clean_story(text, stats)
            if story is None:
                continue
            stats.stories += 1
            advance(1)
            yield story


def _find_split_file(folder: Path, split: str) -> Path | None:
    for candidate in (folder / split / "stories.jsonl", folder / split / "stories.txt"):
        if candidate.is_file():
            return candidate
    for pattern in (f"*-{split}.txt", f"*{split}*.jsonl", f"*{split}*.txt"):
        matches = sorted(folder.glob(pattern))
        if split == "valid":
            matches += sorted(folder.glob(pattern.replace("valid", "validation")))
        if matches:
            return matches[0]
    return None


def _official_files(folder: Path, version: str | None) -> dict[str, Path] | None:
    """The hub's .txt files of `version` in `folder`; without a version, v1's if both are there.

    None when `version` is None and the folder holds neither version's pair (other layouts
    are then looked for). A named version that is not there is refused.
    """
    present = {
        v: {split: folder / name for split, name in names.items()}
        for v, names in HUB_FILES.items()
        if all((folder / name).is_file() for name in names.values())
    }
    if version is None:
        return present.get("v1") or present.get("v2")
    if version not in present:
        names = " + ".join(HUB_FILES[version].values())
        raise DownloadError(
            f"--from {folder} --version {version}: no {names} there; --version picks between the hub's "
            "official files, so leave it out to read the folder's other files"
        )
    return present[version]


def prepare_from_local(
    source: Path, out: Path, max_stories: int | None = None, valid_fraction: float = 0.05, version: str | None = None
) -> dict[str, SplitStats]:
    """Read local TinyStories files into the train/valid JSONL layout under `out`.

    `version` (v1/v2) picks the hub's official files of that version in a folder holding
    them (v1's when a folder holds both and no version is named); it has no meaning for
    one file, which is refused.
    """
    source = Path(source)
    check_max_stories(max_stories)
    if version is not None and version not in HUB_FILES:
        raise DownloadError(f"unknown TinyStories version '{version}' (choose v1 or v2)")
    if not source.exists():
        raise DownloadError(f"--from {source}: no such file or folder")
    if version is not None and not source.is_dir():
        raise DownloadError(
            f"--from {source} is one file, read as it is; --version picks between the hub's official "
            "files in a folder: leave it out"
        )
    stats = {split: SplitStats() for split in SPLITS}
    if source.is_dir():
        files = _official_files(source, version) or {split: _find_split_file(source, split) for split in SPLITS}
        missing = [s for s, f in files.items() if f is None]
        if missing:
            raise DownloadError(
                f"--from {source}: found no {' or '.join(missing)} split "
                "(expected train/stories.jsonl + valid/stories.jsonl, or *-train.txt + *-valid.txt)"
            )
        for split, path in files.items():
            if path.resolve() == (out / split / "stories.jsonl").resolve():
                raise DownloadError(f"--from {source} is the output folder itself; nothing to do")
            write_jsonl_atomic(
                out / split / "stories.jsonl",
                _clean_all(iter_stories(path, stats[split]), stats[split], max_stories, f"{split} stories"),
            )
        return stats
    # one file: hold out the tail as the validation split
    all_stats = SplitStats()
    stories = list(_clean_all(iter_stories(source, all_stats), all_stats, max_stories, "stories"))
    if len(stories) < 2:
        raise DownloadError(f"--from {source}: needs at least 2 non-empty stories, found {len(stories)}")
    n_valid = max(1, int(round(len(stories) * valid_fraction)))
    parts = {"train": stories[:-n_valid], "valid": stories[-n_valid:]}
    for split in SPLITS:
        write_jsonl_atomic(out / split / "stories.jsonl", parts[split])
        stats[split] = SplitStats(
            stories=len(parts[split]),
            dropped_empty=all_stats.dropped_empty if split == "train" else 0,
            repaired=all_stats.repaired if split == "train" else 0,
            malformed=all_stats.malformed if split == "train" else 0,
        )
    return stats


def check_max_stories(max_stories: int | None) -> None:
    if max_stories is not None and max_stories <= 0:
        raise DownloadError(f"--max-stories must be > 0 (or left out for every story), got {max_stories}")


def _fetch(url: str, dest: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "dsjax"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            tmp = dest.with_suffix(dest.suffix + ".part")
            with open(tmp, "wb") as f, progress_bar(f"download {dest.name}", total=total, unit="B") as advance:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    advance(len(chunk))
            publish_mode(tmp)
            os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DownloadError(
            f"cannot reach the Hugging Face hub ({err.__class__.__name__}: {getattr(err, 'reason', err)}); "
            "pass local files with --from PATH (official .txt files, .jsonl, or a train/ + valid/ folder)"
        ) from None


def download_from_hub(
    out: Path, version: str = "v1", max_stories: int | None = None, timeout: float = 30.0, base_url: str = HF_BASE
) -> dict[str, SplitStats]:
    """Fetch the official TinyStories .txt files from the hub and convert them."""
    if version not in HUB_FILES:
        raise DownloadError(f"unknown TinyStories version '{version}' (choose v1 or v2)")
    check_max_stories(max_stories)
    raw_dir = Path(tempfile.mkdtemp(prefix="tinystories-"))
    try:
        for split, name in HUB_FILES[version].items():
            _fetch(f"{base_url}/{name}", raw_dir / name, timeout)
        return prepare_from_local(raw_dir, out, max_stories, version=version)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
