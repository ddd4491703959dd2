"""TLS contexts for NBD over X.509 (NBD_OPT_STARTTLS).

The server presents a certificate issued by its host CA. A client pins the exact server
certificate it was given (the PEM of the access info): that certificate is the only trust
anchor, and after the handshake the peer's certificate must be byte-identical to it. Host
names are not checked – the pin is stronger than a name.
"""

from __future__ import annotations

import ssl

from .errors import NegotiationError

__all__ = ["check_pinned", "client_context", "server_context"]


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting *cert_path* with *key_path*."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


def client_context(pinned_pem: str | bytes) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate *pinned_pem*."""
    pem = pinned_pem.decode() if isinstance(pinned_pem, bytes) else pinned_pem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # a leaf certificate as the trust anchor needs partial chains
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=pem)
    return context


def check_pinned(sock: ssl.SSLSocket | ssl.SSLObject, pinned_pem: str | bytes) -> None:
    """Fail unless the peer's certificate is exactly the pinned one."""
    pem = pinned_pem.decode() if isinstance(pinned_pem, bytes) else pinned_pem
    peer = sock.getpeercert(binary_form=True)
    if peer is None or peer != ssl.PEM_cert_to_DER_cert(pem.strip()):
        raise NegotiationError("server certificate does not match the pinned certificate")
