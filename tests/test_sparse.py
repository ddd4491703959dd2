"""agentless.sparse.is_zero: every length, a single set bit anywhere, views and copies."""

from __future__ import annotations

import random

import pytest

from agentless.sparse import is_zero


@pytest.mark.parametrize("length", [0, 1, 7, 8, 4095, 65536, (1 << 20) - 1, 1 << 20, (3 << 20) + 5])
def test_is_zero(length: int) -> None:
    buf = bytearray(length)
    assert is_zero(buf) and is_zero(bytes(buf)) and is_zero(memoryview(buf))
    rng = random.Random(length)
    for position in {0, length // 2, length - 1, rng.randrange(max(1, length))}:
        if 0 <= position < length:
            buf[position] = 1 << rng.randrange(8)
            assert not is_zero(buf) and not is_zero(memoryview(buf)[position:])
            assert is_zero(memoryview(buf)[position + 1 :])
            buf[position] = 0
