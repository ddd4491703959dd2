"""Secrets at rest: the host credentials WinCenter keeps, sealed with AES-256-GCM.

The key is ``D/secret.key`` (made by ``wincenter init``, mode 0600, refused when group or
others may read it)::

    secret.key   "agentless-wincenter-secret-key 1\\n" + base64(32 random bytes) + "\\n"

A sealed value is self-describing and bound to what it belongs to::

    b"AGSB" | version (1 byte, 1) | nonce (12 bytes, random) | ciphertext + GCM tag (16 bytes)

with *associated data* (a host's uuid, for its token) authenticated but not stored: a
sealed token copied to another host's row does not open. The database alone therefore
never yields a host credential; the key file alone holds no credential.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SecretError

__all__ = ["KEY_MAGIC", "SEAL_MAGIC", "SecretBox"]

KEY_MAGIC = "agentless-wincenter-secret-key"
KEY_VERSION = 1
SEAL_MAGIC = b"AGSB"
SEAL_VERSION = 1
_NONCE = 12


class SecretBox:
    """Seals and opens small secrets under one AES-256 key."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise SecretError(f"an AES-256 key is 32 bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> SecretBox:
        """Make a new random key at *path* (which must not exist), mode 0600."""
        key = AESGCM.generate_key(bit_length=256)
        text = f"{KEY_MAGIC} {KEY_VERSION}\n{base64.b64encode(key).decode()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecretBox:
        """The key at *path*; SecretError if missing, readable by others or malformed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise SecretError(f"{os.fspath(path)}: {error.strerror}") from None
        with os.fdopen(fd) as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_IMODE(mode) & 0o077:
                raise SecretError(
                    f"{os.fspath(path)}: readable by others (mode {stat.S_IMODE(mode):o}; chmod 600)"
                )
            lines = f.read().split("\n")
        if not lines or lines[0] != f"{KEY_MAGIC} {KEY_VERSION}" or len(lines) < 2:
            raise SecretError(f"{os.fspath(path)}: not a WinCenter secret key (version {KEY_VERSION})")
        try:
            key = base64.b64decode(lines[1], validate=True)
        except (binascii.Error, ValueError):
            raise SecretError(f"{os.fspath(path)}: malformed key") from None
        return cls(key)

    def seal(self, plaintext: bytes, associated: bytes = b"") -> bytes:
        """*plaintext* encrypted and authenticated together with *associated*."""
        nonce = os.urandom(_NONCE)
        return SEAL_MAGIC + bytes([SEAL_VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, sealed: bytes, associated: bytes = b"") -> bytes:
        """The plaintext of *sealed*; SecretError if it is not a sealed value of this
        version, was made under another key or other *associated* data, or was altered."""
        header = len(SEAL_MAGIC) + 1
        if len(sealed) < header + _NONCE + 16 or not sealed.startswith(SEAL_MAGIC):
            raise SecretError("not a sealed secret")
        if sealed[len(SEAL_MAGIC)] != SEAL_VERSION:
            raise SecretError(f"sealed secret of version {sealed[len(SEAL_MAGIC)]}, expected {SEAL_VERSION}")
        nonce = sealed[header : header + _NONCE]
        try:
            return self._aead.decrypt(nonce, sealed[header + _NONCE :], associated)
        except InvalidTag:
            raise SecretError("sealed secret does not open: another key, another owner, or altered") from None

    def seal_text(self, text: str, associated: str = "") -> bytes:
        return self.seal(text.encode(), associated.encode())

    def open_text(self, sealed: bytes, associated: str = "") -> str:
        return self.open(sealed, associated.encode()).decode()
