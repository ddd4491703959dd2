"""The file browser's pure parts: what a request may name (paths, partitions), the
download's name, the bounded hand-over of bytes from the reading thread (the tar
archive: test_tarstream.py; the pages in chromium: test_console_points.py)."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from agentless.backup.consolefiles import (
    DEPTH,
    BadRequest,
    _Stream,
    attachment,
    clean_partition,
    clean_path,
)
from agentless.backup.errors import VmbackupError


@pytest.mark.parametrize(
    ("given", "clean"),
    [
        ("/", "/"),
        ("/etc", "/etc"),
        ("/etc/", "/etc"),
        ("/a b/ü文件", "/a b/ü文件"),
        ("/.hidden/x", "/.hidden/x"),
    ],
)
def test_paths_from_the_root_are_taken(given: str, clean: str) -> None:
    assert clean_path(given) == clean


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("etc/passwd", "starting with /"),
        ("", "starting with /"),
        ("/etc/../root", "'..'"),
        ("/..", "'..'"),
        ("/./etc", "'.'"),
        ("//etc", "empty"),
        ("/etc//passwd", "empty"),
        ("/a\0b", "NUL"),
        ("/" + "a" * 4096, "4096"),
    ],
)
def test_paths_that_could_surprise_are_refused_in_one_line(given: str, says: str) -> None:
    with pytest.raises(BadRequest, match=None) as refused:
        clean_path(given)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_partitions_are_numbers_or_logical_volumes() -> None:
    assert clean_partition("0") == 0 and clean_partition("12") == 12
    assert clean_partition("vg0/root") == "vg0/root" and clean_partition("my_vg/lv.1+x") == "my_vg/lv.1+x"
    for bad in (
        "",
        "-1",
        "1e3",
        "x/../y",
        "../etc",
        "vg/-lv",
        "vg/lv/more",
        "a b/c",
        "99999",
        "./lv",
        "vg/..",
    ):
        with pytest.raises(BadRequest, match="partition"):
            clean_partition(bad)


@pytest.mark.parametrize(
    "name", ["data.bin", 'evil"; x=y\r\nSet-Cookie: a=b', "Ünïcødé 文件.txt", "..", "résumé .pdf"]
)
def test_the_attachment_header_is_ascii_and_names_the_file_exactly(name: str) -> None:
    header = attachment(name)
    header.encode("ascii")  # a header is ASCII
    assert "\r" not in header and "\n" not in header
    head, fallback, exact = header.split("; ")
    assert head == "attachment"
    assert fallback.startswith('filename="') and '"' not in fallback[len('filename="') : -1]
    assert not fallback[len('filename="') :].startswith(".")
    assert urllib.parse.unquote(exact.removeprefix("filename*=UTF-8''")) == name


def test_the_stream_holds_a_bounded_number_of_pieces_and_stops_when_the_client_goes() -> None:
    sent: list[int] = []
    finished = threading.Event()

    def produce(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        ready({"content-length": "?"})
        try:
            for number in range(100_000):
                send(b"x" * 10)
                sent.append(number)
        finally:
            finished.set()

    stream = _Stream(produce)
    assert stream.start() == {"content-length": "?"}
    chunks = stream.chunks()
    assert [next(chunks) for _ in range(3)] == [b"x" * 10] * 3
    time.sleep(0.3)
    assert len(sent) <= DEPTH + 4  # the reader waits for the client: nothing piles up
    chunks.close()  # the client went away
    assert finished.wait(5) and len(sent) < 100


def test_an_error_before_the_answer_is_the_requests_and_after_it_cuts_the_download() -> None:
    def refuse(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        raise BadRequest("/etc: a dir, not a file")

    with pytest.raises(BadRequest, match="not a file"):
        _Stream(refuse).start()

    def fail_midway(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        ready({})
        send(b"first")
        raise VmbackupError("a chunk does not check")

    stream = _Stream(fail_midway)
    stream.start()
    chunks = stream.chunks()
    assert next(chunks) == b"first"
    with pytest.raises(VmbackupError, match="does not check"):
        next(chunks)


def test_a_download_nobody_reads_stops_after_its_idle_time() -> None:
    finished = threading.Event()

    def produce(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        ready({})
        try:
            while True:
                send(b"x")
        finally:
            finished.set()

    stream = _Stream(produce, idle=0.3)
    stream.start()  # and the response is dropped: its iterator never runs, never closes
    assert finished.wait(5)


def test_a_producer_that_never_says_ready_is_an_error_not_a_hang() -> None:
    with pytest.raises(VmbackupError, match="nothing to send"):
        _Stream(lambda ready, send: None).start()
