"""``winserver serve-disk`` run as a real program: its safe defaults.

Loopback only unless told, read-only unless told, and a TCP export under a name nobody can
guess: generated and printed once, or given in a 0600 file or the environment (never on the
command line, where ``ps`` shows it to every local user). Each test starts the command in a
subprocess and talks to it with our NBD client over TLS.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.nbd.client import Client
from agentless.nbd.errors import NegotiationError, RequestError
from agentless.nbd.protocol import NBD_EPERM
from agentless.winserver.servedisk import MIN_NAME_LENGTH, NAME_VARIABLE
from tests.nbd import serving

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
COMMAND = [sys.executable, "-m", "agentless.winserver.cli", "serve-disk"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x03" * MiB)
    return path


def tls_args(pki: serving.Pki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]


@contextlib.contextmanager
def serve_disk(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``serve-disk ARGS`` until the block ends; yields the line it prints first."""
    process = subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | (env or {}),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("serving "), f"{line!r}: {process.stderr.read() if process.stderr else ''}"
        yield line
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``serve-disk ARGS``, which must refuse its command line; its error line."""
    result = subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=30, env=os.environ | (env or {})
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def port_and_name(line: str) -> tuple[int, str]:
    match = re.search(r" at nbds://127\.0\.0\.1:(\d+)/(\S+)$", line)
    assert match, line
    return int(match.group(1)), match.group(2)


def connect(port: int, name: str, pki: serving.Pki) -> Client:
    return Client.connect(f"nbds://127.0.0.1:{port}/{name}", tls_cert=pki.server_cert.read_text())


def test_tcp_defaults_loopback_read_only_and_a_generated_name(image: Path, tls_dir: serving.Pki) -> None:
    """Without options a TCP export listens on 127.0.0.1 only (another loopback address is
    refused), is read-only (a write gets EPERM, the file is unchanged) and has a fresh
    256-bit name printed once: the empty name and the previous run's name are refused."""
    names = []
    for _ in range(2):
        with serve_disk(str(image), "--port", "0", *tls_args(tls_dir)) as line:
            assert "read-only" in line
            port, name = port_and_name(line)
            assert re.fullmatch(r"[\w-]{43}", name)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.2", port), timeout=10).close()
            with connect(port, name, tls_dir) as client:
                assert client.read_only
                assert client.read(0, 512) == b"\x03" * 512
                with pytest.raises(RequestError) as error:
                    client.write(0, b"\x09" * 512)
                assert error.value.error == NBD_EPERM
            for wrong in ["", *names]:
                with pytest.raises(NegotiationError):
                    connect(port, wrong, tls_dir).close()
            names.append(name)
    assert image.read_bytes() == b"\x03" * MiB


@pytest.mark.parametrize("flag", ["--writable", "--read-write"])
def test_writable_only_when_asked(image: Path, tls_dir: serving.Pki, flag: str) -> None:
    """``--writable`` (or ``--read-write``) lets clients write."""
    with serve_disk(str(image), "--port", "0", flag, *tls_args(tls_dir)) as line:
        assert "writable" in line
        with connect(*port_and_name(line), tls_dir) as client:
            client.write(4096, b"\x09" * 512)
            client.flush()
    assert image.read_bytes()[4096 : 4096 + 513] == b"\x09" * 512 + b"\x03"


def test_read_only_is_still_accepted(image: Path, tls_dir: serving.Pki) -> None:
    """``--read-only`` (the old way to ask) still works; with ``--writable`` it is refused."""
    with serve_disk(str(image), "--port", "0", "--read-only", *tls_args(tls_dir)) as line:
        assert "read-only" in line
    assert "not allowed with" in refused(str(image), "--port", "0", "--read-only", "--writable")


def test_a_name_from_a_file_or_the_environment_is_used_and_not_printed(
    image: Path, tls_dir: serving.Pki, tmp_path: Path
) -> None:
    """A name in a 0600 ``--name-file`` or in WINSERVER_EXPORT_NAME is the export's name,
    and the line printed at start does not show it."""
    secret = "s3cret-" + "x" * 30
    name_file = tmp_path / "name"
    name_file.write_text(secret + "\n")
    name_file.chmod(0o600)
    for args, env in (([f"--name-file={name_file}"], None), ([], {NAME_VARIABLE: secret})):
        with serve_disk(str(image), "--port", "0", *args, *tls_args(tls_dir), env=env) as line:
            assert secret not in line
            match = re.search(r"nbds://127\.0\.0\.1:(\d+), export name from ", line)
            assert match, line
            with connect(int(match.group(1)), secret, tls_dir) as client:
                assert client.read(0, 512) == b"\x03" * 512


def test_guessable_or_exposed_names_are_refused(image: Path, tls_dir: serving.Pki, tmp_path: Path) -> None:
    """For TCP: ``--name`` on the command line, a name shorter than 128 bits' worth and a
    name file other users can read are refused with one line."""
    tcp = [str(image), "--port", "0", *tls_args(tls_dir)]
    assert "visible to every local user" in refused(*tcp, "--name", "disk")
    assert "visible to every local user" in refused(*tcp, "--name", "")
    short = "x" * (MIN_NAME_LENGTH - 1)
    assert "too short" in refused(*tcp, env={NAME_VARIABLE: short})
    name_file = tmp_path / "name"
    name_file.write_text("y" * 40)
    name_file.chmod(0o644)
    assert "readable by others" in refused(*tcp, f"--name-file={name_file}")
    assert "cannot read" in refused(*tcp, f"--name-file={tmp_path / 'missing'}")


def test_a_unix_socket_keeps_its_name_and_plain_tcp_needs_loopback(image: Path, tmp_path: Path) -> None:
    """On a unix socket ``--name`` still names the export (the empty name by default);
    plain TCP is refused off loopback."""
    sock = tmp_path / "disk.sock"
    with serve_disk(str(image), "--socket", str(sock), "--name", "disk") as line:
        assert line.endswith(f" at nbd+unix:///disk?socket={sock}")
        assert "read-only" in line
        with Client.connect(f"nbd+unix:///disk?socket={sock}") as client:
            assert client.read_only
    with serve_disk(str(image), "--socket", str(sock)) as line:
        assert line.endswith(f" at nbd+unix:///?socket={sock}")
    assert "loopback" in refused(str(image), "--port", "0", "--no-tls", "--bind", "0.0.0.0")
