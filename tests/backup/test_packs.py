"""Pack trailers that check but hold hostile entries: CorruptError, never an
OverflowError or a location the storage would be asked for (found by the fault
campaign's fuzzing, docs/reliability.md)."""

from __future__ import annotations

import pytest

from agentless.backup.keys import CorruptError, Keys
from agentless.backup.packs import PackBuilder, pack_name, parse_entry, read_trailer

_ID = "ab" * 32


def _pack_with_trailer(keys: Keys, entries: object) -> tuple[str, bytes]:
    """A pack whose trailer (sealed by the keys, so it checks) holds *entries*."""
    builder = PackBuilder(keys)
    builder.add(bytes.fromhex(_ID), "data", b"\x00blob", 4)
    _, data, _ = builder.finish()
    tail = int.from_bytes(data[-12:-8], "little")
    trailer = keys.seal_meta(b"AGVBPTRL", entries, "")
    data = data[: len(data) - 12 - tail] + trailer + len(trailer).to_bytes(4, "little") + data[-8:]
    return pack_name(keys, data), data


@pytest.mark.parametrize(
    "entry",
    [
        [_ID, "data", float("inf"), 5, 4],  # 1e999 in the JSON: int() raised OverflowError
        [_ID, "data", 20, -(2**63), 4],  # a negative length reached the storage's get_range
        [_ID, "data", 20, 0, 4],
        [_ID[:-2], "data", 20, 5, 4],
        [_ID, 7, 20, 5, 4],
        [_ID, "data", 20.5, 5, 4],
        [_ID, "data", 20, 5],
    ],
)
def test_a_trailer_entry_that_is_not_a_location_is_corrupt(entry: list[object]) -> None:
    keys = Keys()
    name, data = _pack_with_trailer(keys, [entry])
    with pytest.raises(CorruptError, match="malformed pack trailer"):
        read_trailer(keys, name, data)
    with pytest.raises((ValueError, TypeError)):
        parse_entry(name, entry)


def test_a_sound_entry_is_parsed() -> None:
    blob, where = parse_entry("data/ab/x", [_ID, "tree", 25, 5, 4])
    assert blob == bytes.fromhex(_ID)
    assert (where.offset, where.length, where.kind, where.raw_length) == (25, 5, "tree", 4)
