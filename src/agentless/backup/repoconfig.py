"""The repository's config: the one object that says what a repository is – its id,
chunk size, hash and whether it is encrypted – and so how everything else in it is read
and written.

It is plain JSON (it must be read before any key is known), so it is authenticated
instead of sealed. Format 2 carries a ``mac`` over its other fields::

    mac = HMAC-SHA256(key derived from the master key, canonical JSON of the other fields)
          (SHA-256 of it without encryption: a checksum, which only catches accidents)

and the key file of an encrypted repository binds the master key to the repository's
id (:mod:`.keys`, key file format 2). Together they make the config impossible to alter
without the password: a flipped ``encrypted``, ``hash`` or ``chunk_size`` fails the MAC,
a config of format 1 (no MAC) or of another repository is refused by the key that opens
the repository, and a config saying "not encrypted" is refused while the repository
holds key files. Without that, editing ``"encrypted": false`` into the config made the
next backup store VM data in plaintext in an encrypted repository.

Format 3 is format 2 whose index files are binary (:mod:`.indexfile`); repositories of
format 2 keep JSON index files, so that the version that made them still reads them.

Format 1 is what versions before the MAC wrote: such repositories (their key files are of
format 1 too) open as before, with an unauthenticated config – only the key-file rule
guards their encryption. ``docs/repository.md`` says so.
"""

from __future__ import annotations

import datetime
import hmac
import json
from typing import Any

from .keys import CorruptError, Keys, RepositoryError

__all__ = [
    "CONFIG_MAGIC",
    "CONFIG_VERSION",
    "MAX_CHUNK_SIZE",
    "check_chunk_size",
    "check_config",
    "encode_config",
    "new_config",
    "parse_config",
]

CONFIG_MAGIC = "agentless-vmbackup-repository"
CONFIG_VERSION = 3  # 1: no MAC (read, never written); 2: JSON index files (read and written)
_VERSIONS = (1, 2, 3)
MAX_CHUNK_SIZE = 16 << 20  # a chunk is read and held whole: a config must not ask for GiBs
_MAC_PURPOSE = b"repository config"


def check_chunk_size(chunk_size: object, where: str = "chunk size") -> int:
    """*chunk_size* if it is a positive multiple of 512 up to MAX_CHUNK_SIZE; RepositoryError."""
    if type(chunk_size) is not int or not 0 < chunk_size <= MAX_CHUNK_SIZE or chunk_size % 512:
        raise RepositoryError(
            f"{where} {chunk_size!r}: not a positive multiple of 512 of at most {MAX_CHUNK_SIZE >> 20} MiB"
        )
    return chunk_size


def new_config(repository_id: str, chunk_size: int, hash: str, encrypted: bool) -> dict[str, Any]:
    """The config of a new repository (without its MAC: :func:`encode_config` adds it)."""
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "magic": CONFIG_MAGIC,
        "version": CONFIG_VERSION,
        "id": repository_id,
        "chunk_size": chunk_size,
        "hash": hash,
        "encrypted": encrypted,
        "created": created,
    }


def _mac(config: dict[str, Any], keys: Keys) -> str:
    fields = {name: value for name, value in config.items() if name != "mac"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return keys.mac(_MAC_PURPOSE, canonical).hex()


def encode_config(config: dict[str, Any], keys: Keys) -> bytes:
    """The stored config: *config* with its MAC under *keys*, as readable JSON."""
    sealed = dict(config) | {"mac": _mac(config, keys)}
    return json.dumps(sealed, indent=2).encode() + b"\n"


def parse_config(data: bytes, location: str) -> dict[str, Any]:
    """The config in *data*, its shape checked (not yet its MAC: :func:`check_config`
    does, once the keys are known). RepositoryError when it is not a vmbackup
    repository or one of an unknown format; CorruptError when it is malformed."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deep (found by fuzzing)
        raise CorruptError(f"{location}/config: malformed", "config") from None
    if not isinstance(config, dict) or config.get("magic") != CONFIG_MAGIC:
        raise RepositoryError(f"{location}: not a vmbackup repository")
    if config.get("version") not in _VERSIONS:
        raise RepositoryError(f"{location}: repository format {config.get('version')} is unknown")
    if not isinstance(config.get("encrypted", False), bool) or not isinstance(config.get("id"), str):
        raise CorruptError(f"{location}/config: malformed", "config")
    return config


def check_config(config: dict[str, Any], keys: Keys, location: str) -> None:
    """Check *config* against the *keys* that opened the repository: its MAC (format 2),
    the repository the key file binds the keys to, its chunk size. CorruptError naming
    the config when it was altered or replaced – the command must not go on."""
    where = f"{location}/config"
    if keys.repository_id:
        if config["version"] < 2:
            raise CorruptError(
                f"{where}: of format 1 (no MAC), but the key file is of a later repository: "
                "the config was replaced; refused",
                "config",
            )
        if config["id"] != keys.repository_id:
            raise CorruptError(
                f"{where}: of repository {config['id']}, but the key file is of repository "
                f"{keys.repository_id}; refused",
                "config",
            )
    if config["version"] >= 2:
        stored = config.get("mac")
        # compared as bytes: compare_digest raises TypeError on str with non-ASCII (found by fuzzing)
        expected = _mac(config, keys).encode()
        if not isinstance(stored, str) or not hmac.compare_digest(stored.encode(), expected):
            what = "authentication failed" if keys.encrypted else "checksum mismatch"
            raise CorruptError(f"{where}: {what}: it was altered or replaced; refused", "config")
    if bool(config.get("encrypted")) != keys.encrypted:
        raise CorruptError(f"{where}: encryption does not match the keys; refused", "config")
    try:
        check_chunk_size(config.get("chunk_size"), f"{where}: chunk size")
    except RepositoryError as error:
        raise CorruptError(str(error), "config") from None
