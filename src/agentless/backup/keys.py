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
another blob's id.

Metadata (pack trailers, index files, restore points, condemned lists) is JSON, zstd
compressed and sealed the same way, bound to its kind and to its *name* (format 2)::

    kind(8) ‖ 0x02 ‖ u8 n ‖ name(n) ‖ nonce ‖ AES-256-GCM(zstd(JSON), aad = all before the nonce)
    kind(8) ‖ 0x02 ‖ u8 n ‖ name(n) ‖ zstd(JSON) ‖ hash(all before)        (without encryption)

so that an object copied or renamed over another is refused, naming both, instead of
being served as the other. Content-addressed objects (index files, pack trailers) have
the empty name: their reader checks the name against the content instead. Format 1
(``kind ‖ 0x01 ‖ …``, aad = kind) is what versions before the binding wrote; it is still
read, and its readers check the ids in the document against the name.

The config is authenticated with :meth:`Keys.mac`; a key file (format 2) binds its master
key to the repository's id, so that neither the config nor its format can be swapped
for another without the password.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import secrets
import threading
from typing import Any, NamedTuple

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import CorruptError, RepositoryError, WrongPassword

__all__ = [
    "HASHES",
    "KEY_MAGIC",
    "CorruptError",
    "Keys",
    "RepositoryError",
    "WrongPassword",
    "check_key_file",
    "make_key_file",
    "open_key_file",
]

KEY_MAGIC = "agentless-vmbackup-key"
KEY_VERSION = 2  # 1: the master key bound to nothing; 2: to the repository's id
KEY_VERSIONS = (1, 2)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
# What a key file may ask of scrypt. The parameters come from the repository, i.e. from
# whoever can write it: unbounded, n = 2^24 alone would take 16 GiB and minutes at every
# open. n is a power of two from 2^14 (below, the password is too cheap to guess) to 2^17;
# the memory (128·n·r) at most 128 MiB, the work (n·r·p) at most 8 times the default.
SCRYPT_MIN_N, SCRYPT_MAX_N = 1 << 14, 1 << 17
SCRYPT_MAX_R, SCRYPT_MAX_P = 16, 4
SCRYPT_MAX_MEMORY = 128 << 20
SCRYPT_MAX_WORK = 8 * SCRYPT_N * SCRYPT_R * SCRYPT_P
_NONCE = 12
# the most a sealed object may inflate to: a blob is a chunk (16 MiB at most, as
# repoconfig.MAX_CHUNK_SIZE) or an index page (128 KiB); metadata is JSON of any size
_MAX_BLOB = 32 << 20
_MAX_META = 1 << 30
_KEY_AAD = b"agentless-vmbackup master key"
_META_V1, _META_V2 = 1, 2  # 1: bound to the kind only (read, never written); 2: and to the name
_FLAG_RAW, _FLAG_ZSTD = 0, 1
_LEVEL = 1  # level 3 costs 40% more time for 1-2% smaller chunks of disk data
_PROBE = 4096  # compress this much first: random data is stored as it is, unpacked
HASHES = ("blake3", "sha256")  # a repository's hash: new ones, older ones


class _Codecs(threading.local):
    """zstd (de)compressors are not thread-safe: one pair per thread."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=_LEVEL)
        self.decompressor = zstandard.ZstdDecompressor()


_codecs = _Codecs()


def _inflate(frame: bytes | memoryview, limit: int) -> bytes:
    """The content of a zstd *frame* of at most *limit* bytes (ZstdError otherwise).
    python-zstandard allocates whatever size a frame's header declares before it
    decompresses: a stored blob whose header claimed 2^40 bytes raised MemoryError (found
    by the fault campaign's fuzzing), so the declared size is checked first."""
    if zstandard.frame_content_size(frame) > limit:
        raise zstandard.ZstdError(f"frame declares more than {limit} bytes")
    return _codecs.decompressor.decompress(frame, max_output_size=limit)


@dataclasses.dataclass(frozen=True)
class Keys:
    """What seals a repository: *data_key* and *id_key*, or neither (unencrypted), and
    its *hash* (one of HASHES). *repository_id*: the repository the key file that held
    the keys binds them to (``""``: a key file of format 1, or keys not from a key file)."""

    data_key: bytes | None = dataclasses.field(default=None, repr=False)
    id_key: bytes | None = dataclasses.field(default=None, repr=False)
    hash: str = "blake3"
    repository_id: str = ""

    def __post_init__(self) -> None:
        if self.hash not in HASHES:
            raise RepositoryError(f"unknown hash {self.hash!r} (this version knows {', '.join(HASHES)})")

    @property
    def encrypted(self) -> bool:
        return self.data_key is not None

    @functools.cached_property
    def _aead(self) -> AESGCM | None:
        """The data key's cipher, made once (its key schedule is not free; it keeps no
        state between calls, so threads share it)."""
        return None if self.data_key is None else AESGCM(self.data_key)

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

    def mac(self, purpose: bytes, data: bytes) -> bytes:
        """A MAC of *data* (HMAC-SHA256 under a key derived from the master key for
        *purpose*, so that no key serves two primitives), or its plain SHA-256 when the
        repository is not encrypted: a checksum, which only catches accidents."""
        if self.data_key is None or self.id_key is None:
            return hashlib.sha256(data).digest()
        key = hmac.digest(self.data_key + self.id_key, b"agentless-vmbackup mac key: " + purpose, "sha256")
        return hmac.digest(key, data, "sha256")

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
        if self._aead is None:
            return body
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, body, blob_id)

    def open(self, sealed: bytes | memoryview, blob_id: bytes, where: str = "") -> bytes:
        """The plaintext of a sealed blob, checked against *blob_id*; CorruptError if any
        byte is wrong."""
        what = f"blob {blob_id.hex()[:16]}" + (f" in {where}" if where else "")
        body = memoryview(sealed)  # slices of views: no copy of the blob before it is used
        if self._aead is not None:
            try:
                body = memoryview(self._aead.decrypt(body[:_NONCE], body[_NONCE:], blob_id))
            except (InvalidTag, ValueError):
                raise CorruptError(f"{what}: authentication failed", where, blob_id.hex()) from None
        if len(body) < 1 or body[0] not in (_FLAG_RAW, _FLAG_ZSTD):
            raise CorruptError(f"{what}: unknown encoding", where, blob_id.hex())
        try:
            plaintext = _inflate(body[1:], _MAX_BLOB) if body[0] == _FLAG_ZSTD else body[1:].tobytes()
        except zstandard.ZstdError:
            raise CorruptError(f"{what}: does not decompress", where, blob_id.hex()) from None
        if not hmac.compare_digest(self.blob_id(plaintext), blob_id):
            raise CorruptError(f"{what}: content does not match its id", where, blob_id.hex())
        return plaintext

    # ------------------------------------------------------------------ metadata

    def seal_meta(self, kind: bytes, document: Any, name: str) -> bytes:
        """A JSON document as stored (format 2, module docstring): *kind* (the object's
        magic, 8 bytes) and *name* (the object's name; ``""`` for a content-addressed
        object) in the head, zstd(JSON) sealed with the head as associated data (or a
        trailing checksum of everything without encryption)."""
        return self.seal_data(kind, json.dumps(document, separators=(",", ":")).encode(), name)

    def seal_data(self, kind: bytes, payload: bytes | memoryview, name: str) -> bytes:
        """*payload* (bytes of any form: binary index files) sealed as :meth:`seal_meta`
        seals JSON."""
        encoded = name.encode()
        if len(kind) != 8 or len(encoded) > 255:
            raise ValueError(f"metadata kind {kind!r} or name {name!r} does not fit the format")
        body = _codecs.compressor.compress(payload)
        head = kind + bytes([_META_V2, len(encoded)]) + encoded
        if self._aead is None:
            return head + body + self.digest(head + body)
        nonce = os.urandom(_NONCE)
        return head + nonce + self._aead.encrypt(nonce, body, head)

    def open_meta(self, kind: bytes, data: bytes, name: str, where: str = "") -> Any:
        """The document of :meth:`seal_meta`, stored under *name* (``""``: content
        addressed; *where*, default *name*, is said in messages). CorruptError naming it
        if it does not check, or if it was sealed for another name (swapped or renamed:
        the message names both). Objects of format 1 carry no name: the caller checks
        the ids of their document."""
        body = self.open_data(kind, data, name, where)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise CorruptError(f"{where or name}: malformed", where or name) from None

    def open_data(self, kind: bytes, data: bytes, name: str, where: str = "") -> bytes:
        """The payload of :meth:`seal_data` (or of :meth:`seal_meta`: its JSON), checked
        as :meth:`open_meta` checks."""
        where = where or name
        if data[: len(kind)] != kind:
            raise CorruptError(f"{where}: not a {kind.decode(errors='replace').strip()} object", where)
        version = data[len(kind) : len(kind) + 1]
        stored: bytes | None = None  # format 1: no name
        if version == bytes([_META_V2]):
            end = len(kind) + 2 + (data[len(kind) + 1] if len(data) > len(kind) + 1 else 0)
            head, stored = data[:end], data[len(kind) + 2 : end]
        elif version == bytes([_META_V1]):
            head, end = kind, len(kind) + 1
        else:
            raise CorruptError(f"{where}: unknown format version", where)
        rest = memoryview(data)[end:]  # views, not copies: index files are tens of MiB
        body: bytes | memoryview
        if self._aead is None:
            body, digest = rest[:-32], bytes(rest[-32:])
            if len(digest) != 32 or self.digest(memoryview(data)[:-32]) != digest:
                raise CorruptError(f"{where}: checksum mismatch", where)
        else:
            try:
                body = self._aead.decrypt(rest[:_NONCE], rest[_NONCE:], head)
            except (InvalidTag, ValueError):
                raise CorruptError(f"{where}: authentication failed", where) from None
        if stored is not None and stored != name.encode():
            other = stored.decode(errors="replace") or "a content-addressed object"
            raise CorruptError(
                f"{where}: holds {other}, not {name or 'a content-addressed object'} (swapped or renamed)",
                where,
            )
        try:
            return _inflate(body, _MAX_META)
        except zstandard.ZstdError:
            raise CorruptError(f"{where}: malformed", where) from None


# ---------------------------------------------------------------------- key files


def _kek(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode())


def _key_aad(repository_id: str) -> bytes:
    """What a key file's wrapped master key is bound to: format 1 nothing, format 2 the
    repository's id – a config swapped for another repository's fails its MAC, and one
    rewritten in format 1 (no MAC) is refused by the key that opens it."""
    return _KEY_AAD + (b" of repository " + repository_id.encode() if repository_id else b"")


class _KeyFile(NamedTuple):
    version: int
    repository_id: str
    n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    wrapped: bytes


def make_key_file(keys: Keys, password: str, repository_id: str) -> bytes:
    """A key file (format 2) wrapping *keys* under *password* (scrypt, AES-256-GCM),
    bound to the repository *repository_id*."""
    assert keys.data_key is not None and keys.id_key is not None and repository_id
    salt, nonce = os.urandom(16), os.urandom(_NONCE)
    wrapped = AESGCM(_kek(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, keys.data_key + keys.id_key, _key_aad(repository_id)
    )
    document = {
        "magic": KEY_MAGIC,
        "version": KEY_VERSION,
        "repository": repository_id,
        "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "data": base64.b64encode(wrapped).decode(),
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def check_key_file(data: bytes, where: str) -> _KeyFile:
    """The fields of a key file, checked without the password: magic, version, and
    scrypt parameters within this version's bounds (SCRYPT_*). CorruptError naming
    *where* otherwise – before any memory or time is spent on scrypt."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("magic") != KEY_MAGIC:
            raise CorruptError(f"{where}: not a vmbackup key file", where)
        version = document.get("version")
        if version not in KEY_VERSIONS:
            raise CorruptError(f"{where}: key file format {version!r} is unknown to this version", where)
        kdf = document["kdf"]
        if kdf.get("name") != "scrypt":
            raise CorruptError(f"{where}: key derivation {kdf.get('name')!r} is unknown", where)
        n, r, p = (kdf[k] for k in "nrp")
        if not all(type(v) is int for v in (n, r, p)):
            raise ValueError("scrypt parameters are not integers")
        repository_id = str(document["repository"]) if version >= 2 else ""
        if version >= 2 and not repository_id:
            raise ValueError("no repository id")
        key_file = _KeyFile(
            version,
            repository_id,
            n,
            r,
            p,
            base64.b64decode(document["salt"], validate=True),
            base64.b64decode(document["nonce"], validate=True),
            base64.b64decode(document["data"], validate=True),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CorruptError(f"{where}: malformed key file", where) from None
    if not (
        n & (n - 1) == 0
        and SCRYPT_MIN_N <= n <= SCRYPT_MAX_N
        and 1 <= r <= SCRYPT_MAX_R
        and 1 <= p <= SCRYPT_MAX_P
        and 128 * n * r <= SCRYPT_MAX_MEMORY
        and n * r * p <= SCRYPT_MAX_WORK
    ):
        raise CorruptError(
            f"{where}: scrypt parameters n={n} r={r} p={p} are outside the bounds this version "
            f"accepts (n a power of two from 2^14 to 2^17, r <= {SCRYPT_MAX_R}, p <= {SCRYPT_MAX_P}, "
            f"at most {SCRYPT_MAX_MEMORY >> 20} MiB): refused, not derived",
            where,
        )
    sizes = len(key_file.salt), len(key_file.nonce), len(key_file.wrapped)
    if not 16 <= sizes[0] <= 64 or sizes[1:] != (_NONCE, 64 + 16):
        raise CorruptError(f"{where}: malformed key file", where)
    return key_file


def open_key_file(data: bytes, password: str, where: str) -> Keys:
    """The keys in a key file (:func:`check_key_file` first), with the repository id it
    binds them to (``""`` for format 1); WrongPassword if *password* does not open it."""
    key_file = check_key_file(data, where)
    kek = _kek(password, key_file.salt, key_file.n, key_file.r, key_file.p)
    try:
        master = AESGCM(kek).decrypt(key_file.nonce, key_file.wrapped, _key_aad(key_file.repository_id))
    except InvalidTag:
        raise WrongPassword("wrong password: no key of this repository opens with it") from None
    return Keys(master[:32], master[32:], repository_id=key_file.repository_id)
