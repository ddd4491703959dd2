"""The storage backends: one contract suite run against every backend (restic's
``backend/test/suite.go``), then what is particular to each backend and wrapper."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse

from agentless.backup.storage import (
    IMPLEMENTATIONS,
    Backend,
    BitFlipBackend,
    FailingBackend,
    InvalidName,
    LocalBackend,
    MemoryBackend,
    NotFound,
    RetryBackend,
    S3Backend,
    SimulatedCrash,
    StorageError,
    open_backend,
    s3,
)
from tests.backup.conftest import S3Server
from tests.helpers import refused_port
from tests.s3server import S3_CREDENTIALS

MiB = 1 << 20

BAD_NAMES = [
    "",
    "/abs",
    "/",
    "a//b",
    "a/",
    "..",
    "../x",
    "a/../b",
    ".",
    "a/./b",
    "a b",
    "a\\b",
    "ä",
    "a\x00b",
    "a:b",
    "a~",
]
GOOD_NAMES = [".hidden", "...", "a-b_c.D9", "deep/er/and/deeper/still/x", "-", "_"]


# ====================================================================== the contract


def test_every_backend_satisfies_the_protocol(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend, IMPLEMENTATIONS)
    assert isinstance(backend.location, str) and backend.location


def test_put_then_get(backend: Backend) -> None:
    backend.put("config", b"hello")
    backend.put("data/ab/abcdef", memoryview(b"\x00\x01 from a memoryview"))
    backend.put("empty", b"")
    assert backend.get("config") == b"hello"
    assert backend.get("data/ab/abcdef") == b"\x00\x01 from a memoryview"
    assert backend.get("empty") == b""
    assert backend.size("config") == 5
    assert backend.size("empty") == 0
    assert backend.exists("config") and backend.exists("empty")
    assert isinstance(backend.get("config"), bytes)


def test_put_overwrites_the_whole_object(backend: Backend) -> None:
    backend.put("index/1", b"a long first version of the object")
    backend.put("index/1", b"short")
    assert backend.get("index/1") == b"short"
    assert backend.size("index/1") == 5
    assert sorted(backend.list()) == ["index/1"]


def test_missing_objects(backend: Backend) -> None:
    backend.put("data/present", b"x")
    for call in (
        lambda: backend.get("data/missing"),
        lambda: backend.get_range("data/missing", 0, 10),
        lambda: backend.get_range("data/missing", 0, 0),
        lambda: backend.size("data/missing"),
        lambda: backend.get("data"),  # a prefix of names is not an object
        lambda: backend.size("data"),
        lambda: backend.get_range("data", 0, 10),
        lambda: backend.get_range("data", 1 << 20, 10),
    ):
        with pytest.raises(NotFound) as caught:
            call()
        assert isinstance(caught.value, StorageError)
        assert not caught.value.retryable
        assert caught.value.name in ("data/missing", "data")
        assert "\n" not in str(caught.value)
    assert not backend.exists("data/missing")
    assert not backend.exists("data")


def test_get_range(backend: Backend) -> None:
    data = bytes(range(256)) * 4
    backend.put("pack", data)
    assert backend.get_range("pack", 0, 10) == data[:10]
    assert backend.get_range("pack", 100, 300) == data[100:400]
    assert backend.get_range("pack", 1000, 100) == data[1000:]  # short read at the end only
    assert backend.get_range("pack", 1024, 10) == b""
    assert backend.get_range("pack", 5000, 10) == b""
    assert backend.get_range("pack", 7, 0) == b""
    assert backend.get_range("pack", 0, 1 << 30) == data
    backend.put("empty", b"")
    assert backend.get_range("empty", 0, 10) == b""
    with pytest.raises(ValueError):
        backend.get_range("pack", -1, 10)
    with pytest.raises(ValueError):
        backend.get_range("pack", 0, -1)


def test_list_with_prefixes(backend: Backend) -> None:
    names = ["config", "configs/x", "data/00/0001", "data/00/0002", "data/01/0100", "index/a", "keys/k"]
    for name in names:
        backend.put(name, name.encode())
    assert sorted(backend.list()) == names
    assert sorted(backend.list("")) == names
    assert sorted(backend.list("data/")) == ["data/00/0001", "data/00/0002", "data/01/0100"]
    assert sorted(backend.list("data/00/")) == ["data/00/0001", "data/00/0002"]
    assert sorted(backend.list("data/0")) == ["data/00/0001", "data/00/0002", "data/01/0100"]
    assert sorted(backend.list("data/00/000")) == ["data/00/0001", "data/00/0002"]
    assert sorted(backend.list("config")) == ["config", "configs/x"]
    assert sorted(backend.list("configs/")) == ["configs/x"]
    assert list(backend.list("nothing/")) == []
    assert list(backend.list("data/02/")) == []
    for bad in ("/", "/data", "../", "data/../", "a b"):
        with pytest.raises(InvalidName):
            backend.list(bad)
        with pytest.raises(InvalidName):
            backend.list_sizes(bad)


def test_list_sizes_gives_each_listed_name_with_its_length(backend: Backend) -> None:
    names = {"config": 0, "data/00/0001": 1, "data/00/0002": 70000, "data/01/0100": 5, "index/a": 3}
    for name, size in names.items():
        backend.put(name, os.urandom(size))
    assert sorted(backend.list_sizes()) == sorted(names.items())
    assert sorted(backend.list_sizes("data/0")) == [
        (n, s) for n, s in sorted(names.items()) if n.startswith("data/")
    ]
    assert list(backend.list_sizes("nothing/")) == []


def test_list_many_objects_crosses_pages(backend: Backend) -> None:
    """More objects than one S3 ListObjectsV2 page holds (1000)."""
    names = [f"data/{i % 7}/{i:06d}" for i in range(1010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: backend.put(name, name.encode()), names))
    backend.put("other/x", b"")
    listed = list(backend.list("data/"))
    assert len(listed) == len(set(listed)) == 1010
    assert set(listed) == set(names)
    assert sorted(backend.list_sizes("data/")) == sorted((name, len(name)) for name in names)
    assert len(list(backend.list())) == 1011


def test_list_of_an_empty_backend(backend: Backend) -> None:
    assert list(backend.list()) == []
    assert list(backend.list("data/")) == []


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("locks/1", b"x")
    backend.put("locks/2", b"y")
    backend.delete("locks/1")
    backend.delete("locks/1")
    backend.delete("never/was")
    assert not backend.exists("locks/1")
    with pytest.raises(NotFound):
        backend.get("locks/1")
    assert list(backend.list("locks/")) == ["locks/2"]
    backend.put("locks/1", b"again")
    assert backend.get("locks/1") == b"again"


def test_large_object(backend: Backend) -> None:
    data = os.urandom(20 * MiB)
    backend.put("data/big", memoryview(data))
    assert backend.size("data/big") == 20 * MiB
    assert backend.get("data/big") == data
    offset = 13 * MiB - 5
    assert backend.get_range("data/big", offset, 2 * MiB) == data[offset : offset + 2 * MiB]
    assert backend.get_range("data/big", 20 * MiB - 3, MiB) == data[-3:]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(backend: Backend, name: str) -> None:
    for call in (
        lambda: backend.put(name, b"x"),
        lambda: backend.get(name),
        lambda: backend.get_range(name, 0, 1),
        lambda: backend.size(name),
        lambda: backend.exists(name),
        lambda: backend.delete(name),
    ):
        with pytest.raises(InvalidName):
            call()
    assert list(backend.list()) == []


def test_unusual_valid_names(backend: Backend) -> None:
    for name in GOOD_NAMES:
        backend.put(name, name.encode())
    for name in GOOD_NAMES:
        assert backend.get(name) == name.encode()
    assert sorted(backend.list()) == sorted(GOOD_NAMES)


def test_concurrent_puts(backend: Backend) -> None:
    """Threads putting distinct names all land; threads racing on one name leave exactly
    one of their versions, whole."""
    versions = [bytes([i]) * (64 * 1024 + i) for i in range(16)]

    def work(i: int) -> None:
        backend.put(f"data/{i:02x}/own", versions[i])
        backend.put("shared/object", versions[i])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))
    for i in range(16):
        assert backend.get(f"data/{i:02x}/own") == versions[i]
    assert backend.get("shared/object") in versions
    assert len(list(backend.list())) == 17


def test_readers_never_see_a_torn_object(backend: Backend) -> None:
    """A reader running while the object is overwritten sees one version or the other."""
    first, second = b"A" * MiB, b"B" * (MiB + 4096)
    backend.put("snapshots/x", first)
    done = threading.Event()
    seen: list[bytes] = []

    def read() -> None:
        while not done.is_set():
            seen.append(backend.get("snapshots/x"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            backend.put("snapshots/x", second if i % 2 == 0 else first)
    finally:
        done.set()
        reader.join()
    assert seen
    assert all(data in (first, second) for data in seen)


def test_close_is_idempotent(backend: Backend) -> None:
    backend.close()
    backend.close()


# ====================================================================== local


def test_local_put_is_durable_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put fsyncs the file and the directories it made and renamed in."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    backend = LocalBackend(tmp_path / "repo")
    backend.put("data/3f/3f00", b"chunk")
    # the file, the directory it was renamed in, and tmp/repo, repo/data, repo/data/3f made
    assert len(synced) >= 5
    assert sorted(p.name for p in (tmp_path / "repo/data/3f").iterdir()) == ["3f00"]
    assert (tmp_path / "repo/data/3f/3f00").read_bytes() == b"chunk"


def test_local_failed_put_keeps_the_old_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("config", b"old")

    def replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError, match="config: cannot store: No space left on device"):
        backend.put("config", b"new")
    monkeypatch.undo()
    assert backend.get("config") == b"old"
    assert os.listdir(tmp_path) == ["config"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o277])
def test_local_makes_private_files_and_directories_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Issue 13 item 7: repository files were 0644 and directories 0755 (the key file
    invites an offline password guess). Everything the backend makes is 0600 / 0700 –
    the root and the parents it makes too – whatever the umask; what existed keeps its
    mode."""
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing").chmod(0o755)
    old = os.umask(umask)
    try:
        backend = LocalBackend(tmp_path / "existing" / "made" / "repo")
        for name in ("config", "keys/0123", "data/3f/3f00", "data/3f/3f01"):
            backend.put(name, b"x")
        backend.put("config", b"overwritten")
    finally:
        os.umask(old)
    made = [tmp_path / "existing" / "made", *(tmp_path / "existing" / "made").rglob("*")]
    modes = {str(p.relative_to(tmp_path / "existing")): stat.S_IMODE(p.stat().st_mode) for p in made}
    assert modes == {
        "made": 0o700,
        "made/repo": 0o700,
        "made/repo/config": 0o600,
        "made/repo/keys": 0o700,
        "made/repo/keys/0123": 0o600,
        "made/repo/data": 0o700,
        "made/repo/data/3f": 0o700,
        "made/repo/data/3f/3f00": 0o600,
        "made/repo/data/3f/3f01": 0o600,
    }
    assert stat.S_IMODE((tmp_path / "existing").stat().st_mode) == 0o755  # not the backend's


def test_local_crash_leftovers_are_not_listed(tmp_path: Path) -> None:
    """A temporary file left by a crash between write and rename is no object."""
    backend = LocalBackend(tmp_path)
    backend.put("data/aa/1", b"x")
    (tmp_path / "data/aa/.2.0123456789abcdef.tmp~").write_bytes(b"half")
    (tmp_path / "data/aa/odd name").write_bytes(b"not ours")
    assert list(backend.list()) == ["data/aa/1"]
    backend.put("data/aa/2", b"whole")
    assert sorted(backend.list()) == ["data/aa/1", "data/aa/2"]


def test_local_missing_root_is_an_empty_repository(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "not" / "yet")
    assert list(backend.list()) == []
    assert not backend.exists("config")
    with pytest.raises(NotFound):
        backend.get("config")
    backend.delete("config")
    assert not (tmp_path / "not").exists()
    backend.put("config", b"c")
    assert (tmp_path / "not/yet/config").read_bytes() == b"c"


def test_local_never_escapes_its_root(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    (tmp_path / "secret").write_bytes(b"s")
    for name in ("../secret", "/etc/passwd", "a/../../secret"):
        with pytest.raises(InvalidName):
            backend.get(name)
        with pytest.raises(InvalidName):
            backend.put(name, b"x")
    assert (tmp_path / "secret").read_bytes() == b"s"


def test_local_io_errors_are_storage_errors(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("file", b"x")
    with pytest.raises(StorageError, match="cannot store") as caught:
        backend.put("file/below", b"y")  # "file" is an object, not a directory
    assert not isinstance(caught.value, NotFound)


# ====================================================================== S3


def test_s3_lists_only_its_prefix(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client
    client.put_object(Bucket=bucket, Key="outside", Body=b"x")
    client.put_object(Bucket=bucket, Key="repo-other/config", Body=b"x")
    client.put_object(Bucket=bucket, Key="repo/dir/", Body=b"")  # a console's "folder"
    with S3Backend(bucket, "repo", **s3_server.options()) as backend:
        backend.put("config", b"c")
        assert list(backend.list()) == ["config"]
        assert backend.location == f"s3://{bucket}/repo"
    assert client.get_object(Bucket=bucket, Key="repo/config")["Body"].read() == b"c"
    with S3Backend(bucket, **s3_server.options()) as whole:
        assert sorted(whole.list()) == ["outside", "repo-other/config", "repo/config"]


def test_s3_listing_pages_are_read_by_elementtree_not_botocores_parser(s3_server: S3Server) -> None:
    """Issue 14 item 3: botocore's parser built a dict per listed key and parsed its
    LastModified with dateutil – most of the CPU of listing 10 000 restore points. The
    backend's hook takes each page's keys and sizes (url-decoded: botocore asks for
    url-encoded keys) and botocore parses what is left; a page whose keys the hook took
    but that reaches the backend without them is an error, never an empty listing."""
    bucket = s3_server.create_bucket()
    s3_server.client.put_object(Bucket=bucket, Key="repo/a b+c%d&e", Body=b"xyz")
    with S3Backend(bucket, "repo", **s3_server.options()) as backend:
        backend.put("points/0123456789abcdef", b"x")
        page = backend._client.list_objects_v2(Bucket=backend.bucket, Prefix="repo/")
        assert "Contents" not in page and page["KeyCount"] == 2
        assert sorted(page[s3._LISTED]) == [("repo/a b+c%d&e", 3), ("repo/points/0123456789abcdef", 1)]
        assert list(backend.list_sizes()) == [("points/0123456789abcdef", 1)]  # a b+c… is no name

        def lose(customized_response_dict: dict[str, object], **_: object) -> None:
            customized_response_dict.pop(s3._LISTED, None)  # as a botocore that dropped it

        backend._client.meta.events.register("before-parse.s3.ListObjectsV2", lose)
        with pytest.raises(StorageError, match="a listing page came without its keys"):
            list(backend.list("points/"))


class _Raw:
    """The raw body of an answer made up in a ``before-send`` hook."""

    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self.body


@pytest.mark.parametrize("operation", ["ListObjectsV2", "DeleteObject"])
@pytest.mark.parametrize(
    "body",
    [b"<Error><Code>InternalError</Code><Message>try again</Message></Error>", b"<ListBucketResult><Cont"],
    ids=["error document", "cut short"],
)
def test_s3_an_answer_of_200_with_an_error_or_cut_short_is_retried(
    s3_server: S3Server, operation: str, body: bytes
) -> None:
    """S3 may answer 200 and then an error document (or the connection drops mid-body):
    botocore checks every such answer by parsing it whole; for listing pages the
    backend's own hook makes that check instead (one parse a page, not two), and every
    other operation keeps botocore's. Either way the answer is retried, never read as
    an empty listing or a success."""
    bucket = s3_server.create_bucket()
    with S3Backend(bucket, "repo", **s3_server.options()) as backend:
        backend.put("points/0123456789abcdef", b"x")
        sent: list[str] = []

        def once(request: AWSPreparedRequest, **_: object) -> AWSResponse | None:
            sent.append(request.method)
            if len(sent) > 1:
                return None  # the retry goes to the server
            return AWSResponse(request.url, 200, {}, _Raw(body))

        backend._client.meta.events.register_first(f"before-send.s3.{operation}", once)
        if operation == "ListObjectsV2":
            assert list(backend.list("points/")) == ["points/0123456789abcdef"]
        else:
            backend.delete("points/0123456789abcdef")
            assert list(backend.list("points/")) == []
        assert len(sent) == 2  # the made-up answer, then the retry


def test_s3_missing_bucket_is_not_not_found(s3_server: S3Server) -> None:
    """Reading or listing a missing bucket is ``NoSuchBucket``: one line that says so,
    never NotFound, never retried. A put there is refused too: AWS answers NoSuchBucket,
    SeaweedFS ``AccessDenied`` to keys without its Admin action (with it, it would make
    the bucket) – either way not retried and not NotFound."""
    with S3Backend("no-such-bucket-here", "repo", **s3_server.options()) as backend:
        reads = (lambda: backend.get("config"), lambda: list(backend.list()))
        for call in (*reads, lambda: backend.put("c", b"")):
            with pytest.raises(StorageError) as caught:
                call()
            assert not isinstance(caught.value, NotFound)
            assert not caught.value.retryable  # waiting does not make a bucket
            assert "\n" not in str(caught.value)
            if call in reads:
                assert "bucket 'no-such-bucket-here' does not exist" in str(caught.value)
    assert "no-such-bucket-here" not in [b["Name"] for b in s3_server.client.list_buckets()["Buckets"]]


def test_s3_refusals_are_not_retried_but_an_outage_is(s3_server: S3Server) -> None:
    """A 4xx answer (bad credentials here) stays what it is: open_backend's retries give
    it up at once. An unreachable server is retried for the window, then one line says
    for how long (VMBACKUP_STORAGE_RETRY)."""
    bucket = s3_server.create_bucket()
    wrong = s3_server.options() | {"secret_access_key": "wrong"}
    with open_backend(f"s3://{bucket}/repo", **wrong) as backend:
        with pytest.raises(StorageError) as caught:
            backend.put("config", b"c")
        assert not caught.value.retryable and "tried" not in str(caught.value)
    with refused_port() as port, pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMBACKUP_STORAGE_RETRY", "2")
        options = s3_server.options(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
        with open_backend(f"s3://{bucket}/repo", **options) as backend:
            assert isinstance(backend, RetryBackend) and backend.window == 2
            with pytest.raises(StorageError) as caught:
                backend.get("config")
    message = str(caught.value)
    assert "\n" not in message and "cannot read" in message and "tried" in message, message


def test_s3_unreachable_endpoint_is_one_line() -> None:
    with refused_port() as port:
        backend = S3Backend(
            "bucket",
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id="a",
            secret_access_key="b",
            max_attempts=1,
            connect_timeout=2,
        )
        with backend, pytest.raises(StorageError) as caught:
            backend.get("config")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("s3://bucket/config: cannot read")
    assert f"127.0.0.1:{port}" in message
    assert caught.value.retryable


def test_s3_configured_from_environment(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.create_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["access_key_id"])  # checked: a real server
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with open_backend(f"s3://{bucket}/some/prefix/") as backend:
        assert isinstance(backend, RetryBackend) and isinstance(
            backend.inner, S3Backend
        )  # outages ridden out
        assert backend.location == f"s3://{bucket}/some/prefix"
        assert backend.inner.endpoint_url == s3_server.endpoint_url
        backend.put("config", b"env")
    assert s3_server.client.get_object(Bucket=bucket, Key="some/prefix/config")["Body"].read() == b"env"


# ====================================================================== open_backend


def test_open_backend_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_backend(str(tmp_path / "a")).location == str(tmp_path / "a")
    assert open_backend(f"file://{tmp_path}/b").location == str(tmp_path / "b")
    assert open_backend(f"file://localhost{tmp_path}/c").location == str(tmp_path / "c")
    assert open_backend("relative").location == str(tmp_path / "relative")
    assert isinstance(open_backend("relative"), LocalBackend)


@pytest.mark.parametrize(
    ("location", "options", "message"),
    [
        ("ftp://host/x", {}, "unknown storage scheme 'ftp'"),
        ("s3://", {}, "invalid S3 URL"),
        ("s3:///prefix", {}, "invalid S3 URL"),
        ("s3://bucket/../up", {}, "invalid S3 URL"),
        ("s3://bucket/p", {"colour": "blue"}, "bad S3 options"),
        ("file://host/x", {}, "file:///absolute/path"),
        ("/srv/repo", {"endpoint_url": "http://x"}, "takes no options"),
        ("", {}, "no repository location"),
    ],
)
def test_open_backend_refuses(location: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(StorageError, match=message):
        open_backend(location, **options)


# ====================================================================== faults


def test_bit_flip_changes_one_bit_of_chosen_objects() -> None:
    inner = MemoryBackend()
    data = os.urandom(4096)
    inner.put("data/bad", data)
    inner.put("data/good", data)
    inner.put("data/empty", b"")
    backend = BitFlipBackend(inner, names={"data/bad", "data/empty"})
    read = backend.get("data/bad")
    assert read != data and len(read) == len(data)
    difference = int.from_bytes(read, "big") ^ int.from_bytes(data, "big")
    assert difference.bit_count() == 1
    assert backend.get("data/bad") == read  # the same bit on every read
    bit = backend.bit("data/bad", len(data))
    around = max(0, bit // 8 - 10)
    assert backend.get_range("data/bad", around, 20) == read[around : around + 20]
    assert backend.get_range("data/bad", 0, len(data)) == read
    assert backend.get("data/good") == data
    assert backend.get("data/empty") == b""
    assert inner.get("data/bad") == data  # what is stored is intact
    assert backend.flipped == {"data/bad"}


def test_bit_flip_rate() -> None:
    inner = MemoryBackend()
    names = [f"data/{i:04d}" for i in range(400)]
    for name in names:
        inner.put(name, name.encode())
    backend = BitFlipBackend(inner, rate=0.25, seed=7)
    corrupt = {name for name in names if backend.get(name) != name.encode()}
    assert 50 < len(corrupt) < 150
    assert corrupt == backend.flipped
    again = BitFlipBackend(inner, rate=0.25, seed=7)
    assert {name for name in names if again.get(name) != name.encode()} == corrupt
    everything = BitFlipBackend(inner, rate=1.0)
    assert all(everything.get(name) != name.encode() for name in names)
    with pytest.raises(ValueError):
        BitFlipBackend(inner, rate=1.5)


def test_failing_backend_crashes_after_n_puts() -> None:
    inner = MemoryBackend()
    backend = FailingBackend(inner, fail_after_n_puts=3)
    for i in range(3):
        backend.put(f"data/{i}", b"x")
    with pytest.raises(SimulatedCrash, match="simulated crash") as caught:
        backend.put("data/3", b"x")
    assert isinstance(caught.value, StorageError) and not caught.value.retryable
    assert backend.crashed and backend.puts == 3
    with pytest.raises(SimulatedCrash):
        backend.delete("data/0")
    with pytest.raises(SimulatedCrash):
        backend.put("data/4", b"x")
    assert sorted(inner.list()) == ["data/0", "data/1", "data/2"]
    assert backend.get("data/0") == b"x"  # reads go on after the crash
    assert sorted(backend.list()) == ["data/0", "data/1", "data/2"]


def test_failing_backend_counts_concurrent_puts_exactly() -> None:
    inner = MemoryBackend()
    backend = FailingBackend(inner, fail_after_n_puts=50)
    crashes = 0
    lock = threading.Lock()

    def put(i: int) -> None:
        nonlocal crashes
        try:
            backend.put(f"data/{i}", b"x")
        except SimulatedCrash:
            with lock:
                crashes += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(80)))
    assert len(list(inner.list())) == 50 and crashes == 30


# ====================================================================== retry


class Flaky(MemoryBackend):
    """Memory whose next *failures* calls (any method) fail with *error*."""

    def __init__(self, failures: int, error: StorageError | None = None):
        super().__init__()
        self.failures = failures
        self.calls = 0
        self.error = error or StorageError("flaky: connection reset")

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise self.error

    def put(self, name: str, data: bytes | memoryview) -> None:
        self._maybe_fail()
        super().put(name, data)

    def get(self, name: str) -> bytes:
        self._maybe_fail()
        return super().get(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        names = sorted(super().list(prefix))
        yield names[0]
        self._maybe_fail()  # fail after the first name, to make the retry resume
        yield from names[1:]

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        found = sorted(super().list_sizes(prefix))
        yield found[0]
        self._maybe_fail()
        yield from found[1:]


def test_retry_retries_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    inner = Flaky(failures=3)
    sleeps: list[float] = []
    backend = RetryBackend(inner, attempts=5, initial_delay=0.5, jitter=0.0, sleep=sleeps.append)
    with caplog.at_level(logging.INFO, logger="agentless.backup.storage.retry"):
        backend.put("config", b"c")
    assert inner.calls == 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert backend.get("config") == b"c"
    retries = [r.levelno for r in caplog.records if "put config failed" in r.getMessage()]
    assert retries == [logging.WARNING, logging.INFO, logging.INFO]  # an outage is one warning


def test_retry_within_a_window() -> None:
    """With a window, a call is not tried again once the next attempt would start more
    than that long after its first failure; the error then says how long it was tried."""
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    inner = Flaky(failures=100)
    backend = RetryBackend(
        inner,
        attempts=1000,
        initial_delay=1.0,
        max_delay=4.0,
        jitter=0.0,
        window=10.0,
        sleep=sleep,
        clock=lambda: now[0],
    )
    with pytest.raises(StorageError, match=r"flaky: connection reset; tried 4 times over 7 s$"):
        backend.get("config")  # a fifth attempt would start 11 s after the first failure
    assert sleeps == [1.0, 2.0, 4.0] and inner.calls == 4
    inner.failures = 3  # an outage shorter than the window: ridden out
    backend.put("config", b"c")
    assert backend.get("config") == b"c"


def test_retry_gives_up_after_attempts() -> None:
    inner = Flaky(failures=100)
    sleeps: list[float] = []
    backend = RetryBackend(
        inner, attempts=4, initial_delay=1.0, max_delay=3.0, jitter=0.0, sleep=sleeps.append
    )
    with pytest.raises(StorageError, match="flaky: connection reset"):
        backend.get("config")
    assert inner.calls == 4
    assert sleeps == [1.0, 2.0, 3.0]  # doubling, capped at max_delay


def test_retry_jitter_stays_within_bounds() -> None:
    sleeps: list[float] = []
    inner = Flaky(failures=6)
    backend = RetryBackend(inner, attempts=7, initial_delay=1.0, max_delay=8.0, sleep=sleeps.append)
    backend.put("x", b"")
    for failures, slept in enumerate(sleeps, start=1):
        assert 0.75 * backend.delay(failures) <= slept <= 1.25 * backend.delay(failures)


@pytest.mark.parametrize("error", [NotFound("gone"), InvalidName("bad"), SimulatedCrash("crash")])
def test_retry_does_not_retry_permanent_errors(error: StorageError) -> None:
    inner = Flaky(failures=1, error=error)
    sleeps: list[float] = []
    backend = RetryBackend(inner, sleep=sleeps.append)
    with pytest.raises(type(error)):
        backend.get("config")
    assert inner.calls == 1 and sleeps == []


def test_retry_list_resumes_without_duplicates() -> None:
    inner = Flaky(failures=2)
    for i in range(5):
        MemoryBackend.put(inner, f"data/{i}", b"")
    sleeps: list[float] = []
    backend = RetryBackend(inner, attempts=3, jitter=0.0, sleep=sleeps.append)
    assert list(backend.list("data/")) == [f"data/{i}" for i in range(5)]
    assert len(sleeps) == 2
    inner.failures = 2
    assert list(backend.list_sizes("data/")) == [(f"data/{i}", 0) for i in range(5)]
    assert len(sleeps) == 4


def test_an_s3_location_names_its_own_server_and_profile(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``s3://bucket/prefix?endpoint=URL&profile=NAME``: the location's server wins over
    ``AWS_ENDPOINT_URL`` (here a port nobody listens on) and the profile's keys over none
    in the environment – one process reaches two S3 clusters, a repository and its
    off-site copy. Another option, or an endpoint that is not http(s), is one clear error."""
    bucket = s3_server.create_bucket()
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[site-b]\n"
        f"aws_access_key_id = {S3_CREDENTIALS['access_key_id']}\n"
        f"aws_secret_access_key = {S3_CREDENTIALS['secret_access_key']}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{refused_port()}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("VMBACKUP_STORAGE_RETRY", "0")
    location = f"s3://{bucket}/repo?endpoint={s3_server.endpoint_url}&profile=site-b"
    with open_backend(location) as backend:
        backend.put("config", b"here")
        assert backend.get("config") == b"here"
    assert s3_server.client.get_object(Bucket=bucket, Key="repo/config")["Body"].read() == b"here"
    with open_backend(f"s3://{bucket}/repo") as elsewhere, pytest.raises(StorageError, match="endpoint"):
        elsewhere.get("config")  # AWS_ENDPOINT_URL's server: nobody there
    for wrong in ("?region=x", "?endpoint=ftp://h:1", "?endpoint=", "?profile=a&profile=b"):
        with pytest.raises(StorageError, match="S3 URL option"):
            open_backend(f"s3://{bucket}/repo{wrong}")
