"""TinyStories: token cache built from a tiny file in the official format, tokenizers, windows."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from esper_jax.data import tinystories
from esper_jax.data.datasets import CorruptDatasetError
from esper_jax.data import (
    ByteTokenizer,
    DatasetNotFoundError,
    TokenizerUnavailableError,
    load_tinystories_dataset,
    load_tinystories_tokens,
    load_token_dataset,
    token_windows,
)

STORIES = [
    "Once upon a time, there was a little dog named Max.\nMax liked to run.",
    "Lily saw a big red ball. She said, \"Can I play?\" Her mom smiled.",
    "The sun was warm. Tom ate an apple \u2014 and a pear \u263a.",
]


def write_stories(path: Path, stories: list[str]) -> Path:
    # the official files put the separator on its own line between stories
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path


def expected_byte_tokens(stories: list[str]) -> np.ndarray:
    return np.concatenate([np.append(np.frombuffer(s.encode(), np.uint8).astype(np.uint16), 256) for s in stories])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_stories(tmp_path / "tinystories" / "TinyStories-train.txt", STORIES)
    write_stories(tmp_path / "tinystories" / "TinyStories-valid.txt", STORIES[:1])
    return tmp_path


@pytest.fixture
def no_gpt2_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


# --------------------------------------------------------------------------- byte tokenizer and cache


def test_byte_tokenizer_round_trips_utf8() -> None:
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eot_id) == (257, 256)
    tokens = np.concatenate([tokenizer.encode(STORIES[2]), [256], tokenizer.encode("Bye")])
    assert tokenizer.decode(tokens) == STORIES[2] + "<|endoftext|>Bye"


def test_tokens_are_stories_joined_by_eot(data_dir: Path) -> None:
    tokens = load_tinystories_tokens("train", data_dir, tokenizer="byte")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
    np.testing.assert_array_equal(tokens, expected_byte_tokens(STORIES))
    np.testing.assert_array_equal(load_tinystories_tokens("val", data_dir, tokenizer="byte"), expected_byte_tokens(STORIES[:1]))


def test_cache_layout_and_metadata(data_dir: Path) -> None:
    tokens = load_tinystories_tokens("train", data_dir, tokenizer="byte")
    folder = data_dir / "tinystories" / "byte"
    assert sorted(p.name for p in folder.iterdir()) == ["train.bin", "train.json"]
    metadata = json.loads((folder / "train.json").read_text())
    source = data_dir / "tinystories" / "TinyStories-train.txt"
    assert metadata["source"] == str(source) and metadata["source_size"] == source.stat().st_size
    assert metadata["source_mtime_ns"] == source.stat().st_mtime_ns
    assert (metadata["tokenizer"], metadata["vocab_size"], metadata["eot_id"]) == ("byte", 257, 256)
    assert metadata["num_tokens"] == len(tokens)


def test_cache_is_reused(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_tinystories_tokens("train", data_dir, tokenizer="byte")

    def must_not_rebuild(*args: object) -> int:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(tinystories, "build_token_cache", must_not_rebuild)
    np.testing.assert_array_equal(load_tinystories_tokens("train", data_dir, tokenizer="byte"), first)


def test_changed_source_rebuilds(data_dir: Path) -> None:
    load_tinystories_tokens("train", data_dir, tokenizer="byte")
    source = data_dir / "tinystories" / "TinyStories-train.txt"
    write_stories(source, STORIES + ["A new story."])
    np.testing.assert_array_equal(
        load_tinystories_tokens("train", data_dir, tokenizer="byte"), expected_byte_tokens(STORIES + ["A new story."])
    )
    # same size, different content: the mtime still gives it away
    stat = source.stat()
    write_stories(source, [s.upper() for s in STORIES + ["A new story."]])
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(
        load_tinystories_tokens("train", data_dir, tokenizer="byte"),
        expected_byte_tokens([s.upper() for s in STORIES + ["A new story."]]),
    )


def test_truncated_token_file_is_not_trusted(data_dir: Path) -> None:
    load_tinystories_tokens("train", data_dir, tokenizer="byte")
    bin_path = data_dir / "tinystories" / "byte" / "train.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:10])
    np.testing.assert_array_equal(load_tinystories_tokens("train", data_dir, tokenizer="byte"), expected_byte_tokens(STORIES))


def test_interrupted_build_leaves_nothing_trusted(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_tinystories_tokens("train", data_dir, tokenizer="byte")
    source = data_dir / "tinystories" / "TinyStories-train.txt"
    write_stories(source, STORIES * 3)
    calls = 0
    real_encode = ByteTokenizer.encode_stories

    def dies_midway(self: ByteTokenizer, stories: list[str]) -> list[np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real_encode(self, stories)

    monkeypatch.setattr(tinystories, "_STORIES_PER_BATCH", 2)
    monkeypatch.setattr(ByteTokenizer, "encode_stories", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        load_tinystories_tokens("train", data_dir, tokenizer="byte")
    folder = data_dir / "tinystories" / "byte"
    # no temporary leftovers, and no metadata vouching for the old token file
    assert sorted(p.name for p in folder.iterdir()) == ["train.bin"]
    monkeypatch.setattr(ByteTokenizer, "encode_stories", real_encode)
    np.testing.assert_array_equal(load_tinystories_tokens("train", data_dir, tokenizer="byte"), expected_byte_tokens(STORIES * 3))


def test_separators_split_across_read_chunks(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tinystories, "_READ_CHUNK_CHARS", 7)
    stories = list(tinystories.iter_stories(data_dir / "tinystories" / "TinyStories-train.txt"))
    assert stories == STORIES


def test_v2_names_and_files_directly_in_data_dir(tmp_path: Path) -> None:
    write_stories(tmp_path / "TinyStoriesV2-GPT4-valid.txt", STORIES[1:])
    np.testing.assert_array_equal(load_tinystories_tokens("valid", tmp_path, tokenizer="byte"), expected_byte_tokens(STORIES[1:]))


def test_dataset_records_source(data_dir: Path) -> None:
    dataset = load_tinystories_dataset(data_dir, tokenizer="byte")
    assert not dataset.synthetic and dataset.source == str(data_dir / "tinystories" / "TinyStories-train.txt")
    assert (dataset.vocab_size, dataset.eot_id, dataset.tokenizer) == (257, 256, "byte")
    assert load_token_dataset(data=str(data_dir), tokenizer="byte").train_tokens.shape == dataset.train_tokens.shape


def test_env_var_resolution(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_DATA", str(data_dir))
    monkeypatch.chdir(tmp_path.parent)
    assert len(load_tinystories_tokens("valid", tokenizer="byte")) == len(expected_byte_tokens(STORIES[:1]))


def test_missing_text_names_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_tinystories_tokens("train", tmp_path, tokenizer="byte")
    message = str(caught.value)
    for expected in ["TinyStories-train.txt", "TinyStoriesV2-GPT4-train.txt", str(tmp_path / "tinystories"),
                     "--data-dir", "$ESPER_DATA", "--data=synthetic"]:
        assert expected in message
    with pytest.raises(DatasetNotFoundError):
        load_token_dataset(data="auto", data_dir=tmp_path, tokenizer="byte")


# --------------------------------------------------------------------------- gpt2 through tiktoken, offline


def test_gpt2_without_cached_files_fails_fast_and_explains(data_dir: Path, no_gpt2_files: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TokenizerUnavailableError) as caught:
        load_tinystories_tokens("train", data_dir, tokenizer="gpt2")
    assert time.monotonic() - started < 5.0
    message = str(caught.value)
    assert "TIKTOKEN_CACHE_DIR" in message and str(no_gpt2_files) in message and "--tokenizer=byte" in message
    for url in tinystories.GPT2_BPE_FILES:
        assert hashlib.sha1(url.encode()).hexdigest() in message


def test_gpt2_with_corrupt_cached_files(no_gpt2_files: Path) -> None:
    for url in tinystories.GPT2_BPE_FILES:
        (no_gpt2_files / hashlib.sha1(url.encode()).hexdigest()).write_text("not the real file")
    with pytest.raises(TokenizerUnavailableError, match="does not match the sha256"):
        tinystories.get_tokenizer("gpt2")


def test_gpt2_with_cache_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(TokenizerUnavailableError, match="disables tiktoken's cache"):
        tinystories.get_tokenizer("gpt2")


class _FakeGPT2:
    """Stands in for tiktoken's gpt2 to build a gpt2-named cache without its files."""

    name, vocab_size, eot_id = "gpt2", 50257, 50256

    def encode_stories(self, stories: list[str]) -> list[np.ndarray]:
        return [np.array([50000, len(s)], dtype=np.uint16) for s in stories]


def test_cached_gpt2_tokens_load_without_tiktoken_files(data_dir: Path, no_gpt2_files: Path) -> None:
    source = tinystories.find_tinystories_text("train", data_dir)
    tokens_path, meta_path = tinystories.token_cache_paths("train", "gpt2", data_dir)
    tinystories.build_token_cache(source, _FakeGPT2(), tokens_path, meta_path)
    tokens = load_tinystories_tokens("train", data_dir, tokenizer="gpt2")
    assert tokens.tolist() == [t for s in STORIES for t in (50000, len(s), 50256)]


def test_gpt2_path_with_a_stand_in_encoding(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything after the cache check runs for real, on a byte-level encoding shaped like gpt2."""
    import tiktoken

    stand_in = tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""\S+|\s+""",
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={"<|endoftext|>": 50256},
    )
    monkeypatch.setattr(tinystories, "gpt2_cache_problems", lambda: [])
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    tokens = load_tinystories_tokens("valid", data_dir, tokenizer="gpt2")
    expected = np.append(np.frombuffer(STORIES[0].encode(), np.uint8).astype(np.uint16), 50256)
    np.testing.assert_array_equal(tokens, expected)
    assert tinystories.get_tokenizer("gpt2").decode(tokens.tolist()) == STORIES[0] + "<|endoftext|>"


def test_synthetic_tokens_need_no_tokenizer_files(no_gpt2_files: Path) -> None:
    dataset = load_token_dataset(data="synthetic", tokenizer="gpt2", n_train_tokens=5000, n_val_tokens=1000)
    assert dataset.synthetic and (dataset.vocab_size, dataset.eot_id) == (50257, 50256)
    assert dataset.train_tokens.dtype == np.uint16 and int(dataset.train_tokens.max()) < 50257


# --------------------------------------------------------------------------- windows


def test_windows_shift_inputs_and_targets_by_one() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    windows = token_windows(tokens, block_size=8)
    assert windows.shape == ((100 - 9) // 8 + 1, 9) and windows.dtype == np.uint16
    inputs, targets = windows[:, :-1], windows[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(windows[1], np.arange(8, 17))
    np.testing.assert_array_equal(token_windows(tokens, 8), windows)  # deterministic
    assert token_windows(tokens, 8, stride=1).shape == (92, 9)
    assert token_windows(tokens, 8, max_windows=3).shape == (3, 9)
    assert token_windows(tokens[:5], 8).shape == (0, 9)


def test_windows_from_memmapped_tokens(data_dir: Path) -> None:
    tokens = load_tinystories_tokens("train", data_dir, tokenizer="byte")
    windows = token_windows(tokens, block_size=16)
    np.testing.assert_array_equal(windows[2], np.asarray(tokens[32:49]))


# --------------------------------------------------------------------------- hostile input


def test_text_that_is_not_utf8_is_refused_with_the_offset(data_dir: Path) -> None:
    """Random bytes are not TinyStories: refused, naming the file and the first bad byte, and no
    cache is left vouching for them."""
    path = data_dir / "tinystories" / "TinyStories-train.txt"
    good = "Once upon a time there was a cat.\n<|endoftext|>\n".encode()
    data = good + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as first:
        data.decode("utf-8")
    assert first.value.start >= len(good)
    with pytest.raises(CorruptDatasetError, match=rf"not UTF-8 text .* byte offset {first.value.start}\b"):
        load_tinystories_tokens("train", data_dir, tokenizer="byte")
    assert not (data_dir / "tinystories" / "byte" / "train.json").exists()


def test_a_few_stray_bytes_are_tolerated_and_characters_survive_chunk_edges(data_dir: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tinystories, "_READ_CHUNK_CHARS", 5)  # cuts multi-byte characters in two
    path = data_dir / "tinystories" / "TinyStories-train.txt"
    text = ("Über den Fluß ging ein Bär. " * 200) + "\n<|endoftext|>\nZweite Geschichte – schön.\n"
    raw = text.encode()
    path.write_bytes(raw[:50] + b"\xff" + raw[50:])  # one stray byte in 5,000
    stories = list(tinystories.iter_stories(path))
    assert len(stories) == 2 and stories[1] == "Zweite Geschichte – schön." and "\ufffd" in stories[0]
    assert stories[0].replace("\ufffd", "") == text.split("\n<|endoftext|>\n")[0].strip()


def test_read_only_data_dir_caches_elsewhere_and_says_where(data_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cache_root = tmp_path / "user-cache"
    monkeypatch.setenv("ESPER_JAX_CACHE", str(cache_root))
    text_dir = (data_dir / "tinystories").resolve()
    real_writable = tinystories._writable
    monkeypatch.setattr(tinystories, "_writable",
                        lambda folder: not folder.resolve().is_relative_to(text_dir) and real_writable(folder))
    tokens = load_tinystories_tokens("train", data_dir, tokenizer="byte")
    np.testing.assert_array_equal(tokens, expected_byte_tokens(STORIES))
    folder = tinystories.fallback_cache_dir(text_dir / "TinyStories-train.txt", "byte")
    assert folder.is_relative_to(cache_root) and (folder / "train.bin").exists()
    assert not (data_dir / "tinystories" / "byte").exists()
    assert f"goes to {folder}" in capsys.readouterr().err
    # the second load finds it there and says nothing
    load_tinystories_tokens("train", data_dir, tokenizer="byte")
    assert capsys.readouterr().err == ""


def test_cache_files_follow_the_umask(data_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        load_tinystories_tokens("train", data_dir, tokenizer="byte")
    finally:
        os.umask(old)
    for name in ("train.bin", "train.json"):
        assert (data_dir / "tinystories" / "byte" / name).stat().st_mode & 0o777 == 0o644, name
