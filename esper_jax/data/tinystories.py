"""TinyStories: tokenizers, the cached uint16 token files, and the training windows.

The official text files (``TinyStories-{train,valid}.txt`` or
``TinyStoriesV2-GPT4-{train,valid}.txt``, stories separated by
``<|endoftext|>``) live in ``<data dir>/tinystories/`` or directly in the data
directory. They are tokenized once into ``<data dir>/tinystories/<tokenizer>/
<split>.bin`` (raw little-endian uint16, every story followed by the
tokenizer's end-of-text id) with a ``<split>.json`` beside it that records the
source file's size and mtime, the tokenizer, vocabulary size and end-of-text
id. The cache is trusted only when that record matches; it is rebuilt when the
source changes. Both files are written to temporary names and renamed into
place, and the record is removed before the token file is replaced, so an
interrupted build never leaves a token file that is later trusted.

Tokenizers never touch the network: GPT-2's BPE files must already sit in
tiktoken's cache (``$TIKTOKEN_CACHE_DIR``), checked before tiktoken is called,
since tiktoken would otherwise try to fetch them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import numpy as np

from esper_jax.data.datasets import (
    CorruptDatasetError,
    DatasetNotFoundError,
    TokenDataset,
    TokenizerUnavailableError,
)
from esper_jax.data.paths import PathLike, data_dir_help, resolve_data_dir

TokenSplit = Literal["train", "valid"]
TokenizerName = Literal["gpt2", "byte"]

STORY_SEPARATOR = "<|endoftext|>"
TINYSTORIES_SUBDIR = "tinystories"
SOURCE_FILE_PATTERNS = ("TinyStories-{split}.txt", "TinyStoriesV2-GPT4-{split}.txt")
CACHE_FORMAT_VERSION = 1
_SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid"}
_READ_CHUNK_CHARS = 4 << 20
_STORIES_PER_BATCH = 4096


# --------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the token cache needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int

    def encode_stories(self, stories: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each story, without the end-of-text id."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of a token sequence (end-of-text ids rendered as ``<|endoftext|>``)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 and end-of-text as 256: needs no files at all."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_stories(self, stories: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(story) for story in stories]

    def decode(self, tokens: Sequence[int]) -> str:
        pieces: list[str] = []
        pending = bytearray()
        for token in tokens:
            if int(token) == self.eot_id:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pieces.append(STORY_SEPARATOR)
                pending.clear()
            else:
                pending.append(int(token))
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)


# tiktoken_ext.openai_public.gpt2 fetches these two files, verified by sha256;
# its cache stores each under the sha1 of its URL.
GPT2_BPE_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": (
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    ),
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": (
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    ),
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken reads cached files from (same rule as tiktoken.load), or None if disabled."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        configured = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        configured = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        configured = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(configured) if configured else None


def gpt2_cache_problems() -> list[str]:
    """Why tiktoken could not load GPT-2 offline right now; empty when the cache is complete and valid."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        return ["TIKTOKEN_CACHE_DIR is set to the empty string, which disables tiktoken's cache"]
    problems = []
    for url, sha256 in GPT2_BPE_FILES.items():
        cached = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        if not cached.is_file():
            problems.append(f"missing {cached} (a copy of {url})")
        elif hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            # tiktoken would delete a mismatching file and re-download it
            problems.append(f"{cached} does not match the sha256 of {url}")
    return problems


def _gpt2_unavailable_message(problems: list[str]) -> str:
    cache_dir = tiktoken_cache_dir()
    names = "\n".join(
        f"  {hashlib.sha1(url.encode()).hexdigest()}  <- {url}" for url in GPT2_BPE_FILES
    )
    return (
        "tiktoken's GPT-2 encoding is not available offline:\n  - "
        + "\n  - ".join(problems)
        + f"\ntiktoken reads its files from $TIKTOKEN_CACHE_DIR (now: {cache_dir}). On a machine with network, "
        "run `TIKTOKEN_CACHE_DIR=/some/dir python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` and copy "
        "that folder here, then set TIKTOKEN_CACHE_DIR to it. The cached file names are the sha1 of the URLs:\n"
        f"{names}\n"
        "Or use the byte tokenizer, which needs no files: --tokenizer=byte."
    )


class TiktokenGPT2Tokenizer:
    """GPT-2 BPE through tiktoken (vocab 50257, end-of-text 50256), loaded only from the local cache."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_EOT_ID

    def __init__(self) -> None:
        problems = gpt2_cache_problems()
        if problems:
            raise TokenizerUnavailableError(_gpt2_unavailable_message(problems))
        try:
            import tiktoken
        except ImportError as exc:
            raise TokenizerUnavailableError(
                "the gpt2 tokenizer needs the tiktoken package (pip install tiktoken); or use --tokenizer=byte"
            ) from exc
        try:
            self._encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # the cache was checked, so any failure here is unexpected: report it plainly
            raise TokenizerUnavailableError(
                f"tiktoken failed to load gpt2 from {tiktoken_cache_dir()} ({type(exc).__name__}: {exc}); "
                "use --tokenizer=byte to avoid it"
            ) from exc
        if self._encoding.n_vocab != self.vocab_size or self._encoding.eot_token != self.eot_id:
            raise TokenizerUnavailableError(
                f"tiktoken's gpt2 has vocab {self._encoding.n_vocab} / eot {self._encoding.eot_token}, "
                f"expected {self.vocab_size} / {self.eot_id}"
            )

    def encode_stories(self, stories: Sequence[str]) -> list[np.ndarray]:
        # encode_ordinary: a literal "<|endoftext|>" inside a story must not become the special id
        encoded = self._encoding.encode_ordinary_batch(list(stories))
        return [np.asarray(tokens, dtype=np.uint16) for tokens in encoded]

    def decode(self, tokens: Sequence[int]) -> str:
        return self._encoding.decode([int(t) for t in tokens])


def get_tokenizer(name: str) -> Tokenizer:
    """``"byte"`` or ``"gpt2"``; gpt2 raises TokenizerUnavailableError at once if its files are not cached."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenGPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'byte'")


def tokenizer_vocab(name: str) -> tuple[int, int]:
    """(vocab_size, eot_id) of a tokenizer without loading its files."""
    if name == "byte":
        return ByteTokenizer.vocab_size, ByteTokenizer.eot_id
    if name == "gpt2":
        return GPT2_VOCAB_SIZE, GPT2_EOT_ID
    raise ValueError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'byte'")


# --------------------------------------------------------------------------- source text


def canonical_split(split: str) -> TokenSplit:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"unknown TinyStories split {split!r}; expected 'train' or 'valid'")
    return _SPLIT_ALIASES[split]  # type: ignore[return-value]


def find_tinystories_text(split: str, data_dir: PathLike | None = None) -> Path:
    """The source text file for ``split``; DatasetNotFoundError says where to put it if absent."""
    split = canonical_split(split)
    root = resolve_data_dir(data_dir)
    folders = (root / TINYSTORIES_SUBDIR, root)
    for pattern in SOURCE_FILE_PATTERNS:
        for folder in folders:
            candidate = folder / pattern.format(split=split)
            if candidate.is_file():
                return candidate
    names = " or ".join(pattern.format(split=split) for pattern in SOURCE_FILE_PATTERNS)
    raise DatasetNotFoundError(
        f"TinyStories {split} text was not found. Put {names} into {root / TINYSTORIES_SUBDIR}{os.sep} "
        f"(or directly into {root}{os.sep}); the files are on the Hugging Face hub under roneneldan/TinyStories.\n"
        f"{data_dir_help(data_dir)}\n"
        "The tokenized cache is then built there once, under tinystories/<tokenizer>/.\n"
        "For an offline run without the real data, pass --data=synthetic (clearly labelled synthetic data)."
    )


def iter_stories(path: Path) -> Iterator[str]:
    """Stories of a TinyStories text file, stripped, empty ones dropped, read in bounded memory.

    The file must be UTF-8 text: a byte that does not decode becomes U+FFFD, and a file where more
    than :data:`MAX_UNDECODABLE_FRACTION` of the bytes read so far do not decode (random bytes, a
    binary file, another encoding) is refused, naming the first such byte's offset."""
    pending = ""
    decoder = _Utf8Reader(path)
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK_CHARS):
                pieces = (pending + decoder.decode(chunk, final=False)).split(STORY_SEPARATOR)
                pending = pieces.pop()  # may be the start of a story (or separator) cut by the chunk edge
                for story in pieces:
                    if story := story.strip():
                        yield story
            pending += decoder.decode(b"", final=True)
    except OSError as exc:
        raise CorruptDatasetError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if pending := pending.strip():
        yield pending


# Real TinyStories text is UTF-8 throughout; a few stray bytes are tolerated (and read as U+FFFD),
# more than this fraction means the file is not the text it claims to be.
MAX_UNDECODABLE_FRACTION = 1e-3


class _Utf8Reader:
    """Incremental UTF-8 decoding that counts the bytes that do not decode and refuses a file
    where they are more than a small fraction."""

    def __init__(self, path: Path):
        self.path = path
        self.consumed = 0          # bytes decoded so far (not counting a held-back partial character)
        self.undecodable = 0
        self.first_offset: int | None = None
        self._held = b""           # the start of a character cut by the chunk edge

    def decode(self, chunk: bytes, final: bool) -> str:
        data, self._held = self._held + chunk, b""
        base, pos, parts = self.consumed, 0, []
        while pos < len(data):
            try:
                parts.append(data[pos:].decode("utf-8"))
                pos = len(data)
            except UnicodeDecodeError as error:
                parts.append(data[pos:pos + error.start].decode("utf-8"))
                if not final and error.reason == "unexpected end of data":
                    self._held = data[pos + error.start:]  # completed by the next chunk
                    pos = len(data)
                    break
                if self.first_offset is None:
                    self.first_offset = base + pos + error.start
                self.undecodable += error.end - error.start
                parts.append("\ufffd")
                pos += error.end
        self.consumed = base + len(data) - len(self._held)
        if self.undecodable > MAX_UNDECODABLE_FRACTION * max(self.consumed, 1000):
            raise CorruptDatasetError(
                f"{self.path}: not UTF-8 text ({self.undecodable} of the first {self.consumed} bytes do not decode, "
                f"the first at byte offset {self.first_offset}); TinyStories files are UTF-8 text with stories "
                f"separated by {STORY_SEPARATOR}")
        return "".join(parts)


# --------------------------------------------------------------------------- token cache


def token_cache_paths(split: str, tokenizer_name: str, data_dir: PathLike | None = None) -> tuple[Path, Path]:
    """(token file, metadata file) of the cache for ``split`` tokenized with ``tokenizer_name``."""
    folder = resolve_data_dir(data_dir) / TINYSTORIES_SUBDIR / tokenizer_name
    split = canonical_split(split)
    return folder / f"{split}.bin", folder / f"{split}.json"


def _source_fingerprint(source: Path) -> dict[str, object]:
    stat = source.stat()
    return {"source": str(source), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def _expected_metadata(source: Path, tokenizer_name: str, vocab_size: int, eot_id: int) -> dict[str, object]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        **_source_fingerprint(source),
        "tokenizer": tokenizer_name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "dtype": "uint16",
    }


def _cache_is_valid(tokens_path: Path, meta_path: Path, expected: dict[str, object]) -> bool:
    try:
        recorded = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if any(recorded.get(key) != value for key, value in expected.items()):
        return False
    try:
        return tokens_path.stat().st_size == 2 * int(recorded["num_tokens"]) > 0
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _atomic_write_bytes(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(handle)`` to a temporary file, fsync, then rename over ``target``.
    The file gets the mode the umask gives a new file (``mkstemp`` would leave it 0600, unreadable
    to the other users of a shared data directory)."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.chmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    finally:
        Path(temp_name).unlink(missing_ok=True)


def build_token_cache(source: Path, tokenizer: Tokenizer, tokens_path: Path, meta_path: Path) -> int:
    """Tokenize ``source`` into ``tokens_path`` (each story followed by eot); returns the token count."""
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{tokenizer.name}: vocab {tokenizer.vocab_size} does not fit uint16 tokens")
    expected = _expected_metadata(source, tokenizer.name, tokenizer.vocab_size, tokenizer.eot_id)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # from here on the old token file is no longer vouched for
    eot = np.array([tokenizer.eot_id], dtype=np.uint16)
    num_tokens = 0

    def write_tokens(handle: BinaryIO) -> None:
        batch: list[str] = []

        def flush() -> None:
            nonlocal num_tokens
            pieces: list[np.ndarray] = []
            for story_tokens in tokenizer.encode_stories(batch):
                pieces.extend((story_tokens, eot))
            joined = np.concatenate(pieces).astype("<u2", copy=False)
            handle.write(joined.tobytes())
            num_tokens += joined.size
            batch.clear()

        for story in iter_stories(source):
            batch.append(story)
            if len(batch) >= _STORIES_PER_BATCH:
                flush()
        if batch:
            flush()

    _atomic_write_bytes(tokens_path, write_tokens)
    if num_tokens == 0:
        tokens_path.unlink(missing_ok=True)
        raise CorruptDatasetError(f"{source}: contains no stories (empty, or only separators)")
    if _source_fingerprint(source) != {k: expected[k] for k in ("source", "source_size", "source_mtime_ns")}:
        tokens_path.unlink(missing_ok=True)
        raise CorruptDatasetError(f"{source}: changed while it was being tokenized; run again")
    metadata = {**expected, "num_tokens": num_tokens}
    _atomic_write_bytes(meta_path, lambda handle: handle.write(json.dumps(metadata, indent=2).encode()))
    return num_tokens


def load_tinystories_tokens(
    split: str,
    data_dir: PathLike | None = None,
    tokenizer: TokenizerName = "gpt2",
) -> np.ndarray:
    """The tokens of one split as a read-only memory-mapped uint16 array, building the cache if needed.

    The cache is checked before the tokenizer is loaded, so a cached gpt2 split
    loads even where tiktoken's files are absent.
    """
    split = canonical_split(split)
    source = find_tinystories_text(split, data_dir)
    tokens_path, meta_path = token_cache_paths(split, tokenizer, data_dir)
    vocab_size, eot_id = tokenizer_vocab(tokenizer)
    expected = _expected_metadata(source, tokenizer, vocab_size, eot_id)
    if not _cache_is_valid(tokens_path, meta_path, expected) and not _writable(tokens_path.parent):
        # A read-only data directory (a shared mount): the cache goes where this user can write.
        folder = fallback_cache_dir(source, tokenizer)
        tokens_path, meta_path = folder / tokens_path.name, folder / meta_path.name
        if not _cache_is_valid(tokens_path, meta_path, expected):
            if not _writable(folder):
                raise CorruptDatasetError(
                    f"cannot write the tokenized cache of {source}: neither its data directory nor {folder} is "
                    f"writable; set {CACHE_ENV_VAR} to a writable directory")
            print(f"note: {source.parent} is not writable; the tokenized cache of {source.name} goes to {folder} "
                  f"(set {CACHE_ENV_VAR} to choose another place)", file=sys.stderr)
    if not _cache_is_valid(tokens_path, meta_path, expected):
        build_token_cache(source, get_tokenizer(tokenizer), tokens_path, meta_path)
    return np.memmap(tokens_path, dtype="<u2", mode="r")


CACHE_ENV_VAR = "ESPER_JAX_CACHE"


def fallback_cache_dir(source: Path, tokenizer_name: str) -> Path:
    """Where the token cache of ``source`` goes when its data directory is not writable:
    ``$ESPER_JAX_CACHE`` (else ``$XDG_CACHE_HOME/esper-jax``, else ``~/.cache/esper-jax``), under a
    folder named after the text's directory, so two datasets never share a cache."""
    root = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "esper-jax")
    digest = hashlib.sha1(str(source.resolve().parent).encode()).hexdigest()[:12]
    return Path(root) / TINYSTORIES_SUBDIR / digest / tokenizer_name


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (or, if it does not exist yet, where it would be)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def load_tinystories_dataset(data_dir: PathLike | None = None, tokenizer: TokenizerName = "gpt2") -> TokenDataset:
    """Both splits of TinyStories as a :class:`TokenDataset` (memory-mapped)."""
    train_tokens = load_tinystories_tokens("train", data_dir, tokenizer)
    val_tokens = load_tinystories_tokens("valid", data_dir, tokenizer)
    vocab_size, eot_id = tokenizer_vocab(tokenizer)
    return TokenDataset(
        name="tinystories",
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        vocab_size=vocab_size,
        eot_id=eot_id,
        tokenizer=tokenizer,
        source=str(find_tinystories_text("train", data_dir)),
        synthetic=False,
    )


# --------------------------------------------------------------------------- training windows


def token_windows(
    tokens: np.ndarray,
    block_size: int,
    *,
    stride: int | None = None,
    max_windows: int | None = None,
) -> np.ndarray:
    """Cut ``tokens`` into ``[N, block_size + 1]`` windows: ``w[:, :-1]`` are inputs, ``w[:, 1:]`` targets.

    Windows start at 0, stride, 2*stride, ... (stride defaults to block_size, so
    consecutive windows share one token: each token is a target exactly once).
    Deterministic; the trailing tokens that do not fill a window are dropped.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    stride = block_size if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    count = 0 if len(tokens) < block_size + 1 else (len(tokens) - block_size - 1) // stride + 1
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count, dtype=np.int64) * stride
    return np.asarray(tokens)[starts[:, None] + np.arange(block_size + 1)[None, :]]
