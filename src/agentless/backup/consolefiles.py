"""File-level restore in the backup console: a restore point's disks, their partitions
and file systems, a directory's entries, one file downloaded, a folder downloaded as a
tar archive – the machinery of ``vmbackup files`` (:mod:`.filescli`) behind HTTPS.

Every page and download is an operator's (``operate``): a file's bytes are the VM's
data. The guest's bytes are parsed by an :class:`.fsworker.FsWorker` (a child process
under resource limits) over a :class:`.diskview.DiskView` of the disk, under a shared
lock of the repository, as the CLI does.

**What a request may name.** ``disk``: a position of the point's disks; ``partition``: a
number as the disks page shows it (0: the whole disk) or a logical volume ``VG/LV``;
``path``: ``/``-separated from the file system's root, without ``.``, ``..``, empty
components, NUL or more than :data:`MAX_PATH` bytes (:func:`clean_path`). Anything else
is one line, 400; what the guest's file system does not hold is one line, 404.

**Downloads are streamed**, never held in memory: a worker thread opens the repository
and the worker, and passes the file's pieces (64 KiB, as the worker sends them) through
a queue of :data:`DEPTH` pieces to the response; a client that goes away stops the
thread and kills the worker. A file is sent with its exact ``Content-Length`` and a
``Content-Disposition: attachment`` whose name is made safe (:func:`attachment`). A
folder is sent as a **tar archive** (POSIX pax: long and Unicode names kept; regular
files, directories and symbolic links; other kinds and names a tar cannot carry safely
left out), built on the fly (:mod:`.tarstream`): the folder is listed first into a
temporary file (a folder may hold millions of entries), which also gives the archive's
exact length, then each file is read and sent behind its header. Tar, not zip: every
size is known before a member's header is written, so nothing is buffered or seeked,
and ``tar`` and 7-Zip read it everywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import queue
import re
import signal
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from agentless.console import Console, Session

from .catalog import CatalogError
from .consolesite import ConsoleSite, problem
from .diskview import DiskView
from .errors import CorruptError, RepositoryError, VmbackupError
from .fsworker import FsWorker, FsWorkerError
from .locks import LockedError
from .pointdisk import PointDisk
from .storage import StorageError
from .tarstream import tar_length, tar_members, tar_stream

__all__ = [
    "DEPTH",
    "IDLE",
    "MAX_PATH",
    "PAGE",
    "BadRequest",
    "add_pages",
    "attachment",
    "clean_partition",
    "clean_path",
    "status_of",
]

MAX_PATH = 4096  # bytes of a path a request may name (Linux's PATH_MAX)
PAGE = 500  # entries of a directory shown per page
DEPTH = 16  # pieces (64 KiB each) between the reading thread and the response
IDLE = 120.0  # seconds a download may wait for its client to take a piece
_VOLUME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")


class BadRequest(ValueError):
    """A request named something it may not (a malformed path, partition or disk): 400."""


def clean_path(text: str) -> str:
    """*text* as a path from the file system's root (``/a/b``; ``/`` for the root), or
    :class:`BadRequest` saying what is wrong with it."""
    if not text.startswith("/"):
        raise BadRequest(f"path {text[:80]!r}: give it from the root, starting with /")
    if "\0" in text or len(text.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise BadRequest("path: NUL or longer than 4096 bytes")
    parts = text.split("/")[1:]
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash: a directory
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequest(f"path {text[:80]!r}: empty, '.' and '..' components are not followed")
    return "/" + "/".join(parts)


def clean_partition(text: str) -> int | str:
    """A partition's number (0: the whole disk) or a logical volume ``VG/LV``."""
    if re.fullmatch(r"[0-9]{1,4}", text):
        return int(text)
    if _VOLUME.fullmatch(text) and len(text) <= 256 and not {".", ".."} & set(text.split("/")):
        return text  # LVM's names: neither "." nor ".." (lvm(8), VALID NAMES)
    raise BadRequest(f"partition {text[:40]!r}: neither a partition number nor VG/LV")


def attachment(name: str) -> str:
    """A ``Content-Disposition`` that saves as *name* (RFC 6266): an ASCII fallback with
    only letters, digits, ``._-`` and the exact name percent-encoded in ``filename*``."""
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


# ---------------------------------------------------------------------- streaming


class _Gone(Exception):
    """The client went away: the reading thread stops."""


_DONE = object()


class _Stream:
    """Bytes made by *produce* in a thread of its own, handed to the response through a
    bounded queue. *produce(ready, send)* calls ``ready(headers)`` once it knows the
    answer can be given (before any ``send``); an expected error before that is the
    request's problem (:meth:`start` raises it), after it the download is cut.

    The thread stops when the response's iterator is closed (the client went away), and
    in any case when nobody took a piece for *idle* seconds (a response dropped without
    closing its iterator must not hold a worker and a repository lock for ever)."""

    def __init__(
        self,
        produce: Callable[[Callable[[dict[str, str]], None], Callable[[Any], None]], None],
        idle: float = IDLE,
    ):
        self._queue: queue.Queue[Any] = queue.Queue(DEPTH)
        self._stop = threading.Event()
        self._ready: queue.Queue[dict[str, str] | BaseException] = queue.Queue(1)
        self._produce = produce
        self._idle = idle

    def start(self) -> dict[str, str]:
        """Start the thread; the headers it is ready with, or its error."""
        threading.Thread(target=self._run, name="console-download", daemon=True).start()
        first = self._ready.get()
        if isinstance(first, BaseException):
            raise first
        return first

    def _put(self, item: Any) -> None:
        deadline = time.monotonic() + self._idle
        while not self._stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=min(0.5, self._idle))
                return
        raise _Gone()

    def _run(self) -> None:
        told = False

        def ready(headers: dict[str, str]) -> None:
            nonlocal told
            told = True
            self._ready.put(headers)

        try:
            self._produce(ready, lambda data: self._put(bytes(data)) if data else None)
            if not told:
                raise VmbackupError("nothing to send")
            self._put(_DONE)
        except _Gone:
            pass
        except BaseException as error:
            if not told:
                self._ready.put(error)
            else:
                with contextlib.suppress(_Gone):
                    self._put(error)

    def chunks(self) -> Iterator[bytes]:
        """The bytes, as the response sends them; raises (cutting the download) if the
        thread failed midway."""
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()


@contextlib.contextmanager
def _worker(site: ConsoleSite, location: str | None, point_id: str, disk: int) -> Iterator[FsWorker]:
    """A worker over disk *disk* of the point, under a shared lock of the repository;
    killed on the way out if still busy (a client gone mid-file)."""
    with site.repository(location) as repository, repository.lock("shared", "console files"):
        point = repository.load_point(point_id)
        source = PointDisk(repository, point, disk)
        with DiskView(source) as view, FsWorker(view, view.size) as worker:
            try:
                yield worker
            except BaseException:
                if worker.pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(worker.pid, signal.SIGKILL)
                raise


# ---------------------------------------------------------------------- the pages


_EXPECTED = (VmbackupError, StorageError, KeyError, ValueError, OSError)


def status_of(error: BaseException) -> tuple[int, str]:
    """How a request that failed is answered: (HTTP status, one line). 400: the request
    named something malformed; 404: something that is not there (a repository the
    console does not know, a restore point, a disk, a path of the guest's); 409: a lock
    another process holds; 503: the repository or the worker failed."""
    if isinstance(error, BadRequest):
        return 400, str(error)
    if isinstance(error, KeyError):
        text = str(error.args[0]) if error.args else ""
        return 404, text if " " in text else f"unknown repository {text!r}"
    if isinstance(error, LockedError):
        return 409, str(error)
    if isinstance(error, FsWorkerError) or (
        isinstance(error, RepositoryError) and not isinstance(error, CorruptError | CatalogError)
    ):
        return 404, str(error)
    if isinstance(error, ValueError):
        return 400, str(error)
    return 503, str(error) or type(error).__name__


def add_pages(console: Console, site: ConsoleSite) -> None:
    """``/points/{id}/files`` (disks, volumes, a directory), ``…/files/download`` (one
    file) and ``…/files/archive`` (a folder as tar)."""
    operator = console.page("operate")

    @console.router.get("/points/{point_id}/files", response_class=HTMLResponse)
    def files(
        request: Request,
        point_id: str,
        repo: str = "",
        disk: str = "",
        partition: str = "",
        path: str = "/",
        start: int = 0,
        session: Session = Depends(operator),
    ) -> Response:
        try:
            where = clean_where(disk, partition, path) if disk else None
            context = _listing(site, repo or None, point_id, where, max(0, start))
        except (BadRequest, *_EXPECTED) as error:
            return problem(console, request, session, *status_of(error))
        return console.render(
            request, session, "backup/files.html", heading=f"Files of {point_id}", repo=repo, **context
        )

    def streamed(
        request: Request, session: Session, produce: Any, what: str, point_id: str, media_type: str
    ) -> Response:
        try:
            stream = _Stream(produce())
            headers = stream.start()
        except (BadRequest, *_EXPECTED) as error:
            return problem(console, request, session, *status_of(error))
        site.log(f"console: {session.identity.name} downloads {what} of restore point {point_id}")
        return StreamingResponse(stream.chunks(), media_type=media_type, headers=headers)

    @console.router.get("/points/{point_id}/files/download")
    def download(
        request: Request,
        point_id: str,
        disk: str,
        partition: str,
        path: str,
        repo: str = "",
        session: Session = Depends(operator),
    ) -> Response:
        try:
            number, volume, where = clean_where(disk, partition, path)
        except BadRequest as error:
            return problem(console, request, session, *status_of(error))
        produce = functools.partial(_file_producer, site, repo or None, point_id, number, volume, where)
        return streamed(request, session, produce, where, point_id, "application/octet-stream")

    @console.router.get("/points/{point_id}/files/archive")
    def archive(
        request: Request,
        point_id: str,
        disk: str,
        partition: str,
        path: str,
        repo: str = "",
        session: Session = Depends(operator),
    ) -> Response:
        try:
            number, volume, where = clean_where(disk, partition, path)
        except BadRequest as error:
            return problem(console, request, session, *status_of(error))
        produce = functools.partial(_archive_producer, site, repo or None, point_id, number, volume, where)
        return streamed(request, session, produce, f"folder {where}", point_id, "application/x-tar")


def clean_where(disk: str, partition: str, path: str) -> tuple[int, int | str, str]:
    """(disk position, partition, path) of a request, each checked."""
    if not re.fullmatch(r"[0-9]{1,3}", disk):
        raise BadRequest(f"disk {disk[:20]!r}: give a disk position (0, 1, …)")
    return int(disk), clean_partition(partition or "0"), clean_path(path or "/")


def _listing(
    site: ConsoleSite,
    location: str | None,
    point_id: str,
    where: tuple[int, int | str, str] | None,
    start: int,
) -> dict[str, Any]:
    """The files page's context: every disk's volumes (no *where*), or one directory's
    entries from *start* (:data:`PAGE` of them, in the file system's order)."""
    with site.repository(location) as repository, repository.lock("shared", "console files"):
        point = repository.load_point(point_id)
        if where is None:
            disks = []
            for stored in point.disks:
                source = PointDisk(repository, point, stored.position)
                with DiskView(source) as view, FsWorker(view, view.size) as worker:
                    try:
                        found = worker.call("probe")
                    except FsWorkerError as error:
                        found = {"error": str(error)}
                disks.append({"disk": stored.position, "size": source.size, **found})
            return {"point": point, "disks": disks, "where": None, "entries": [], "total": 0, "start": 0}
        number, volume, path = where
        shown: list[dict[str, Any]] = []
        total = 0

        def take(batch: list[dict[str, Any]]) -> None:
            nonlocal total
            for entry in batch:
                if start <= total < start + PAGE:
                    mtime = entry.get("mtime")
                    entry["when"] = None if mtime is None else _iso(int(mtime))
                    shown.append(entry)
                total += 1

        source = PointDisk(repository, point, number)
        with DiskView(source) as view, FsWorker(view, view.size) as worker:
            top = worker.call("stat", partition=volume, path=path)
            if top.get("type") != "dir":
                raise BadRequest(f"{path}: a {top.get('type')}, not a directory")
            worker.call("list", on_items=take, partition=volume, path=path, recursive=False)
    crumbs = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts) + 1):
        crumbs.append(("/" + "/".join(parts[:depth]), parts[depth - 1] if depth else "/"))
    return {
        "point": point,
        "disks": [],
        "where": {"disk": number, "partition": volume, "path": path},
        "crumbs": crumbs,
        "entries": shown,
        "total": total,
        "start": start,
        "page": PAGE,
    }


def _iso(nanoseconds: int) -> str | None:
    """A file's mtime (ns since the epoch) as ISO 8601 UTC; None when out of range."""
    try:
        moment = datetime.datetime.fromtimestamp(nanoseconds / 1e9, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="seconds")


Ready = Callable[[dict[str, str]], None]
Send = Callable[[Any], None]


def _file_producer(
    site: ConsoleSite, location: str | None, point_id: str, disk: int, volume: int | str, path: str
) -> Callable[[Ready, Send], None]:
    def produce(ready: Ready, send: Send) -> None:
        with _worker(site, location, point_id, disk) as worker:
            found = worker.call("stat", partition=volume, path=path)
            if found.get("type") != "file":
                raise BadRequest(f"{path}: a {found.get('type')}, not a file")
            size = int(found["size"])
            name = path.rsplit("/", 1)[-1]
            ready({"content-length": str(size), "content-disposition": attachment(name)})
            sent = 0

            def counted(data: bytes | bytearray) -> None:
                nonlocal sent
                sent += len(data)
                send(data)

            worker.call("read", on_bytes=counted, partition=volume, path=path, inode=found["inode"])
            if sent != size:
                raise VmbackupError(f"{path}: {sent} bytes read, {size} listed")

    return produce


def _archive_producer(
    site: ConsoleSite, location: str | None, point_id: str, disk: int, volume: int | str, path: str
) -> Callable[[Ready, Send], None]:
    def produce(ready: Ready, send: Send) -> None:
        with _worker(site, location, point_id, disk) as worker, tempfile.TemporaryFile("w+") as spill:
            top = worker.call("stat", partition=volume, path=path)
            if top.get("type") != "dir":
                raise BadRequest(f"{path}: a {top.get('type')}, not a directory")
            spill.write(json.dumps(top) + "\n")

            def write(batch: list[dict[str, Any]]) -> None:
                spill.writelines(json.dumps(entry) + "\n" for entry in batch)

            worker.call("list", on_items=write, partition=volume, path=path, recursive=True)
            spill.seek(0)
            length = tar_length(tar_members(path, spill))
            name = (path.rstrip("/").rsplit("/", 1)[-1] or "root") + ".tar"
            ready({"content-length": str(length), "content-disposition": attachment(name)})

            def read(entry: dict[str, Any], out: Callable[[bytes | bytearray], None]) -> None:
                worker.call("read", on_bytes=out, partition=volume, path=entry["path"], inode=entry["inode"])

            spill.seek(0)
            tar_stream(tar_members(path, spill), read, send)

    return produce
