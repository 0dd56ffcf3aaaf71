"""The byte-level tokenizer both ends use.

Token ids 0-255 are the UTF-8 bytes of the text; 256 ends a document. Bytes need
no vocabulary file, cover every text and keep the model's embedding small, which
suits CPU volunteers; a learned vocabulary can replace this behind the same API.
"""

from __future__ import annotations

from collections.abc import Iterable

BYTE_VOCAB = 256
EOS_ID = 256
VOCAB_SIZE = 257


def encode(text: str) -> list[int]:
    """Token ids of ``text``, without the end-of-document id."""
    return list(text.encode("utf-8"))


def encode_document(text: str) -> list[int]:
    """Token ids of one document, closed by :data:`EOS_ID`."""
    return [*text.encode("utf-8"), EOS_ID]


def decode(ids: Iterable[int]) -> str:
    """Text of ``ids``; ids past the byte range end a document and become newlines."""
    data = bytearray()
    for token in ids:
        data += bytes([token]) if token < BYTE_VOCAB else b"\n"
    return data.decode("utf-8", errors="replace")
