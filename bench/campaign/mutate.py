"""Seeded mutations of bytes, the generic half of structure-aware fuzzing.

The targets know their formats: they pick fields and set them to values a parser is
likely to get wrong (:func:`interesting`), re-seal what a checksum would otherwise
reject at the first byte, and call :func:`havoc` for a few blind byte edits on top –
the mix that reaches deep code (a structure that checks) and its edges (one that
almost does).
"""

from __future__ import annotations

import random

__all__ = ["havoc", "interesting", "put_int"]

_EDGES = (0, 1, 2, 7, 8, 15, 16, 255, 256, 511, 512, 513, 4095, 4096, 65535, 65536)


def interesting(rng: random.Random, bits: int, near: tuple[int, ...] = ()) -> int:
    """A value of *bits* bits a parser may mishandle: 0, the top, powers of two and one
    either side, small counts, a value *near* the given ones, or random."""
    top = (1 << bits) - 1
    pick = rng.randrange(8)
    if pick == 0:
        return rng.choice((0, top, top >> 1, (top >> 1) + 1, top - 1))
    if pick == 1:
        return rng.choice(_EDGES) & top
    if pick == 2:
        return ((1 << rng.randrange(bits)) + rng.choice((-1, 0, 1))) & top
    if pick in (3, 4) and near:
        return (rng.choice(near) + rng.choice((-512, -1, 0, 1, 512, 4096, 1 << 20))) & top
    if pick == 5:
        return rng.randrange(256)
    return rng.getrandbits(bits)


def put_int(buf: bytearray, offset: int, size: int, value: int, big: bool = True) -> None:
    """Store *value* in *size* bytes at *offset* (ignored if it does not fit)."""
    if offset >= 0 and offset + size <= len(buf):
        buf[offset : offset + size] = value.to_bytes(size, "big" if big else "little")


def havoc(buf: bytearray, rng: random.Random, edits: int) -> bytearray:
    """*edits* blind edits of *buf* in place: bit flips, byte values, interesting integers,
    inserted, deleted, duplicated or truncated runs."""
    for _ in range(edits):
        n = len(buf)
        kind = rng.randrange(9)
        if not n and kind < 7:
            kind = 7
        if kind == 0:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif kind == 2:
            size = rng.choice((2, 4, 8))
            if n >= size:
                at = rng.randrange(n - size + 1)
                put_int(buf, at, size, interesting(rng, 8 * size), rng.random() < 0.7)
        elif kind == 3:
            at = rng.randrange(n)
            del buf[at : at + rng.choice((1, 2, 4, 8, rng.randrange(1, 64)))]
        elif kind == 4:
            at, size = rng.randrange(n), rng.randrange(1, 32)
            buf[at:at] = buf[at : at + size]
        elif kind == 5:
            del buf[rng.randrange(n) :]
        elif kind == 6:
            at = rng.randrange(n)
            run = rng.randrange(1, 16)
            buf[at : at + run] = bytes([rng.randrange(256)]) * run
        elif kind == 7:
            at = rng.randrange(n + 1)
            buf[at:at] = rng.randbytes(rng.choice((1, 4, 8, rng.randrange(1, 128))))
        else:
            if n >= 2:
                a, b = rng.randrange(n), rng.randrange(n)
                size = rng.randrange(1, 16)
                chunk = bytes(buf[a : a + size])
                buf[b : b + len(chunk)] = chunk
    return buf
