"""The run's dataset: ingestion into one token file, and batches read back from it.

Sources are text files, folders of them (walked recursively, in name order) and
JSON Lines files with a ``text`` field, each optionally ``.gz`` or ``.zst``.
Documents are tokenized with :func:`forge.tokenizer.encode_document` and the
token stream is cut into rows of ``sequence_length + 1`` ids (the inputs and the
shifted targets overlap), written incrementally to ``data/tokens.u16``: uint16,
row-major, little-endian. The tail that does not fill a row is dropped.

Rows are grouped into blocks of ``sequences_per_batch``; a seeded permutation picks
``validation_fraction`` of the blocks (at least one) as the validation split, plus
the short block left at the end. Every other block is a train batch.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import sqlite3
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import numpy.typing as npt
import torch
import zstandard
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from dragon_server.errors import DataError
from forge.tokenizer import encode_document

logger = logging.getLogger(__name__)

DATA_DIR = "data"
TOKEN_FILE = "tokens.u16"
TOKEN_DTYPE = np.dtype("<u2")
# Tokens buffered before a write to the token file: 1 Mi ids = 2 MiB.
_FLUSH_TOKENS = 1 << 20


@dataclass(frozen=True)
class BatchRange:
    """A contiguous range of rows of the token file."""

    batch_id: int
    first_sequence: int
    count: int
    split: str  # "train" or "validation"


def default_sources() -> list[Path]:
    """The standard library folder of the running interpreter."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def _kind(path: Path) -> tuple[str, str]:
    """(format, compression) of a file: format "jsonl" or "text"."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = ""
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        compression = suffixes.pop()
    fmt = "jsonl" if suffixes and suffixes[-1] == ".jsonl" else "text"
    return fmt, compression


def _files(sources: Sequence[Path], *, only_python: bool) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            found = []
            for root, dirs, names in os.walk(source):
                # Hidden folders and installed packages are not the corpus.
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and d != "site-packages"
                )
                for name in names:
                    if name.startswith(".") or (
                        only_python and not name.endswith(".py")
                    ):
                        continue
                    found.append(Path(root) / name)
            files.extend(sorted(found))
        else:
            raise DataError(f"{source}: no such file or folder")
    return files


def _open_text(raw: IO[bytes], compression: str, stack: ExitStack) -> IO[str]:
    if compression == ".gz":
        # GzipFile is a binary file object; typeshed does not say it is an IO.
        unzipped = cast("IO[bytes]", gzip.GzipFile(fileobj=raw, mode="rb"))
        raw = stack.enter_context(unzipped)
    elif compression == ".zst":
        raw = stack.enter_context(io.BufferedReader(_ZstdReader(raw)))
    # Invalid UTF-8 is replaced rather than refused: one stray byte in a large
    # corpus should not stop ingestion.
    return stack.enter_context(
        io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    )


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file of one or more frames; a cut-off frame is an error.

    zstandard's own stream reader returns a truncated file's prefix silently.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._frame_started = False
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._frame_started and not self._frame.eof:
                    raise zstandard.ZstdError("the last frame is cut off")
                return 0
            self._feed(chunk)
        size = min(len(buffer), len(self._out))
        buffer[:size] = self._out[:size]
        self._out = self._out[size:]
        return size

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            self._frame_started = True
            self._out += self._frame.decompress(chunk)
            if not self._frame.eof:
                return
            chunk = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._frame_started = False


_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, UnicodeError)


def _documents(path: Path) -> Iterator[str]:
    """The documents of one file: the whole text, or one per JSON Lines record."""
    fmt, compression = _kind(path)
    with ExitStack() as stack:
        try:
            raw = stack.enter_context(path.open("rb"))
            handle = _open_text(raw, compression, stack)
            if fmt == "text":
                text = handle.read()
                # A NUL among the first bytes marks a binary file (an image, an
                # archive) that a folder of text happened to hold.
                if "\x00" in text[:8192]:
                    logger.info("skipping %s: binary, not text", path)
                    return
                yield text
                return
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield _jsonl_text(path, number, line)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot read: {exc}") from exc


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: not JSON: {exc.msg}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f'{path}:{number}: a record needs a string "text" field')
    text: str = record["text"]
    return text


class _RowWriter:
    """Appends tokens to the token file in whole rows of ``row`` ids."""

    def __init__(self, handle: IO[bytes], row: int) -> None:
        self._handle = handle
        self._row = row
        self._pending: list[npt.NDArray[np.uint16]] = []
        self._pending_count = 0
        self.rows = 0

    def add(self, tokens: list[int]) -> None:
        self._pending.append(np.asarray(tokens, dtype=TOKEN_DTYPE))
        self._pending_count += len(tokens)
        if self._pending_count >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        stream = np.concatenate(self._pending) if self._pending else np.empty(0)
        whole = len(stream) // self._row * self._row
        self._handle.write(stream[:whole].astype(TOKEN_DTYPE).tobytes())
        self.rows += whole // self._row
        rest = stream[whole:].astype(TOKEN_DTYPE)
        self._pending = [rest] if len(rest) else []
        self._pending_count = len(rest)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]ingesting"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[file]}"),
        disable=not enabled,
        transient=True,
    )


def ingest(
    sources: Sequence[Path],
    data_dir: Path,
    *,
    sequence_length: int,
    max_corpus_bytes: int = 0,
    python_only: bool = False,
    progress: bool = True,
) -> tuple[int, int]:
    """Tokenize ``sources`` into ``data_dir/tokens.u16``; returns (documents, rows).

    ``max_corpus_bytes`` caps the UTF-8 bytes of text taken (0: no cap); the
    document that crosses the cap is cut. On any error the token file is removed.
    """
    files = _files(sources, only_python=python_only)
    if not files:
        raise DataError(f"no files found in {', '.join(map(str, sources))}")
    data_dir.mkdir(parents=True, exist_ok=True)
    final = data_dir / TOKEN_FILE
    temp = data_dir / (TOKEN_FILE + ".tmp")
    try:
        documents, rows = _write_tokens(
            files, temp, sequence_length + 1, max_corpus_bytes, progress
        )
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    logger.info("ingested %d documents into %d sequences", documents, rows)
    return documents, rows


def _write_tokens(
    files: list[Path], temp: Path, row: int, cap: int, progress: bool
) -> tuple[int, int]:
    total = sum(path.stat().st_size for path in files)
    budget = cap if cap > 0 else math.inf
    documents = 0
    with open(temp, "wb") as handle, _progress(progress) as bar:
        task = bar.add_task("ingest", total=total, file="")
        writer = _RowWriter(handle, row)
        for path in files:
            bar.update(task, file=path.name)
            for text in _documents(path):
                data = text.encode("utf-8")
                if len(data) > budget:
                    data = data[: int(budget)]
                budget -= len(data)
                writer.add(encode_document(data.decode("utf-8", errors="ignore")))
                documents += 1
                if budget <= 0:
                    break
            bar.advance(task, path.stat().st_size)
            if budget <= 0:
                break
        writer.flush()
        handle.flush()
        os.fsync(handle.fileno())
    return documents, writer.rows


def plan_batches(
    rows: int, sequences_per_batch: int, validation_fraction: float, seed: int
) -> list[BatchRange]:
    """Cut ``rows`` into batches and choose the validation blocks by ``seed``."""
    blocks = rows // sequences_per_batch
    held = max(1, math.ceil(validation_fraction * blocks)) if blocks > 1 else 0
    if blocks - held < 1:
        raise DataError(
            f"the corpus gave {rows} sequences: too few for one train batch of "
            f"{sequences_per_batch} plus validation; add data or lower "
            "sequences_per_batch"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = set(torch.randperm(blocks, generator=generator)[:held].tolist())
    batches = [
        BatchRange(
            batch_id=index,
            first_sequence=index * sequences_per_batch,
            count=sequences_per_batch,
            split="validation" if index in chosen else "train",
        )
        for index in range(blocks)
    ]
    tail = rows - blocks * sequences_per_batch
    if tail:
        batches.append(
            BatchRange(blocks, blocks * sequences_per_batch, tail, "validation")
        )
    return batches


def record_batches(conn: sqlite3.Connection, batches: Sequence[BatchRange]) -> None:
    """Insert the batch rows (inside the caller's write transaction)."""
    conn.executemany(
        "INSERT INTO batches (id, first_sequence, count, split) VALUES (?, ?, ?, ?)",
        [(b.batch_id, b.first_sequence, b.count, b.split) for b in batches],
    )


class TokenData:
    """The token file, memory-mapped read-only as rows of ``sequence_length + 1``."""

    def __init__(self, data_dir: Path, sequence_length: int) -> None:
        path = data_dir / TOKEN_FILE
        row = sequence_length + 1
        size = path.stat().st_size
        if size % (row * TOKEN_DTYPE.itemsize):
            raise DataError(f"{path}: size {size} is not a whole number of rows")
        self.sequence_length = sequence_length
        self.rows: np.memmap[tuple[int, int], np.dtype[np.uint16]] = np.memmap(
            path, dtype=TOKEN_DTYPE, mode="r", shape=(size // (row * 2), row)
        )

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def batch(self, first_sequence: int, count: int) -> npt.NDArray[np.uint16]:
        """A copy of rows ``[first_sequence, first_sequence + count)``: [S, L + 1]."""
        if first_sequence < 0 or first_sequence + count > len(self):
            raise DataError(f"rows {first_sequence}+{count} are outside the token file")
        return np.array(self.rows[first_sequence : first_sequence + count])

    def sequences(self, ranges: Sequence[BatchRange], limit: int) -> torch.Tensor:
        """At most ``limit`` rows of ``ranges``, in order, as int64: [N, L + 1]."""
        parts: list[npt.NDArray[np.uint16]] = []
        left = limit
        for batch in ranges:
            if left <= 0:
                break
            take = min(left, batch.count)
            parts.append(self.batch(batch.first_sequence, take))
            left -= take
        if not parts:
            return torch.empty((0, self.sequence_length + 1), dtype=torch.int64)
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))
