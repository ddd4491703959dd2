"""The SeaweedFS S3 server the tests start (tests/s3server.py): a port taken between
choosing it and weed binding it – another test process's connection – does not lose the
server (it was skipped, hiding the S3 cases, in a loaded CI run)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.s3server import SeaweedS3, SeaweedUnavailable


def test_a_port_taken_before_the_first_start_is_chosen_anew(tmp_path: Path) -> None:
    try:
        server = SeaweedS3(tmp_path / "weed")
    except SeaweedUnavailable as error:
        pytest.skip(str(error))
    taken = server.ports["filer.grpc"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        server.start()
        try:
            assert server.started and server.ports["filer.grpc"] != taken
            bucket = server.create_bucket()
            server.client.put_object(Bucket=bucket, Key="k", Body=b"v")
            assert server.client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
        finally:
            server.stop()
