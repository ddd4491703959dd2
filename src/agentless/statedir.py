"""State directories (a WinServer host's, a WinCenter's): made whole or not at all.

:func:`building` checks the target (missing, or an empty directory whose parent exists),
lets the caller fill a 0700 staging directory beside it, and renames that into place:
an interrupted ``init`` leaves nothing half-made, and an existing state directory is
never overwritten. :func:`write_pki` makes the party's own CA and server certificate;
:func:`write_private` writes a 0600 file durably.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from .pki import CertificateAuthority

__all__ = ["building", "read_identity", "write_pki", "write_private"]


@contextlib.contextmanager
def building(directory: str | os.PathLike[str], error: type[Exception], prefix: str) -> Iterator[str]:
    """Yield a staging directory to fill; on a clean exit it becomes *directory*. Raises
    *error* (one line) when *directory* exists and is not empty or its parent is missing."""
    target = os.path.abspath(os.fspath(directory))
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise error(f"{target}: exists and is not an empty directory")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise error(f"{parent}: no such directory")
    staging = tempfile.mkdtemp(prefix=f".{prefix}-init-", dir=parent)
    try:
        os.chmod(staging, 0o700)
        yield staging
        if os.path.isdir(target):
            os.rmdir(target)  # empty, checked above
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_identity(directory: str, name: str, error: type[Exception], what: str, init: str) -> Any:
    """The JSON document *name* of the state directory *directory*; *error* (one line)
    when it is missing – the directory is not a *what*: run *init* – or unreadable."""
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{directory}: not a {what} directory (run `{init} --dir`)") from None
    except (OSError, ValueError) as problem:
        raise error(f"{path}: unreadable ({problem})") from None


def write_pki(directory: str, ca_name: str, server_name: str, addresses: Sequence[str]) -> None:
    """``pki/``: a new CA (``ca-cert.pem``, ``ca-key.pem``) and a server certificate it
    issued for *server_name* and *addresses* (``server-cert.pem``, ``server-key.pem``);
    keys 0600."""
    pki = os.path.join(directory, "pki")
    os.mkdir(pki, 0o700)
    ca = CertificateAuthority.create(ca_name)
    ca.pair.write(os.path.join(pki, "ca-cert.pem"), os.path.join(pki, "ca-key.pem"))
    server = ca.issue_server(server_name, list(dict.fromkeys([*addresses, server_name])))
    server.write(os.path.join(pki, "server-cert.pem"), os.path.join(pki, "server-key.pem"))


def write_private(path: str, text: str) -> None:
    """Write a new file readable by its owner only, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
