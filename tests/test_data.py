import json
import os

import grain
import numpy as np
import pytest

from dsjax.data.download import (
    DownloadError,
    download_from_hub,
    prepare_from_local,
    repair_mojibake,
    write_jsonl_atomic,
)
from dsjax.data.pipeline import eval_batches, tokenize_split, train_dataset
from dsjax.data.tokenizer import TokenizerError, check_vocab, load_or_train_tokenizer


def read_jsonl(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_download_from_official_txt(tmp_path):
    txt = tmp_path / "TinyStories-sample.txt"
    stories = [f"Story {i}. Tom said \u00e2\u20ac\u0153hi\u00e2\u20ac\u009d to Sue." for i in range(40)]
    body = "\n<|endoftext|>\n".join(stories[:20]) + "\n<|endoftext|>\n   \n<|endoftext|>\n" + "\n<|endoftext|>\n".join(stories[20:])
    txt.write_text(body, encoding="utf-8")
    stats = prepare_from_local(txt, tmp_path / "out")
    train, valid = read_jsonl(tmp_path / "out/train/stories.jsonl"), read_jsonl(tmp_path / "out/valid/stories.jsonl")
    assert len(train) + len(valid) == 40 and len(valid) == 2
    assert train[0] == "Story 0. Tom said \u201chi\u201d to Sue."  # mojibake repaired, whitespace stripped
    assert stats["train"].dropped_empty == 1 and stats["train"].repaired == 40


def test_repair_mojibake_leaves_clean_text_alone():
    assert repair_mojibake("Hello \u201cworld\u201d \u00e9") == "Hello \u201cworld\u201d \u00e9"
    assert repair_mojibake("it\u00e2\u20ac\u2122s") == "it\u2019s"


def test_download_from_jsonl_skips_and_counts_malformed_lines(tmp_path):
    src = tmp_path / "stories.jsonl"
    lines = [json.dumps({"text": f"A good story number {i}."}).encode() for i in range(10)]
    lines += [b"{not json", json.dumps({"story": "no text key"}).encode(), b'{"text": "bad \xff utf8"}', b"", json.dumps({"text": 5}).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    stats = prepare_from_local(src, tmp_path / "out", valid_fraction=0.2)
    assert stats["train"].malformed == 4
    assert stats["train"].stories == 8 and stats["valid"].stories == 2


def test_download_from_folder_layout_with_limit(tmp_path, tinystories_dir):
    stats = prepare_from_local(tinystories_dir, tmp_path / "out", max_stories=25)
    assert stats["train"].stories == 25 and stats["valid"].stories == 25
    first = json.loads((tinystories_dir / "train/stories.jsonl").open().readline())["text"]
    assert read_jsonl(tmp_path / "out/train/stories.jsonl")[0] == first


def write_official_files(folder, versions):
    """The hub's .txt files of each version in `versions`, each story naming its version and split."""
    from dsjax.data.download import HUB_FILES

    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        for split, name in HUB_FILES[version].items():
            body = "".join(f"A {version} {split} story number {i}.\n<|endoftext|>\n" for i in range(3))
            (folder / name).write_text(body, encoding="utf-8")


@pytest.mark.parametrize("version", [None, "v1", "v2"])
def test_version_picks_the_official_files_of_a_folder_holding_both(tmp_path, version):
    write_official_files(tmp_path / "raw", ["v1", "v2"])
    prepare_from_local(tmp_path / "raw", tmp_path / "out", version=version)
    for split in ("train", "valid"):
        assert read_jsonl(tmp_path / f"out/{split}/stories.jsonl") == [
            f"A {version or 'v1'} {split} story number {i}." for i in range(3)
        ]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_hub_download_fetches_the_named_version(tmp_path, version):
    """The real fetch code over file:// URLs (no network here): --version chooses which files are fetched."""
    write_official_files(tmp_path / "hub", ["v1", "v2"])
    stats = download_from_hub(tmp_path / "out", version, base_url=(tmp_path / "hub").as_uri())
    assert stats["train"].stories == 3 and stats["valid"].stories == 3
    assert read_jsonl(tmp_path / "out/valid/stories.jsonl")[0] == f"A {version} valid story number 0."


def test_unreachable_hub_fails_with_one_line_pointing_to_from(tmp_path):
    with pytest.raises(DownloadError, match=r"cannot reach the Hugging Face hub .*--from PATH") as err:
        download_from_hub(tmp_path / "out", base_url="http://127.0.0.1:9", timeout=2)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path):
    path = tmp_path / "train" / "stories.jsonl"
    write_jsonl_atomic(path, ["old story"])

    def broken():
        yield "new story"
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_jsonl_atomic(path, broken())
    assert read_jsonl(path) == ["old story"]
    assert os.listdir(path.parent) == ["stories.jsonl"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, tinystories_dir):
    return load_or_train_tokenizer(tinystories_dir, tmp_path_factory.mktemp("work"), 4096)


def test_tokenizer_lives_in_work_dir_not_input(tinystories_dir, tokenizer):
    assert sorted(p.name for p in tinystories_dir.iterdir()) == ["README.md", "train", "valid"]
    assert tokenizer.path.name == "tokenizer.model" and "tokenizers" in tokenizer.path.parts
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (4096, 1, 2, 3)


def test_tokenizer_round_trip_and_byte_counts(tinystories_dir, tokenizer):
    stories = read_jsonl(tinystories_dir / "valid/stories.jsonl")[:200]
    stories.append("Numbers 12345, tabs\tand emoji \U0001f600 and \u00fcml\u00e4uts.\n\nNew paragraph.")
    for text in stories:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(tokenizer.story_byte_counts(ids).sum()) == len(text.encode("utf-8"))
    assert tokenizer.encode("2024") == [tokenizer.sp.piece_to_id(p) for p in tokenizer.sp.encode_as_pieces("2024")]
    assert len(tokenizer.sp.encode_as_pieces("2024")) >= 4  # digits are split


def test_round_trip_on_the_larger_sample(tinystories_large_dir, tokenizer):
    """Every story of the larger valid split (more text, repaired mojibake) survives the small sample's tokenizer."""
    for text in read_jsonl(tinystories_large_dir / "valid/stories.jsonl"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(tokenizer.story_byte_counts(ids).sum()) == len(text.encode("utf-8"))


def test_run_drops_empty_stories_and_files_follow_the_umask(tmp_path, tokenizer):
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text('{"text": "A cat sat."}\n{"text": ""}\n{"text": "  \\n "}\n{"text": "A dog ran."}\n')
    old = os.umask(0o022)
    try:
        split = tokenize_split(jsonl, tokenizer, tmp_path / "work", "valid")
        write_jsonl_atomic(tmp_path / "out" / "stories.jsonl", ["one story"])
    finally:
        os.umask(old)
    assert split.stories == 2 and int((np.asarray(split.tokens) == tokenizer.bos_id).sum()) == 2
    written = [*(tmp_path / "work").rglob("*.npy"), tmp_path / "out" / "stories.jsonl"]
    assert written and all(f.stat().st_mode & 0o777 == 0o644 for f in written)


def test_vocab_mismatch_is_a_clear_error(tokenizer):
    with pytest.raises(TokenizerError, match=r"model.vocab_size=32000 but the tokenizer .* has 4096 pieces"):
        check_vocab(tokenizer, 32000)


def test_packing_loses_and_duplicates_nothing(tmp_path, tinystories_dir, tokenizer):
    split = tokenize_split(tinystories_dir / "valid/stories.jsonl", tokenizer, tmp_path, "valid")
    n = len(read_jsonl(tinystories_dir / "valid/stories.jsonl"))
    assert split.stories == n
    tokens = np.asarray(split.tokens)
    assert int((tokens == tokenizer.bos_id).sum()) == n and int((tokens == tokenizer.eos_id).sum()) == n
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
    bos_at = np.flatnonzero(tokens == tokenizer.bos_id)
    np.testing.assert_array_equal(tokens[bos_at[1:] - 1], tokenizer.eos_id)  # every story closes before the next opens
    first = read_jsonl(tinystories_dir / "valid/stories.jsonl")[0]
    assert tokenizer.decode(tokens[1 : bos_at[1] - 1]) == first
    windows, byte_counts = split.windows(63)
    assert windows.shape[1] == 64
    np.testing.assert_array_equal(windows.reshape(-1), tokens[: windows.size])
    assert len(tokens) - windows.size < 64
    texts = read_jsonl(tinystories_dir / "valid/stories.jsonl")
    assert int(np.asarray(split.byte_counts).sum()) == sum(len(t.encode()) for t in texts)
    # second call reads the cache
    again = tokenize_split(tinystories_dir / "valid/stories.jsonl", tokenizer, tmp_path, "valid")
    assert isinstance(again.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.tokens), tokens)


def test_grain_pipeline_shuffles_shards_and_resumes(tmp_path, tinystories_dir, tokenizer):
    split = tokenize_split(tinystories_dir / "valid/stories.jsonl", tokenizer, tmp_path, "valid")
    it = iter(train_dataset(split, 63, 8, seed=3))
    first = [np.asarray(next(it)) for _ in range(3)]
    assert first[0].shape == (8, 64) and first[0].dtype == np.int32
    state = it.get_state()
    expected = [np.asarray(next(it)) for _ in range(3)]
    fresh = iter(train_dataset(split, 63, 8, seed=3))
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    for want in expected:
        np.testing.assert_array_equal(np.asarray(next(fresh)), want)
    # the same batches as Grain shuffling the windows themselves (the order runs before the
    # index-gathering pipeline trained on), across an epoch's end
    windows, _ = split.windows(63)
    shuffled_windows = grain.MapDataset.source(windows).shuffle(seed=3).repeat(None).batch(8, drop_remainder=True)
    again = iter(train_dataset(split, 63, 8, seed=3))
    for i in range(len(windows) // 8 + 2):
        np.testing.assert_array_equal(np.asarray(next(again)), np.asarray(shuffled_windows[i]))
    other_seed = np.asarray(next(iter(train_dataset(split, 63, 8, seed=4))))
    assert not np.array_equal(other_seed, first[0])
    # two processes each feed their half of the same global batch
    whole = iter(train_dataset(split, 63, 8, 3))
    halves = [iter(train_dataset(split, 63, 8, 3, p, 2)) for p in (0, 1)]
    for _ in range(3):
        parts = [np.asarray(next(h)) for h in halves]
        assert parts[0].shape == (4, 64)
        np.testing.assert_array_equal(np.concatenate(parts), np.asarray(next(whole)))


def test_eval_batches_cover_every_window_once(tmp_path, tinystories_dir, tokenizer):
    split = tokenize_split(tinystories_dir / "valid/stories.jsonl", tokenizer, tmp_path, "valid")
    windows, _ = split.windows(255)
    batches = list(eval_batches(split, 255, 16))
    assert sum(float(w.sum()) for _, _, w in batches) == len(windows)
    assert all(b[0].shape == (16, 256) for b in batches)
