"""The repository's keys and how every stored byte is sealed and checked.

An encrypted repository has one random 64-byte *master key* – a 32-byte AES-256-GCM key
for data and a 32-byte key for blob ids – kept in ``keys/<id>`` wrapped under a key
derived from the password with scrypt (as restic does; several key files may wrap the
same master key, one per password). An unencrypted repository has no key: blob ids are
plain hashes and the metadata carries a checksum instead of a GCM tag.

The repository's *hash* (its config says which) is BLAKE3 – keyed with the id key for
blob ids (a PRF, as HMAC is), plain for pack names and checksums – or, in repositories
made before BLAKE3 was adopted, SHA-256 (HMAC-SHA256 for keyed ids). BLAKE3 hashes a
64 KiB chunk about 4.5× faster than SHA-256 here (even with the CPU's SHA extensions),
and every chunk is hashed once when stored and once more whenever it is read back.

Blobs (chunks of disk data, index pages) are sealed one by one::

    id       = BLAKE3(plaintext, key=id_key)        (BLAKE3(plaintext) without encryption)
    sealed   = nonce(12) ‖ AES-256-GCM(flag ‖ body, aad = id)      (flag ‖ body without)
    flag     = 0: body is the plaintext, 1: body is zstd(plaintext) – compression is
               kept only when it saves space; a chunk whose first 4 KiB do not compress
               (random, encrypted or compressed data) is not even tried

and checked when read: the GCM tag (or nothing, unencrypted), then the id recomputed from
the plaintext – so a flipped bit anywhere is found, and a blob can never be served under
another blob's id. Metadata (pack trailers, index files, restore points) is JSON, zstd
compressed and sealed the same way with a per-kind associated data.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import threading
from typing import Any

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "HASHES",
    "KEY_MAGIC",
    "CorruptError",
    "Keys",
    "RepositoryError",
    "WrongPassword",
    "make_key_file",
    "open_key_file",
]

KEY_MAGIC = "agentless-vmbackup-key"
KEY_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_NONCE = 12
_KEY_AAD = b"agentless-vmbackup master key"
_FLAG_RAW, _FLAG_ZSTD = 0, 1
_LEVEL = 1  # level 3 costs 40% more time for 1-2% smaller chunks of disk data
_PROBE = 4096  # compress this much first: random data is stored as it is, unpacked
HASHES = ("blake3", "sha256")  # a repository's hash: new ones, older ones


class RepositoryError(Exception):
    """Base of the repository's errors: the message is one line for the user."""


class WrongPassword(RepositoryError):
    """No key file of the repository opens with this password: ask again."""


class CorruptError(RepositoryError):
    """Stored bytes do not check: a flipped bit, a torn or foreign object. ``name`` is the
    object, ``blob`` the blob id (hex) when one is concerned. Restore from another copy;
    ``vmbackup verify`` names the restore points affected."""

    def __init__(self, message: str, name: str = "", blob: str = ""):
        super().__init__(message)
        self.name = name
        self.blob = blob


class _Codecs(threading.local):
    """zstd (de)compressors are not thread-safe: one pair per thread."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=_LEVEL)
        self.decompressor = zstandard.ZstdDecompressor()


_codecs = _Codecs()


@dataclasses.dataclass(frozen=True)
class Keys:
    """What seals a repository: *data_key* and *id_key*, or neither (unencrypted), and
    its *hash* (one of HASHES)."""

    data_key: bytes | None = None
    id_key: bytes | None = None
    hash: str = "blake3"

    def __post_init__(self) -> None:
        if self.hash not in HASHES:
            raise RepositoryError(f"unknown hash {self.hash!r} (this version knows {', '.join(HASHES)})")

    @property
    def encrypted(self) -> bool:
        return self.data_key is not None

    @classmethod
    def generate(cls, hash: str = "blake3") -> Keys:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32), hash)

    def blob_id(self, plaintext: bytes | memoryview) -> bytes:
        """The content address of *plaintext* (32 bytes): keyed when encrypted, so that
        ids say nothing of the content to whoever lacks the key."""
        if self.hash == "blake3":
            hasher = (
                blake3.blake3(plaintext) if self.id_key is None else blake3.blake3(plaintext, key=self.id_key)
            )
            return hasher.digest()
        if self.id_key is None:
            return hashlib.sha256(plaintext).digest()
        return hmac.digest(self.id_key, plaintext, "sha256")

    def digest(self, data: bytes | memoryview) -> bytes:
        """The repository's plain hash of *data* (32 bytes): pack names, checksums."""
        if self.hash == "blake3":
            return blake3.blake3(data).digest()
        return hashlib.sha256(data).digest()

    # ------------------------------------------------------------------ blobs

    def seal(self, plaintext: bytes | memoryview, blob_id: bytes) -> bytes:
        """*plaintext* compressed (when that helps) and encrypted, bound to *blob_id*."""
        compressor = _codecs.compressor
        probe = memoryview(plaintext)[:_PROBE]
        hopeless = len(plaintext) > 2 * _PROBE and len(compressor.compress(probe)) >= len(probe) * 0.97
        packed = None if hopeless else compressor.compress(plaintext)
        if packed is not None and len(packed) < len(plaintext):
            body = bytes([_FLAG_ZSTD]) + packed
        else:
            body = bytes([_FLAG_RAW]) + plaintext  # one copy, not two
        if self.data_key is None:
            return body
        nonce = os.urandom(_NONCE)
        return nonce + AESGCM(self.data_key).encrypt(nonce, body, blob_id)

    def open(self, sealed: bytes | memoryview, blob_id: bytes, where: str = "") -> bytes:
        """The plaintext of a sealed blob, checked against *blob_id*; CorruptError if any
        byte is wrong."""
        what = f"blob {blob_id.hex()[:16]}" + (f" in {where}" if where else "")
        body: bytes | memoryview = sealed
        if self.data_key is not None:
            try:
                body = AESGCM(self.data_key).decrypt(bytes(sealed[:_NONCE]), bytes(sealed[_NONCE:]), blob_id)
            except (InvalidTag, ValueError):
                raise CorruptError(f"{what}: authentication failed", where, blob_id.hex()) from None
        if len(body) < 1 or body[0] not in (_FLAG_RAW, _FLAG_ZSTD):
            raise CorruptError(f"{what}: unknown encoding", where, blob_id.hex())
        try:
            plaintext = (
                _codecs.decompressor.decompress(body[1:]) if body[0] == _FLAG_ZSTD else bytes(body[1:])
            )
        except zstandard.ZstdError:
            raise CorruptError(f"{what}: does not decompress", where, blob_id.hex()) from None
        if not hmac.compare_digest(self.blob_id(plaintext), blob_id):
            raise CorruptError(f"{what}: content does not match its id", where, blob_id.hex())
        return plaintext

    # ------------------------------------------------------------------ metadata

    def seal_meta(self, kind: bytes, document: Any) -> bytes:
        """A JSON document as stored: *kind* (the object's magic, 8 bytes) ‖ version ‖
        zstd(JSON) sealed (GCM with *kind* as associated data, or a SHA-256 trailer)."""
        body = _codecs.compressor.compress(json.dumps(document, separators=(",", ":")).encode())
        head = kind + bytes([1])
        if self.data_key is None:
            return head + body + self.digest(head + body)
        nonce = os.urandom(_NONCE)
        return head + nonce + AESGCM(self.data_key).encrypt(nonce, body, kind)

    def open_meta(self, kind: bytes, data: bytes, where: str) -> Any:
        """The document of :meth:`seal_meta`; CorruptError naming *where* if it does not check."""
        if data[: len(kind)] != kind:
            raise CorruptError(f"{where}: not a {kind.decode(errors='replace').strip()} object", where)
        if data[len(kind) : len(kind) + 1] != b"\x01":
            raise CorruptError(f"{where}: unknown format version", where)
        rest = data[len(kind) + 1 :]
        if self.data_key is None:
            body, digest = rest[:-32], rest[-32:]
            if self.digest(data[:-32]) != digest:
                raise CorruptError(f"{where}: checksum mismatch", where)
        else:
            try:
                body = AESGCM(self.data_key).decrypt(rest[:_NONCE], rest[_NONCE:], kind)
            except (InvalidTag, ValueError):
                raise CorruptError(f"{where}: authentication failed", where) from None
        try:
            return json.loads(_codecs.decompressor.decompress(body))
        except (zstandard.ZstdError, ValueError):
            raise CorruptError(f"{where}: malformed", where) from None


# ---------------------------------------------------------------------- key files


def _kek(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode())


def make_key_file(keys: Keys, password: str) -> bytes:
    """A key file wrapping *keys* under *password* (scrypt, AES-256-GCM)."""
    assert keys.data_key is not None and keys.id_key is not None
    salt, nonce = os.urandom(16), os.urandom(_NONCE)
    wrapped = AESGCM(_kek(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, keys.data_key + keys.id_key, _KEY_AAD
    )
    document = {
        "magic": KEY_MAGIC,
        "version": KEY_VERSION,
        "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "data": base64.b64encode(wrapped).decode(),
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def open_key_file(data: bytes, password: str, where: str) -> Keys:
    """The keys in a key file; WrongPassword if *password* does not open it."""
    try:
        document = json.loads(data)
        if document.get("magic") != KEY_MAGIC or document.get("version") != KEY_VERSION:
            raise CorruptError(f"{where}: not a vmbackup key file of version {KEY_VERSION}", where)
        kdf = document["kdf"]
        kek = _kek(password, base64.b64decode(document["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        nonce, wrapped = base64.b64decode(document["nonce"]), base64.b64decode(document["data"])
    except (ValueError, KeyError, TypeError):
        raise CorruptError(f"{where}: malformed key file", where) from None
    try:
        master = AESGCM(kek).decrypt(nonce, wrapped, _KEY_AAD)
    except InvalidTag:
        raise WrongPassword("wrong password: no key of this repository opens with it") from None
    return Keys(master[:32], master[32:])
