"""What a backup or restore of 1 GiB costs at least, in CPU seconds, whatever the code
around it: the work the repository format and the wire make necessary.

    .venv/bin/python bench/backup_floor.py

The data is the benchmark's (bench/backup_vs_restic.py): 4 MiB runs, half random, half
text, cut in 64 KiB chunks. Measured one thread at a time, scaled to 1 GiB:

- seal: id (keyed BLAKE3), zstd level 1 with the 4 KiB probe, AES-256-GCM – what a backup
  does per chunk;
- open: AES-256-GCM, zstd decompression, the id recomputed – what a restore does per chunk;
- TLS over loopback: 1 MiB ``sendall`` against ``recv_into`` (AES-GCM records, as the NBD
  stream between wddk and the host);
- writing a new file in 1 MiB ``pwrite`` calls (the page cache filling, as the host's new
  VHD does on a restore).

A restore needs *open* and the TLS send in the backup system's process and the TLS receive
and the write in the host's; the sum over the two cores is a lower bound of its wall time.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agentless.backup.keys import Keys
from agentless.pki import CertificateAuthority

sys.path.insert(0, str(Path(__file__).parent))
from backup_vs_restic import Data  # the benchmark's data

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 64 << 10
SAMPLE = 256 * MiB


def cpu(work: Callable[[], object]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


def tls_loopback(total: int) -> tuple[float, float]:
    """CPU seconds of the sender and of the receiver of *total* bytes over TLS."""
    with tempfile.TemporaryDirectory() as d:
        pair = CertificateAuthority.create("floor").issue_server("localhost")
        pair.write(f"{d}/cert.pem", f"{d}/key.pem")
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(f"{d}/cert.pem", f"{d}/key.pem")
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[float] = []

    def receive() -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            buffer = memoryview(bytearray(MiB))
            got, started = 0, time.thread_time()
            while got < total:
                got += tls.recv_into(buffer)
            received.append(time.thread_time() - started)

    thread = threading.Thread(target=receive)
    thread.start()
    raw = socket.create_connection(listener.getsockname())
    with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
        payload = os.urandom(MiB)
        sent = cpu(lambda: [tls.sendall(payload) for _ in range(total // MiB)])
    thread.join()
    listener.close()
    return sent, received[0]


def write_new_file(total: int) -> float:
    payload = os.urandom(MiB)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        fd = os.open(f"{d}/new", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            return cpu(lambda: [os.pwrite(fd, payload, i * MiB) for i in range(total // MiB)])
        finally:
            os.close(fd)


def main() -> int:
    data = Data(2018)
    chunks = []
    for i in range(SAMPLE // (4 * MiB)):
        run = data.random(4 * MiB) if i % 2 else data.text(4 * MiB)
        chunks += [run[j : j + CHUNK] for j in range(0, len(run), CHUNK)]
    keys = Keys.generate()
    ids = [keys.blob_id(c) for c in chunks]
    sealed = [keys.seal(c, i) for c, i in zip(chunks, ids, strict=True)]
    scale = GiB / SAMPLE
    pairs = list(zip(chunks, sealed, ids, strict=True))
    rows = [
        ("seal (id, zstd-1, AES-GCM)", scale * cpu(lambda: [keys.seal(c, i) for c, _, i in pairs])),
        ("open (AES-GCM, unzstd, id check)", scale * cpu(lambda: [keys.open(s, i) for _, s, i in pairs])),
        ("id alone (keyed BLAKE3)", scale * cpu(lambda: [keys.blob_id(c) for c in chunks])),
    ]
    sent, received = tls_loopback(GiB)
    rows += [("TLS send", sent), ("TLS receive", received), ("pwrite into a new file", write_new_file(GiB))]
    stored = sum(len(s) for s in sealed) * scale
    print(f"CPU seconds per GiB of disk data (stored as {stored / GiB:.2f} GiB), one thread each:")
    print()
    print("| work | CPU s / GiB |")
    print("|---|--:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
