"""Protobuf wire-format builders for decoder tests: exact bytes, so a message can have any field order,
duplicates, unknown fields or lies that protobuf itself would never write."""

from __future__ import annotations

import struct


def varint(n: int) -> bytes:
    """Base-128 varint; a negative n is written as its 64-bit two's complement (10 bytes), as protobuf does.
    n >= 2**64 gives an over-long varint, which decoders must refuse."""
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field."""
    raw = payload.encode() if isinstance(payload, str) else payload
    return tag(field, 2) + varint(len(raw)) + raw


def vi(field: int, n: int) -> bytes:
    return tag(field, 0) + varint(n)


def fx64(field: int, n: int) -> bytes:
    return tag(field, 1) + struct.pack("<Q", n)
