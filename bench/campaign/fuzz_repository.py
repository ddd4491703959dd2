"""Fuzz target: the backup repository's readers of stored bytes – config, key files,
index files, pack trailers, sealed blobs, restore points, condemned lists – through
their public entry points (:meth:`Repository.open`, ``index``, ``points``,
``load_point``, ``condemned``, :func:`~agentless.backup.packs.read_trailer`,
:meth:`Keys.open`, :class:`~agentless.backup.restorejob.PointDisk`,
:func:`~agentless.backup.verify.verify`).

Two real repositories are made once per worker with the library (one plain, one
encrypted; a disk of a few chunks stored, two restore points saved) on the local
backend. An input replaces one object with a mutated copy and runs the readers:

* JSON documents are mutated as JSON (a value of another type or out of range, a key
  removed or added, a list emptied or doubled, hex ids cut or made non-hex) and sealed
  again with the repository's own :meth:`Keys.seal_meta`, so that they get past the
  checksum (anyone who may write an unencrypted repository can do that) – or sealed
  with the encrypted repository's keys, as a holder of the password could;
* or the stored bytes get a few blind edits (which the checksums must catch);
* the config and key files are plain JSON: mutated as JSON, as text, or as bytes.

Checked per input: no exception but ``RepositoryError`` (the package's base, which
``CorruptError`` and ``WrongPassword`` are) and ``StorageError``; ``verify`` (run on a
share of the inputs) raises nothing but ``StorageError``, as it promises.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import random
from pathlib import Path
from typing import Any

from agentless.backup.diskindex import DiskIndex
from agentless.backup.keys import Keys, RepositoryError
from agentless.backup.packs import read_trailer
from agentless.backup.pointdisk import PointDisk
from agentless.backup.points import RestorePoint
from agentless.backup.repository import CacheSettings, Repository
from agentless.backup.storage import LocalBackend, StorageError
from agentless.backup.verify import verify

from .fuzzing import fuzz_outcome, run_target
from .harness import Outcome, Row, Scale
from .mutate import havoc, interesting

__all__ = ["EXPECTED", "ROW", "case", "prepare"]

EXPECTED: tuple[type[BaseException], ...] = (RepositoryError, StorageError)
BOUND = 10.0
PASSWORD = "campaign password"
INDEX_KIND, POINT_KIND, TRAILER_KIND, CONDEMNED_KIND = b"AGVBINDX", b"AGVBPOIN", b"AGVBPTRL", b"AGVBCOND"
# seal_meta(kind, document[, name]): bound to its name since metadata binding (issue 13)
_NAMED = "name" in inspect.signature(Keys.seal_meta).parameters


def _seal(keys: Keys, kind: bytes, document: Any, name: str) -> bytes:
    if _NAMED:
        return keys.seal_meta(kind, document, name)  # type: ignore[call-arg,unused-ignore]
    return keys.seal_meta(kind, document)  # type: ignore[call-arg,unused-ignore]


@dataclasses.dataclass
class _Repo:
    root: Path
    password: str | None
    keys: Keys
    objects: dict[str, bytes]  # name -> pristine bytes
    points: dict[str, dict[str, Any]]  # id -> document
    index_docs: dict[str, dict[str, Any]]  # index name -> document
    trailers: dict[str, list[Any]]  # pack name -> trailer entries
    unlocked: dict[str, Keys]

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def put(self, name: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
        with open(self.path(name), "wb") as f:
            f.write(data)

    def restore(self, changed: set[str]) -> None:
        for name in changed:
            if name in self.objects:
                self.put(name, self.objects[name])
            else:
                os.unlink(self.path(name))

    def open(self) -> Repository:
        # no cache kept between inputs: every index file a mutation touched is parsed (a
        # cache keyed by the files' names would answer from the sound copy it read before)
        return Repository.open(
            LocalBackend(self.root), self.password, unlocked=self.unlocked, cache=CacheSettings(enabled=False)
        )


@dataclasses.dataclass
class _State:
    repos: list[_Repo]


def _make(root: Path, password: str | None, rng: random.Random) -> _Repo:
    repository = Repository.init(str(root), password=password)
    with repository:
        chunk = repository.chunk_size
        size = 5 * chunk + 4096
        index = DiskIndex(repository, size)
        with repository.writer() as writer:
            contents = [
                rng.randbytes(chunk),
                b"text " * (chunk // 5) + b"t",
                bytes(chunk),
                rng.randbytes(chunk),
            ]
            for number, data in enumerate(contents):
                index.set(number, writer.add(data) if any(data) else bytes(32))
            index.set(5, writer.add(rng.randbytes(chunk)))
            pages = index.store(writer)
            writer.flush()
        disk = {
            "position": 0,
            "size": size,
            "chunk_size": chunk,
            "pages": [p.hex() for p in pages],
            "digest": index.digest,
            "type": "full",
            "reason": "first backup",
            "read": size,
        }
        point = {
            "time": "2026-01-01T00:00:00Z",
            "vm": {"id": "vm-1", "name": "campaign"},
            "backup_id": "b-1",
            "type": "full",
            "base": None,
            "consistency": "crash",
            "disks": [disk],
            "stats": {"read": size, "stored": size, "new": size},
        }
        first = repository.save_point(RestorePoint.model_validate(point))
        second = repository.save_point(
            RestorePoint.model_validate(point | {"type": "incremental", "base": first})
        )
        points = {pid: repository.load_point(pid).document() for pid in (first, second)}
        index_docs = {}
        for name in repository.backend.list("index/"):
            packs: dict[str, list[list[object]]] = {}
            for blob, where in repository.read_index_file(name).items():
                packs.setdefault(where.pack, []).append(where.entry(blob))
            index_docs[name] = {"packs": packs}
        trailers = {}
        for name in repository.backend.list("data/"):
            found = read_trailer(repository.keys, name, repository.backend.get(name))
            trailers[name] = [where.entry(blob) for blob, where in found.items()]
        keys = repository.keys
        objects = {name: repository.backend.get(name) for name in repository.backend.list("")}
    return _Repo(root, password, keys, objects, points, index_docs, trailers, {})


def prepare(workdir: Path) -> _State:
    rng = random.Random(1)
    return _State([_make(workdir / "plain", None, rng), _make(workdir / "sealed", PASSWORD, rng)])


# ---------------------------------------------------------------------- JSON mutation

_HEX = "0123456789abcdef"


def _weird(rng: random.Random, old: Any) -> Any:
    pick = rng.randrange(12)
    if pick == 0:
        return rng.choice([None, True, False, [], {}, "", [[]], {"": None}])
    if pick == 1:
        return rng.choice([0, -1, 1, 2**31, 2**32, 2**63, 2**64, -(2**63), 10**30])
    if pick == 2:
        return rng.choice([1.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan")])
    if pick == 3 and isinstance(old, int) and not isinstance(old, bool):
        return interesting(rng, 64, (old,)) - rng.choice((0, 2**63))
    if pick == 4 and isinstance(old, str):
        return rng.choice([old[:-1], old + "0", old.upper(), old[:32], "zz" + old[2:], old * 3, ""])
    if pick == 5:
        return "".join(rng.choice(_HEX) for _ in range(rng.choice((0, 1, 31, 32, 63, 64, 65))))
    if pick == 6:
        return rng.choice(["../../etc/passwd", "data/00/" + "0" * 64, "x" * 5000, "\u0000", "é"])
    if pick == 7:
        return [old] * rng.randrange(2, 5)
    if pick == 8:
        return {"k": old}
    if pick == 9 and isinstance(old, list):
        return old[: rng.randrange(len(old) + 1)]
    if pick == 10:
        return str(old)
    return rng.randrange(-4, 1 << 20)


def _containers(node: Any, found: list[Any]) -> None:
    if isinstance(node, dict | list):
        found.append(node)
        for child in node.values() if isinstance(node, dict) else node:
            _containers(child, found)


def mutate_json(document: Any, rng: random.Random, keep: tuple[str, ...] = ()) -> Any:
    """A mutated deep copy of *document* (keys in *keep* of the top level are mostly
    left alone: an id the binding checks would refuse every input at the first step)."""
    doc = json.loads(json.dumps(document))  # a deep copy, at C speed
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        nodes: list[Any] = []
        _containers(doc, nodes)
        if not nodes or rng.random() < 0.03:
            return _weird(rng, doc)
        node = rng.choice(nodes)
        if isinstance(node, dict):
            keys = [k for k in node if node is not doc or k not in keep or rng.random() < 0.05]
            op = rng.randrange(4)
            if op == 0 and keys:
                del node[rng.choice(keys)]
            elif op == 1:
                node[rng.choice(["extra", "id", "disks", "packs", "size", ""])] = _weird(rng, None)
            elif keys:
                key = rng.choice(keys)
                node[key] = _weird(rng, node[key])
        elif node:
            op = rng.randrange(4)
            i = rng.randrange(len(node))
            if op == 0:
                del node[i]
            elif op == 1:
                node.insert(i, copy.deepcopy(node[i]))
            else:
                node[i] = _weird(rng, node[i])
        else:
            node.append(_weird(rng, None))
    return doc


def _text(rng: random.Random, data: bytes) -> bytes:
    """JSON text mutated as text: nesting, duplicates, literals Python accepts."""
    pick = rng.randrange(5)
    if pick == 0:
        depth = rng.choice((100, 5000, 100000))
        return b"[" * depth + b"]" * depth
    if pick == 1:
        return data.replace(b"{", b'{"magic": 1, ', 1)
    if pick == 2:
        return rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b'"\\ud800"', b"null", b"{}"])
    if pick == 3:
        return data[: rng.randrange(len(data) + 1)]
    return data.replace(b"1", b"9" * rng.randrange(1, 40), 1)


# ---------------------------------------------------------------------- the readers


def _read_points(repository: Repository, rng: random.Random, whole: bool) -> None:
    """Read the restore points as a restore does: every disk of one (or all) of them,
    opened as a PointDisk (which checks it), a few reads, and (*whole*) every run."""
    points = (
        [repository.load_point(p.id) for p in repository.points()]  # summaries: each read whole
        if whole
        else [repository.load_point(rng.choice(_ids(repository)))]
    )
    for point in points:  # checked when read: a malformed point is a CorruptError there
        for position in sorted({d.position for d in point.disks}) or [0]:
            view = PointDisk(repository, point, position)
            for _ in range(2):
                view.read(rng.randrange(max(1, view.size)), rng.choice((1, 4096, 70000)))
            if whole:
                view.allocated()
                for offset, blobs in view.runs():
                    view.fetch(offset, blobs)


def _ids(repository: Repository) -> list[str]:
    return [name.rsplit("/", 1)[1] for name in repository.backend.list("points/")] or ["0" * 16]


def case(state: _State, rng: random.Random) -> bool:
    repo = state.repos[0] if rng.random() < 0.85 else state.repos[1]
    changed: set[str] = set()

    def put(name: str, data: bytes) -> None:
        repo.put(name, data)
        changed.add(name)

    try:
        kind = rng.random()
        if repo.password and kind < 0.12 and rng.random() < 0.9:
            kind = 0.12 + 0.88 * rng.random()  # a new repository id costs an scrypt: rarely
        raw = rng.random() < 0.25  # blind edits of the stored bytes, else mutation by structure
        if kind < 0.12:  # config
            data = repo.objects["config"]
            if raw:
                data = bytes(havoc(bytearray(data), rng, rng.randrange(1, 4)))
            elif rng.random() < 0.2:
                data = _text(rng, data)
            else:
                data = json.dumps(mutate_json(json.loads(data), rng)).encode()
            put("config", data)
        elif kind < 0.125 and repo.password:  # a key file (each may cost an scrypt)
            name = next(n for n in repo.objects if n.startswith("keys/"))
            data = repo.objects[name]
            if raw:
                data = bytes(havoc(bytearray(data), rng, rng.randrange(1, 3)))
            elif rng.random() < 0.2:
                data = _text(rng, data)
            else:
                data = json.dumps(mutate_json(json.loads(data), rng)).encode()
            repo.unlocked.clear()
            put(name, data)
        elif kind < 0.35:  # an index file
            name, document = rng.choice(list(repo.index_docs.items()))
            if raw:
                put(name, bytes(havoc(bytearray(repo.objects[name]), rng, rng.randrange(1, 4))))
            else:
                data = _seal(repo.keys, INDEX_KIND, mutate_json(document, rng), "")
                new = f"index/{repo.keys.blob_id(data).hex()}" if rng.random() < 0.7 else name
                os.unlink(repo.path(name))
                changed.add(name)
                put(new, data)
        elif kind < 0.65:  # a restore point
            point_id, document = rng.choice(list(repo.points.items()))
            name = f"points/{point_id}"
            if raw:
                put(name, bytes(havoc(bytearray(repo.objects[name]), rng, rng.randrange(1, 4))))
            else:
                put(name, _seal(repo.keys, POINT_KIND, mutate_json(document, rng, keep=("id",)), name))
        elif kind < 0.8:  # a pack, read whole as verify and the index rebuild do
            name, entries = rng.choice(list(repo.trailers.items()))
            data = repo.objects[name]
            if raw:
                data = bytes(havoc(bytearray(data), rng, rng.randrange(1, 4)))
            else:
                tail = int.from_bytes(data[-12:-8], "little")
                trailer = _seal(repo.keys, TRAILER_KIND, mutate_json(entries, rng), "")
                data = (
                    data[: len(data) - 12 - tail] + trailer + len(trailer).to_bytes(4, "little") + data[-8:]
                )
            named = rng.random() < 0.8
            digest = repo.keys.digest(data).hex()
            new = f"data/{digest[:2]}/{digest}" if named else name
            read_trailer(repo.keys, new, data)
            return True  # the index still names the pristine pack: nothing more to read
        elif kind < 0.9:  # a sealed blob
            document = rng.choice(list(repo.index_docs.values()))
            pack, entries = rng.choice(list(document["packs"].items()))
            blob, _kind, offset, length, _raw = rng.choice(entries)
            sealed = bytearray(repo.objects[pack][offset : offset + length])
            repo.keys.open(bytes(havoc(sealed, rng, rng.randrange(1, 3))), bytes.fromhex(blob), pack)
        else:  # a condemned list
            name = "condemned/00000000000000ff"
            document = {"time": 1.0e9, "packs": list(repo.trailers)}
            put(name, _seal(repo.keys, CONDEMNED_KIND, mutate_json(document, rng), name))
        if kind >= 0.8 and kind < 0.9:
            return True  # a blob: read directly above
        with repo.open() as repository:
            repository.index()
            repository.condemned()
            _read_points(repository, rng, whole=rng.random() < 0.1)
            if rng.random() < 0.05:
                try:
                    verify(repository, read_data=rng.random() < 0.5)
                except StorageError:
                    pass
                except RepositoryError as error:
                    raise AssertionError(f"verify raised {error!r}; it reports problems") from error
        return True
    finally:
        repo.restore(changed)


def run(scale: Scale) -> Outcome:
    tally = run_target(__name__, scale, BOUND)
    what = "mutated repository objects (config, keys, index, packs, blobs, points, condemned)"
    return fuzz_outcome(tally, what, scale, BOUND, __name__, accepted="read as sound")


ROW = Row(
    name="fuzz-repository",
    title="Backup repository readers: config, key files, index, pack trailers, blobs, restore points",
    checked="only RepositoryError/StorageError raised (verify: only StorageError), each input within 10 s, "
    "RSS flat",
    run=run,
)
