"""Sealed blobs and metadata whose bytes check but whose content is hostile: refused as
CorruptError, never an exception of another kind (cases the fault campaign's fuzzing
found, docs/reliability.md)."""

from __future__ import annotations

import json
import struct

import pytest
import zstandard

from agentless.backup.keys import CorruptError, Keys, check_key_file, make_key_file

_ZSTD_MAGIC = bytes([0x28, 0xB5, 0x2F, 0xFD])


def _frame_declaring(size: int) -> bytes:
    """A zstd frame header that declares *size* bytes of content (single segment, 8-byte
    content size), followed by one empty raw block."""
    return _ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", size) + bytes([0x01, 0x00, 0x00])


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_blob_declaring_a_huge_size_is_corrupt_not_a_memory_error(encrypted: bool) -> None:
    keys = Keys.generate() if encrypted else Keys()
    blob_id = keys.blob_id(b"anything")
    body = bytes([1]) + _frame_declaring(1 << 40)  # flag 1: zstd
    if encrypted:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        assert keys.data_key is not None
        sealed = bytes(12) + AESGCM(keys.data_key).encrypt(bytes(12), body, blob_id)
    else:
        sealed = body
    with pytest.raises(CorruptError, match="does not decompress"):
        keys.open(sealed, blob_id, "data/00/pack")


def test_metadata_declaring_a_huge_size_or_nested_too_deep_is_corrupt() -> None:
    keys = Keys()
    name = "points/0123456789abcdef"
    head = b"AGVBPOIN" + bytes([2, len(name)]) + name.encode()
    deep = zstandard.ZstdCompressor().compress(b"[" * 100_000 + b"]" * 100_000)
    for body in (_frame_declaring(1 << 40), deep):
        data = head + body + keys.digest(head + body)
        with pytest.raises(CorruptError, match="malformed"):
            keys.open_meta(b"AGVBPOIN", data, name)


def test_a_key_file_nested_too_deep_is_corrupt() -> None:
    with pytest.raises(CorruptError, match="malformed key file"):
        check_key_file(b"[" * 100_000 + b"]" * 100_000, "keys/x")
    good = json.loads(make_key_file(Keys.generate(), "pw", "repo-id"))
    good["kdf"] = [[[]]] * 3
    with pytest.raises(CorruptError):
        check_key_file(json.dumps(good).encode(), "keys/x")
