"""Repositories built directly with the library for the housekeeping tests: disks of
random chunks written as a backup engine writes them (chunks, then pages, one writer –
so one pack and one index file – per backup, then the restore point), and a full
restore that reads every blob back."""

from __future__ import annotations

import dataclasses
import random
import secrets
from typing import Any

from agentless.backup.diskindex import DiskIndex
from agentless.backup.points import RestorePoint
from agentless.backup.repository import ZERO, BlobWriter, Repository
from agentless.backup.storage import Backend, BitFlipBackend

CHUNK = 65536


def disk(seed: int, chunks: int = 6, holes: tuple[int, ...] = ()) -> bytearray:
    """A disk image of *chunks* random chunks (all-zero at *holes*)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(chunks * CHUNK))
    for hole in holes:
        data[hole * CHUNK : (hole + 1) * CHUNK] = bytes(CHUNK)
    return data


def changed(image: bytes | bytearray, seed: int, *chunks: int) -> bytearray:
    """*image* with new random content in *chunks*."""
    rng = random.Random(seed)
    data = bytearray(image)
    for chunk in chunks:
        data[chunk * CHUNK : (chunk + 1) * CHUNK] = rng.randbytes(CHUNK)
    return data


@dataclasses.dataclass
class Backup:
    """What one backup stored: its point id, the images, the index file and pack it wrote."""

    point: str
    images: list[bytes]
    index_files: set[str]
    packs: set[str]


def backup(
    repo: Repository,
    vm: str,
    images: list[bytes | bytearray],
    time: str = "2026-11-26T05:00:00Z",
    kind: str = "full",
    writer: BlobWriter | None = None,
) -> Backup:
    """Store *images* as the disks of a restore point of VM *vm* at *time* (with
    *writer*, one opened earlier – as by a backup that started then – if given)."""
    index_before = set(repo.backend.list("index/"))
    packs_before = set(repo.backend.list("data/"))
    disks: list[dict[str, Any]] = []
    with writer or repo.writer() as writer:
        for position, image in enumerate(images):
            index = DiskIndex(repo, len(image))
            view = memoryview(bytes(image))
            for chunk in range(index.chunks):
                piece = view[chunk * CHUNK : (chunk + 1) * CHUNK]
                index.set(chunk, ZERO if not any(piece) else writer.add(piece))
            pages = index.store(writer)
            disks.append(
                {
                    "position": position,
                    "size": len(image),
                    "chunk_size": repo.chunk_size,
                    "pages": [p.hex() for p in pages],
                    "digest": index.digest,
                }
            )
        writer.flush()
    document = {
        "time": time,
        "vm": {"id": vm, "name": f"vm-{vm}"},
        "backup_id": f"backup-{vm}-{time}",
        "type": kind,
        "disks": disks,
    }
    point = repo.save_point(RestorePoint.model_validate(document))
    return Backup(
        point,
        [bytes(i) for i in images],
        set(repo.backend.list("index/")) - index_before,
        set(repo.backend.list("data/")) - packs_before,
    )


def restore(repo: Repository, point_id: str) -> list[bytes]:
    """Every disk of a restore point, read blob by blob (each checked) and its digest
    compared."""
    point = repo.load_point(point_id)
    images = []
    for described in point.disks:
        index = DiskIndex.of_point(repo, described)
        assert index.digest == described.digest
        image = bytearray(index.size)
        for first, _, ids in index.runs():
            for n, blob in enumerate(ids):
                if blob != ZERO:
                    start = (first + n) * CHUNK
                    image[start : start + CHUNK] = repo.read_blob(blob)
        images.append(bytes(image))
    return images


def chunk_ids(repo: Repository, point_id: str) -> set[bytes]:
    """The chunk ids (no holes) of a restore point."""
    found: set[bytes] = set()
    for described in repo.load_point(point_id).disks:
        for _, _, ids in DiskIndex.of_point(repo, described).runs():
            found.update(i for i in ids if i != ZERO)
    return found


def page_ids(repo: Repository, point_id: str) -> set[bytes]:
    return {
        bytes.fromhex(p)
        for described in repo.load_point(point_id).disks
        for p in described.pages
        if bytes.fromhex(p) != ZERO
    }


def flipping(inner: Backend, name: str, start: int, end: int) -> BitFlipBackend:
    """A BitFlipBackend whose one flipped bit lies in bytes [start, end) of object *name*."""
    size = inner.size(name)
    for seed in range(100000):
        flip = BitFlipBackend(inner, names={name}, seed=seed)
        if start <= flip.bit(name, size) // 8 < end:
            return flip
    raise AssertionError(f"no seed flips a bit in {name}[{start}:{end}]")


def reopen(backend: Backend, password: str | None = None) -> Repository:
    """The repository on *backend* opened afresh (no cached index)."""
    return Repository.open(backend, password)


def point_record(vm: str, day: int, hour: int = 5, kind: str = "full") -> RestorePoint:
    """A restore point of VM *vm* made on day *day* of November 2026 at *hour*, one disk,
    random page and digest ids: what the catalog tests save (also from other processes)."""
    return RestorePoint.model_validate(
        {
            "time": f"2026-11-{day:02d}T{hour:02d}:00:00.000000Z",
            "vm": {"id": f"id-{vm}", "name": vm, "uuid": f"uuid-{vm}", "host": "host-1"},
            "backup_id": secrets.token_hex(8),
            "type": kind,
            "base": None,
            "consistency": "offline",
            "disks": [
                {
                    "position": 0,
                    "size": 4 << 20,
                    "chunk_size": 65536,
                    "pages": [secrets.token_hex(32) for _ in range(3)],
                    "digest": secrets.token_hex(32),
                    "type": kind,
                    "reason": None,
                    "read": 65536,
                }
            ],
            "stats": {"read": 65536, "stored": 1000, "new": 1, "deduplicated": 0},
        }
    )
