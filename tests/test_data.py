"""Ingestion into the token file, batch planning and reading batches back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dragon_server.data import (
    TOKEN_FILE,
    BatchRange,
    TokenData,
    default_sources,
    ingest,
    plan_batches,
)
from dragon_server.errors import DataError
from forge.tokenizer import EOS_ID


def _ids(text: str) -> list[int]:
    return [*text.encode("utf-8"), EOS_ID]


def _written(data_dir: Path, row: int) -> list[list[int]]:
    raw = np.fromfile(data_dir / TOKEN_FILE, dtype="<u2")
    return raw.reshape(-1, row).tolist()  # type: ignore[no-any-return]


def _ingest(sources: list[Path], data_dir: Path, length: int) -> tuple[int, int]:
    return ingest(sources, data_dir, sequence_length=length, progress=False)


def test_text_is_packed_into_exact_rows_and_the_tail_dropped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cdefg")
    data = tmp_path / "data"

    documents, rows = _ingest([tmp_path / "a.txt", tmp_path / "b.txt"], data, 3)

    stream = _ids("ab") + _ids("cdefg")  # 9 ids: two rows of 4, one id dropped
    assert (documents, rows) == (2, 2)
    assert _written(data, 4) == [stream[0:4], stream[4:8]]


def test_a_folder_is_walked_recursively_in_name_order(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("B")
    (corpus / "a.txt").write_text("A")
    (corpus / "sub" / "c.txt").write_text("C")
    (corpus / ".hidden").write_text("H")
    (corpus / "sub" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    data = tmp_path / "data"

    documents, rows = _ingest([corpus], data, 1)

    assert (documents, rows) == (3, 3)
    assert _written(data, 2) == [_ids("A"), _ids("B"), _ids("C")]


def _jsonl(records: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("docs.jsonl", lambda raw: raw),
        ("docs.jsonl.gz", gzip.compress),
        ("docs.jsonl.zst", lambda raw: zstandard.ZstdCompressor().compress(raw)),
    ],
    ids=["plain", "gzip", "zstd"],
)
def test_json_lines_give_one_document_per_record(
    tmp_path: Path, name: str, pack: object
) -> None:
    raw = _jsonl([{"text": "héllo"}, {"text": "x", "id": 7}]) + b"\n"
    assert callable(pack)
    (tmp_path / name).write_bytes(pack(raw))
    data = tmp_path / "data"

    documents, rows = _ingest([tmp_path / name], data, 3)

    stream = _ids("héllo") + _ids("x")  # 7 + 2 ids
    assert (documents, rows) == (2, 2)
    assert _written(data, 4) == [stream[0:4], stream[4:8]]


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("notes.txt.gz", gzip.compress),
        ("notes.txt.zst", lambda raw: zstandard.ZstdCompressor().compress(raw)),
    ],
    ids=["gzip", "zstd"],
)
def test_compressed_text_is_one_document(
    tmp_path: Path, name: str, pack: object
) -> None:
    assert callable(pack)
    (tmp_path / name).write_bytes(pack(b"abcdefg"))
    data = tmp_path / "data"

    assert _ingest([tmp_path / name], data, 3) == (1, 2)
    assert _written(data, 4) == [_ids("abcdefg")[:4], _ids("abcdefg")[4:8]]


def test_the_corpus_cap_cuts_the_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdef")
    (tmp_path / "b.txt").write_text("ghij")
    data = tmp_path / "data"

    documents, rows = ingest(
        [tmp_path], data, sequence_length=2, max_corpus_bytes=5, progress=False
    )

    assert (documents, rows) == (1, 2)
    assert _written(data, 3) == [_ids("abcde")[:3], _ids("abcde")[3:6]]


def test_the_default_corpus_is_the_standard_library(tmp_path: Path) -> None:
    [stdlib] = default_sources()
    assert (stdlib / "os.py").is_file()
    data = tmp_path / "data"

    documents, rows = ingest(
        [stdlib],
        data,
        sequence_length=63,
        max_corpus_bytes=200_000,
        python_only=True,
        progress=False,
    )

    assert documents >= 2
    # 200000 bytes of text plus one EOS id per document, cut into rows of 64.
    assert rows == (200_000 + documents) // 64
    first = bytes(_written(data, 64)[0]).decode("ascii", errors="replace")
    assert first.isprintable() or "\n" in first


def _bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    return path


def _not_json(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": \n')
    return path


def _bad_gzip(tmp_path: Path) -> Path:
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(b"this is not gzip at all")
    return path


def _bad_zstd(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n')[:-3])
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.txt"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_jsonl, r"bad\.jsonl:2: a record needs a string \"text\" field"),
        (_not_json, r"bad\.jsonl:3: not JSON"),
        (_bad_gzip, r"bad\.txt\.gz: cannot read"),
        (_bad_zstd, r"bad\.jsonl\.zst: cannot read"),
        (_missing, r"nowhere\.txt: no such file or folder"),
    ],
    ids=[
        "jsonl-without-text",
        "jsonl-not-json",
        "bad-gzip",
        "truncated-zstd",
        "missing",
    ],
)
def test_bad_input_raises_data_error_and_writes_nothing(
    tmp_path: Path, make: object, message: str
) -> None:
    assert callable(make)
    good = tmp_path / "good.txt"
    good.write_text("some good text before the bad file " * 10)
    data = tmp_path / "data"

    with pytest.raises(DataError, match=message):
        _ingest([good, make(tmp_path)], data, 3)

    assert not data.exists() or list(data.iterdir()) == []


def test_validation_blocks_are_seeded_and_disjoint_from_train() -> None:
    batches = plan_batches(103, 10, 0.25, seed=7)

    train = [b for b in batches if b.split == "train"]
    held = [b for b in batches if b.split == "validation"]
    rows = [set(range(b.first_sequence, b.first_sequence + b.count)) for b in batches]
    assert sum(len(r) for r in rows) == 103
    assert len(set().union(*rows)) == 103  # every row once: no overlap
    assert len(train) == 7
    # ceil(0.25 * 10) whole blocks plus the 3-row tail.
    assert sorted(b.count for b in held) == [3, 10, 10, 10]
    assert all(b.count == 10 for b in train)
    assert plan_batches(103, 10, 0.25, seed=7) == batches
    splits = {tuple(b.split for b in plan_batches(103, 10, 0.25, s)) for s in range(8)}
    assert len(splits) > 1  # the seed picks the blocks


def test_a_corpus_of_one_block_holds_back_only_the_tail() -> None:
    batches = plan_batches(15, 10, 0.1, seed=0)
    assert batches == [
        BatchRange(0, 0, 10, "train"),
        BatchRange(1, 10, 5, "validation"),
    ]


def test_too_small_a_corpus_is_refused() -> None:
    with pytest.raises(DataError, match="too few for one train batch"):
        plan_batches(9, 10, 0.1, seed=0)


def test_token_data_reads_batches_and_validation_rows(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(4 * 8 - 1))
    (tmp_path / "a.txt").write_text(text)
    data = tmp_path / "data"
    _ingest([tmp_path / "a.txt"], data, 7)
    tokens = TokenData(data, 7)

    expected = np.array(_ids(text), dtype=np.uint16).reshape(4, 8)
    assert len(tokens) == 4
    batch = tokens.batch(1, 2)
    assert batch.dtype == np.uint16
    assert batch.shape == (2, 8)
    np.testing.assert_array_equal(batch, expected[1:3])

    ranges = [BatchRange(5, 3, 1, "validation"), BatchRange(6, 0, 2, "validation")]
    held = tokens.sequences(ranges, limit=2)
    assert held.dtype.is_floating_point is False
    assert held.tolist() == [expected[3].tolist(), expected[0].tolist()]

    with pytest.raises(DataError, match="outside the token file"):
        tokens.batch(3, 2)
