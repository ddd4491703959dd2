"""The console's TLS certificate: the operator's, or one made at first start.

``vmbackup serve --console-listen`` takes ``--console-cert``/``--console-key`` (PEM files,
e.g. from the site's CA or ACME); without them, the first start makes a small CA of its
own and a server certificate issued by it, kept in *directory* (0700; the keys 0600) and
used again at every later start, so a browser that trusted it once keeps trusting it.
The CA's certificate (``console-ca.pem``) is what an operator imports into browsers.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from agentless.pki import CertificateAuthority, fingerprint

__all__ = ["ConsoleCertificate", "console_certificate"]


@dataclasses.dataclass(frozen=True)
class ConsoleCertificate:
    cert_file: Path
    key_file: Path
    ca_file: Path | None  # None: the operator's own certificate
    fingerprint: str  # SHA-256 of the server certificate, hex


def console_certificate(
    directory: Path,
    cert_file: str | None = None,
    key_file: str | None = None,
    names: Sequence[str] = (),
) -> ConsoleCertificate:
    """The certificate to serve: *cert_file* and *key_file* when given (both or neither:
    ValueError), else the one kept in *directory*, made now for *names* (plus
    ``localhost``, loopback and this machine's name) when there is none yet. OSError when
    a file cannot be read or written; ValueError when a given file is not PEM."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both --console-cert and --console-key, or neither")
    if cert_file is not None and key_file is not None:
        pem = Path(cert_file).read_bytes()
        Path(key_file).read_bytes()  # readable now, not at the first connection
        return ConsoleCertificate(Path(cert_file), Path(key_file), None, fingerprint(pem))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key, ca = directory / "console.pem", directory / "console-key.pem", directory / "console-ca.pem"
    if not (cert.exists() and key.exists()):
        authority = CertificateAuthority.create(f"vmbackup console CA {socket.gethostname()}")
        wanted = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *names]
        pair = authority.issue_server(socket.gethostname(), list(dict.fromkeys(n for n in wanted if n)))
        pair.write(cert, key)
        ca.write_bytes(authority.pair.cert_pem)
        os.chmod(cert, 0o600)
        os.chmod(ca, 0o600)
    return ConsoleCertificate(cert, key, ca if ca.exists() else None, fingerprint(cert.read_bytes()))
