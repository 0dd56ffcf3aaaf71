"""Hashcash-style proof of work that makes mass registration costly.

A solution is a nonce such that SHA-256(challenge || SHA-256(key) || nonce as 8
little-endian bytes) starts with ``difficulty_bits`` zero bits. Binding the key's
hash into the puzzle stops one solution from registering many keys.
"""

from __future__ import annotations

import hashlib
import itertools


def key_hash(api_key: str) -> bytes:
    """SHA-256 of a worker key: the only form of it the server stores."""
    return hashlib.sha256(api_key.encode("ascii")).digest()


def _leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def check(challenge: bytes, api_key: str, nonce: int, difficulty_bits: int) -> bool:
    """True when ``nonce`` solves the challenge for this key."""
    if difficulty_bits <= 0:
        return True
    if not 0 <= nonce < 2**64:
        return False
    prefix = challenge + key_hash(api_key)
    digest = hashlib.sha256(prefix + nonce.to_bytes(8, "little")).digest()
    return _leading_zero_bits(digest) >= difficulty_bits


def solve(challenge: bytes, api_key: str, difficulty_bits: int) -> int:
    """The smallest nonce that solves the challenge; about 2**difficulty_bits tries."""
    if difficulty_bits <= 0:
        return 0
    base = challenge + key_hash(api_key)
    for nonce in itertools.count():
        digest = hashlib.sha256(base + nonce.to_bytes(8, "little")).digest()
        if _leading_zero_bits(digest) >= difficulty_bits:
            return nonce
    raise AssertionError("unreachable")
