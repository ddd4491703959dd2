"""The backup repository: content-addressed, deduplicated, compressed, optionally
encrypted, over any storage backend. ``docs/repository.md`` is the format's reference::

    config                 what the repository is (magic, version, id, chunk size, hash, encrypted,
                           MAC: :mod:`.repoconfig`)
    keys/<id>              the master key wrapped under a password (encrypted repositories)
    data/<2 hex>/<64 hex>  packs of sealed blobs (:mod:`.packs`)
    index/<64 hex>         which blobs are in which packs (written after the packs; :mod:`.indexfile`),
                           kept locally, per repository, as sorted runs (:mod:`.indexcache`)
    points/<16 hex>        restore points: a complete chunk index of every disk (written last),
                           summarised in a local catalog synced by their names (:mod:`.catalog`)
    condemned/<16 hex>     packs a garbage collection has found unused (deleted later)
    locks/<32 hex>         locks (:mod:`.locks`)

Writes go data, then index, then restore point, each object put atomically: a crash
leaves at worst packs that no index names or index entries that no restore point uses
(the garbage collection removes both), never a restore point that names missing data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agentless.lifetime import Closing

from .catalog import Brief, Catalog, CatalogError
from .indexcache import CacheError, IndexCache, cache_root
from .indexfile import BINARY_KIND, JSON_KIND, Entries, decode_binary, decode_json, encode_binary, pack_digest
from .keys import HASHES, CorruptError, Keys, RepositoryError, WrongPassword, make_key_file, open_key_file
from .locks import Lock
from .packs import BlobLocation, PackBuilder
from .points import PointSummary, RestorePoint, parse_point
from .repoconfig import check_chunk_size, check_config, encode_config, new_config, parse_config
from .storage import Backend, NotFound, open_backend

__all__ = ["CHUNK_SIZE", "ZERO", "BlobWriter", "CacheSettings", "Repository", "RepositoryError", "use_cache"]

CHUNK_SIZE = 65536  # = the CBT block: an incremental reads and stores whole chunks
ZERO = bytes(32)  # the id of an all-zero chunk: never stored, restored as a hole
_GAP = 256 << 10  # read over holes of up to this much between wanted blobs...
_SPAN = 8 << 20  # ...in reads of up to this much
INDEX_KIND = JSON_KIND
POINT_KIND = b"AGVBPOIN"
CONDEMNED_KIND = b"AGVBCOND"
_POINT_ID = re.compile(r"[0-9a-f]{16}")
BINARY_INDEX = 3  # the config version from which index files are binary
log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _warn(line: str) -> None:
    log.warning("%s", line)


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """Where a repository's local cache lives: under *root* (``--cache-dir``; None: the
    default, ``$XDG_CACHE_HOME/vmbackup``), or – *enabled* False, ``--no-cache`` – in a
    temporary directory removed when the repository is closed (read-only media)."""

    root: str | None = None
    enabled: bool = True


_default_cache = CacheSettings()


def use_cache(settings: CacheSettings) -> None:
    """Make *settings* the default of every repository this process opens without its
    own (the command line's ``--cache-dir`` / ``--no-cache``)."""
    global _default_cache
    _default_cache = settings


class Repository(Closing):
    """An open repository. Thread-safe for reading; writes go through :meth:`writer`."""

    def __init__(
        self, backend: Backend, config: dict[str, Any], keys: Keys, cache: CacheSettings | None = None
    ):
        if bool(config.get("encrypted")) != keys.encrypted:  # never plaintext into an encrypted one
            raise RepositoryError(f"{backend.location}: the keys do not match the config's encryption")
        self.backend = backend
        self.config = config
        self.keys = keys
        self.cache = cache or _default_cache
        self._index: IndexCache | None = None
        self._catalog: Catalog | None = None
        self._condemned: dict[str, float] | None = None
        self._lock = threading.Lock()
        self._held: list[Lock] = []  # locks taken through lock(): checked before writes
        self._listed: concurrent.futures.Future[list[str]] | None = None  # open(prefetch_points=True)

    # ------------------------------------------------------------------ making and opening

    @classmethod
    def init(
        cls,
        location: str | Backend,
        password: str | None = None,
        hash: str | None = None,
        keys: Keys | None = None,
        chunk_size: int = CHUNK_SIZE,
        cache: CacheSettings | None = None,
    ) -> Repository:
        """Make a new repository (encrypted when a *password* is given) at *location*,
        which must hold no repository yet; *hash* is one of HASHES (default ``blake3``;
        ``sha256``: the format of repositories made before BLAKE3, for tests of their
        support). *keys* and *chunk_size* are for an off-site repository, which must give
        a chunk the id its source gives (:func:`.offsite.init_offsite`): the keys to use
        instead of new ones – encrypted exactly when a *password* is given, their hash
        the repository's."""
        if keys is not None:
            if hash is not None and hash != keys.hash:
                raise RepositoryError(f"hash {hash!r} given with keys of hash {keys.hash!r}")
            if keys.encrypted != bool(password):
                raise RepositoryError(
                    "encrypted keys need a password" if keys.encrypted else "a password needs encrypted keys"
                )
        check_chunk_size(chunk_size)
        backend = open_backend(location) if isinstance(location, str) else location
        try:
            if backend.exists("config"):
                raise RepositoryError(f"{backend.location}: a repository exists there already")
            if keys is None:
                keys = Keys.generate(hash or "blake3") if password else Keys(hash=hash or "blake3")
            repository_id = str(uuid.uuid4())
            if password:
                backend.put(f"keys/{secrets.token_hex(16)}", make_key_file(keys, password, repository_id))
                keys = dataclasses.replace(keys, repository_id=repository_id)
            config = new_config(repository_id, chunk_size, keys.hash, bool(password))
            backend.put("config", encode_config(config, keys))  # last: the repository exists
        except BaseException:
            backend.close()
            raise
        return cls(backend, config, keys, cache)

    @classmethod
    def open(
        cls,
        location: str | Backend,
        password: str | None = None,
        unlocked: dict[str, Keys] | None = None,
        cache: CacheSettings | None = None,
        prefetch_points: bool = False,
    ) -> Repository:
        """Open the repository at *location*; WrongPassword (or RepositoryError when a
        password is needed and none given). *unlocked*: a cache, repository id -> keys,
        that a long-running process passes to every open with the same password, so that
        each repository's key is derived from the password (scrypt, ~60 ms by design)
        once, not at every open. *prefetch_points*: list the restore points' names while
        the key is derived, for the first :meth:`points` or :meth:`briefs` (a command
        that lists them first thing, ``vmbackup list``: ~0.1 s less on S3); that answer
        is then as of the open, so a caller that must see every point saved after it
        (prune, under its lock) does not ask for it."""
        backend = open_backend(location) if isinstance(location, str) else location
        listed: concurrent.futures.Future[list[str]] | None = None
        try:
            try:
                config = parse_config(backend.get("config"), backend.location)
            except NotFound:
                raise RepositoryError(f"{backend.location}: no repository (run `vmbackup init`)") from None

            def prefetch() -> None:  # once the key files are read: their reads do not queue behind it
                nonlocal listed
                if prefetch_points and listed is None:
                    listed = _in_background(_point_names, backend)

            hash_name = config.get("hash", "sha256")  # repositories from before BLAKE3 have none
            if hash_name not in HASHES:
                raise RepositoryError(f"{backend.location}: hash {hash_name!r} is unknown to this version")
            keys = Keys(hash=hash_name)
            if config.get("encrypted"):
                if not password:
                    raise RepositoryError("the repository is encrypted: give its password")
                cached = f"{backend.location} {config['id']}"  # a config copied elsewhere: derived anew
                known = None if unlocked is None else unlocked.get(cached)
                keys = known or dataclasses.replace(_unlock(backend, password, prefetch), hash=hash_name)
                if unlocked is not None:
                    unlocked[cached] = keys
            elif next(iter(backend.list("keys/")), None) is not None:
                raise CorruptError(
                    f"{backend.location}/config says the repository is not encrypted, but it holds "
                    "key files: the config was altered; refused (nothing is written in plaintext)",
                    "config",
                )
            check_config(config, keys, backend.location)
            prefetch()
            repository = cls(backend, config, keys, cache)
        except BaseException:
            if listed is not None:
                concurrent.futures.wait([listed])  # its threads use the backend
            backend.close()
            raise
        repository._listed = listed
        return repository

    @property
    def chunk_size(self) -> int:
        return int(self.config["chunk_size"])

    def lock(self, kind: str = "shared", purpose: str = "") -> Lock:
        held = Lock(self.backend, kind, purpose or kind)
        with self._lock:
            self._held = [lock for lock in self._held if not lock.closed] + [held]
        return held

    def check_locks(self) -> None:
        """:class:`~.locks.LockLost` if a lock this process holds on the repository has
        gone unrefreshed too long (others may have collected what it was about to name):
        called before an index file or a restore point is written."""
        with self._lock:
            held = [lock for lock in self._held if not lock.closed]
        for lock in held:
            lock.check_held()

    def close(self) -> None:
        with self._lock:
            index, self._index = self._index, None
            catalog, self._catalog = self._catalog, None
            listed, self._listed = self._listed, None
        if listed is not None:
            concurrent.futures.wait([listed])  # its threads use the backend
        if index is not None:
            index.close()
        if catalog is not None:
            catalog.close()
        self.backend.close()

    # ------------------------------------------------------------------ the index

    @property
    def binary_index(self) -> bool:
        """Whether this repository's index files are written in the binary form (format
        3; older repositories keep the JSON form, which their versions read)."""
        return int(self.config.get("version", 1)) >= BINARY_INDEX

    def index(self, reload: bool = False) -> IndexCache:
        """Every blob known to the index files: a mapping id -> where it is, backed by
        the local index cache (:mod:`.indexcache`), synced with the repository's index
        files at the first call and at every *reload*."""
        with self._lock:
            if self._index is None:
                self._index = self._open_cache()
            index = self._index
            if reload:
                self._condemned = None
        if reload or not index.synced:
            index.sync()
        return index

    def _open_cache(self) -> IndexCache:
        def files() -> list[str]:
            return sorted(self.backend.list("index/"))

        return self._local(
            "index", lambda where: IndexCache(where, files, self.read_index_entries, _warn), "cache"
        )

    def _local(self, part: str, make: Callable[[Path | None], _T], what: str) -> _T:
        """*make* (the index cache or the catalog) at ``<cache root>/<repository id>/<part>``,
        or given None – ``--no-cache``, or a default place that cannot be used (one
        warning) – in a temporary directory."""
        if self.cache.enabled:
            try:
                return make(cache_root(self.cache.root) / str(self.config["id"]) / part)
            except (CacheError, CatalogError) as error:
                if self.cache.root is not None:
                    raise
                _warn(f"{error}: using a temporary {what} (give --cache-dir, or --no-cache)")
        return make(None)

    def read_index_entries(self, name: str) -> Entries:
        """The entries of the index file *name* (binary or JSON), checked: its tag (or
        checksum), its shape, and its name, which is the id of its bytes (a keyed hash
        when encrypted) – an index file copied over another or renamed is a
        CorruptError, never read as the other. NotFound if it is gone."""
        data = self.backend.get(name)
        digest = self.keys.blob_id(data)
        binary = data.startswith(BINARY_KIND)
        if binary:
            content: Any = self.keys.open_data(BINARY_KIND, data, "", where=name)
        else:
            content = self.keys.open_meta(INDEX_KIND, data, "", where=name)
        del data  # the sealed form (up to ~48 MiB) is not kept beside the opened one
        if name != f"index/{digest.hex()}":
            raise CorruptError(f"{name}: its content is not that name's (swapped or renamed)", name)
        return decode_binary(content, name) if binary else decode_json(content, name)

    def read_index_file(self, name: str) -> dict[bytes, BlobLocation]:
        """The entries of the index file *name* as a dict, checked
        (:meth:`read_index_entries`)."""
        return self.read_index_entries(name).locations()

    def write_index_file(self, locations: Mapping[bytes, BlobLocation] | Entries) -> str:
        """Write an index file of *locations* (after the packs they name) and add it to
        the local cache; its name. Binary in repositories of format 3, JSON before."""
        self.check_locks()
        try:
            entries = locations if isinstance(locations, Entries) else Entries.of(locations.items())
        except ValueError as error:
            raise RepositoryError(f"an index entry this format cannot hold: {error}") from None
        if self.binary_index:
            data = self.keys.seal_data(BINARY_KIND, encode_binary(entries), "")  # content-addressed
        else:
            packs: dict[str, list[list[object]]] = {}
            for blob, where in entries.items():
                packs.setdefault(where.pack, []).append(where.entry(blob))
            data = self.keys.seal_meta(INDEX_KIND, {"packs": packs}, "")
        name = f"index/{self.keys.blob_id(data).hex()}"
        self.backend.put(name, data)
        with self._lock:
            index = self._index
        if index is not None:
            index.add(name, entries)
        return name

    def condemned(self, reload: bool = False) -> dict[str, float]:
        """Packs condemned by a garbage collection: pack -> when (epoch seconds). A backup
        treats their blobs as absent and stores them again."""
        with self._lock:
            if self._condemned is None or reload:
                found: dict[str, float] = {}
                for name in self.backend.list("condemned/"):
                    document = self.keys.open_meta(CONDEMNED_KIND, self.backend.get(name), name)
                    try:
                        when = float(document["time"])
                        for pack in document["packs"]:
                            pack_digest(pack)  # ValueError (TypeError) if it names no pack
                            found[pack] = when
                    except (KeyError, TypeError, ValueError):
                        raise CorruptError(f"{name}: malformed condemned list", name) from None
                self._condemned = found
            return self._condemned

    def read_blob(self, blob_id: bytes) -> bytes:
        """The plaintext of a blob, checked; CorruptError, or RepositoryError if unknown."""
        if blob_id == ZERO:
            return bytes(self.chunk_size)
        where = self.index().get(blob_id)
        if where is None:
            raise RepositoryError(f"blob {blob_id.hex()[:16]} is not in the repository's index")
        return self.read_at(blob_id, where)

    def read_many(self, blob_ids: list[bytes]) -> list[bytes]:
        """The plaintexts of *blob_ids*, in order, checked – blobs that lie near each other
        in one pack are fetched with one read (a restore asks for runs of chunks that the
        backup wrote side by side)."""
        unique = list(dict.fromkeys(blob for blob in blob_ids if blob != ZERO))
        wanted: dict[bytes, BlobLocation] = {}
        for blob, where in zip(unique, self.index().locate(unique), strict=True):  # one batch
            if where is None:
                raise RepositoryError(f"blob {blob.hex()[:16]} is not in the repository's index")
            wanted[blob] = where
        sealed: dict[bytes, memoryview] = {}
        by_pack: dict[str, list[tuple[bytes, BlobLocation]]] = {}
        for blob, where in wanted.items():
            by_pack.setdefault(where.pack, []).append((blob, where))
        for pack, located in by_pack.items():
            located.sort(key=lambda item: item[1].offset)
            span: list[tuple[bytes, BlobLocation]] = []
            for item in [*located, None]:
                if item is not None and span:
                    start, end = span[0][1].offset, span[-1][1].offset + span[-1][1].length
                    if item[1].offset - end <= _GAP and item[1].offset + item[1].length - start <= _SPAN:
                        span.append(item)
                        continue
                if span:
                    start = span[0][1].offset
                    end = span[-1][1].offset + span[-1][1].length
                    try:
                        data = self.backend.get_range(pack, start, end - start)
                    except NotFound:
                        raise CorruptError(f"{pack}: missing", pack) from None
                    view = memoryview(data)  # the blobs as slices of the read, not copies
                    for blob, where in span:
                        sealed[blob] = view[where.offset - start : where.offset - start + where.length]
                span = [item] if item is not None else []
        return [
            bytes(self.chunk_size) if blob == ZERO else self.keys.open(sealed[blob], blob, wanted[blob].pack)
            for blob in blob_ids
        ]

    def read_at(self, blob_id: bytes, where: BlobLocation) -> bytes:
        """The plaintext of the blob *blob_id* stored at *where*, checked."""
        try:
            sealed = self.backend.get_range(where.pack, where.offset, where.length)
        except NotFound:
            raise CorruptError(f"{where.pack}: missing (blob {blob_id.hex()[:16]})", where.pack) from None
        return self.keys.open(sealed, blob_id, where.pack)

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    # ------------------------------------------------------------------ restore points

    def save_point(self, point: RestorePoint, point_id: str | None = None) -> str:
        """Store a restore point (its data and index written before); its id: a new one,
        or *point_id* (16 hex digits: an off-site copy keeps its source's ids), whose
        restore point, if there is one, this one replaces. The document stored is
        :meth:`.RestorePoint.document` with the id."""
        self.check_locks()
        if point_id is None:
            point_id = secrets.token_hex(8)
        elif not _POINT_ID.fullmatch(point_id):
            raise RepositoryError(f"{point_id!r} is not a restore point id (16 hex digits)")
        name = f"points/{point_id}"
        point = point.model_copy(update={"id": point_id})
        self.backend.put(name, self.keys.seal_meta(POINT_KIND, point.document(), name))
        with self._lock:
            catalog = self._catalog
        if catalog is not None:  # as the index cache learns new index files
            catalog.add(point)
        return point_id

    def points(self) -> list[PointSummary]:
        """The summary of every restore point, oldest first: its document without its
        disks' page lists (:func:`.catalog.summarize`), from the local catalog, synced
        with the repository's names – only the points it lacks are read (and checked). A
        caller that reads a disk loads that point (:meth:`load_point`)."""
        return self.catalog().summaries(self._prefetched())

    def briefs(self) -> list[Brief]:
        """:meth:`points`, only what a listing shows of each (:class:`.catalog.Brief`),
        read from the catalog's columns: ``vmbackup list``."""
        return self.catalog().briefs(self._prefetched())

    def _prefetched(self) -> Callable[[], list[str]] | None:
        """The listing begun at the open (``prefetch_points``), once: a call that waits
        for its names; else None."""
        with self._lock:
            listed, self._listed = self._listed, None
        return None if listed is None else listed.result

    def catalog(self) -> Catalog:
        """The local catalog of this repository's restore points (:mod:`.catalog`),
        opened at the first call: under the cache root, or – ``--no-cache``, or a default
        cache directory that cannot be used – a temporary one removed at :meth:`close`."""
        with self._lock:
            if self._catalog is None:
                self._catalog = self._open_catalog()
            return self._catalog

    def _open_catalog(self) -> Catalog:
        def names() -> list[str]:
            return _point_names(self.backend)

        repository_id = str(self.config["id"])
        return self._local(
            "points", lambda where: Catalog(where, repository_id, names, self.read_point, _warn), "catalog"
        )

    def resolve_point(self, ref: str) -> str:
        """The id of the restore point *ref* names: its id or a unique prefix (4+ hex)."""
        ids = [name.rsplit("/", 1)[1] for name in _point_names(self.backend)]
        if ref in ids:
            return ref
        matches = [i for i in ids if len(ref) >= 4 and i.startswith(ref)]
        if len(matches) != 1:
            raise RepositoryError(
                f"no restore point {ref!r}" if not matches else f"{ref!r} names {len(matches)} restore points"
            )
        return matches[0]

    def load_point(self, ref: str) -> RestorePoint:
        """The restore point *ref* names (:meth:`resolve_point`), checked
        (:meth:`read_point`); RepositoryError if there is none."""
        point_id = self.resolve_point(ref) if len(ref) != 16 else ref
        try:
            return self.read_point(point_id)
        except NotFound:
            raise RepositoryError(f"no restore point {ref!r}") from None

    def read_point(self, point_id: str) -> RestorePoint:
        """The restore point stored as ``points/<point_id>``, checked: its tag (or
        checksum), the name it was sealed for and the id it holds must be *point_id* –
        a point copied over another or renamed is a CorruptError naming both, never
        served as the other –, then its format version and fields
        (:func:`.points.parse_point`: PointFormatError for a newer format, CorruptError
        for a malformed point). NotFound if there is none."""
        name = f"points/{point_id}"
        document = self.keys.open_meta(POINT_KIND, self.backend.get(name), name)
        if not isinstance(document, dict):
            raise CorruptError(f"{name}: malformed restore point", name)
        if document.get("id") != point_id:
            raise CorruptError(
                f"{name}: holds restore point {str(document.get('id'))[:16]!r}, not {point_id} "
                "(swapped or renamed)",
                name,
            )
        return parse_point(document, name)

    def delete_point(self, point_id: str) -> None:
        self.backend.delete(f"points/{point_id}")
        with self._lock:
            catalog = self._catalog
        if catalog is not None:
            catalog.forget(point_id)


def _point_names(backend: Backend) -> list[str]:
    """The ``points/…`` names of *backend*. On S3 a listing is a round trip per 1 000
    names, one after the other: the 16 shards of the ids' first hex digit are listed at
    once (names that are no restore point's are not listed; verify reads every name)."""
    if not backend.location.startswith("s3://"):
        return list(backend.list("points/"))
    with concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="vmbackup-list") as pool:
        shards = pool.map(lambda digit: list(backend.list(f"points/{digit}")), "0123456789abcdef")
        return [name for shard in shards for name in shard]


def _in_background(work: Callable[[Backend], _T], backend: Backend) -> concurrent.futures.Future[_T]:
    """*work*(*backend*) in a thread of its own; its future."""
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work(backend))
        except BaseException as error:  # handed to whoever takes the result
            future.set_exception(error)

    threading.Thread(target=run, name="vmbackup-prefetch", daemon=True).start()
    return future


def _unlock(backend: Backend, password: str, before_deriving: Callable[[], None]) -> Keys:
    """The keys of the first key file that *password* opens. A key file that does not
    check (malformed, scrypt parameters out of bounds: :func:`.keys.check_key_file`) is
    passed over, so that one planted file cannot lock the owners out; if no key opens,
    the first such file is the error (it says what is wrong), else WrongPassword.
    *before_deriving* is called once the key files are read (the key derivation, ~0.1 s
    of scrypt that lets other threads run, follows)."""
    names = sorted(backend.list("keys/"))
    if not names:
        raise RepositoryError(f"{backend.location}: encrypted, but holds no key file")
    files = [(name, backend.get(name)) for name in names]
    before_deriving()
    bad: list[CorruptError] = []
    for name, data in files:
        try:
            return open_key_file(data, password, f"{backend.location}/{name}")
        except WrongPassword:
            continue
        except CorruptError as error:
            bad.append(error)
    if bad:
        raise bad[0]
    raise WrongPassword("wrong password: no key of this repository opens with it")


class BlobWriter(Closing):
    """Stores blobs for one backup: deduplicated against the index (and itself), sealed in
    the caller's thread (so several threads compress and encrypt at once), packed, and
    put by a background thread. :meth:`flush` makes everything durable and indexed –
    call it before saving a restore point that uses the blobs. Counters: ``stored``
    (sealed bytes written), ``new`` and ``reused`` blobs, ``reused_bytes`` (deduplicated).

    Memory stays bounded whatever the size of the backup: every :data:`INDEX_EVERY`
    blobs put, an index file names them (and the local cache learns them), and the
    writer forgets them."""

    INDEX_EVERY = 1 << 16
    # Closed packs being put or waiting for a put thread (2 put at once): when the store is
    # slower than the readers – S3 – the reader that closes the next pack waits for one of
    # them, so memory stays a few packs a reader instead of growing with the backup (a 2 GiB
    # full backup to S3 peaked at ~420 MiB against ~280 on a directory). The wait is never
    # under the writer's lock: a put thread takes it when its put is done.
    PACKS_IN_FLIGHT = 4

    def __init__(self, repository: Repository):
        self.repository = repository
        self.keys = repository.keys
        self._known = repository.index()
        self._condemned = frozenset(repository.condemned())
        self._builder = PackBuilder(self.keys)
        self._added: dict[bytes, BlobLocation | None] = {}  # not yet indexed (None: in the open pack)
        self._lock = threading.Lock()
        self._puts = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="vmbackup-put")
        self._in_flight = threading.BoundedSemaphore(self.PACKS_IN_FLIGHT)
        self._closing = threading.Event()
        self._full: list[PackBuilder] = []  # closed packs waiting for a slot (_send)
        self._pending: list[concurrent.futures.Future[None]] = []
        self._written: dict[bytes, BlobLocation] = {}
        self._indexing = threading.Lock()  # one index file at a time
        self.stored = 0
        self.new = 0
        self.reused = 0
        self.reused_bytes = 0

    def known(self, blob_id: bytes) -> bool:
        """Whether the repository has the blob already (or this writer stored it)."""
        return self.known_many([blob_id])[0]

    def known_many(self, blob_ids: list[bytes]) -> list[bool]:
        """:meth:`known` of each of *blob_ids*, looked up in the index in one batch."""
        with self._lock:
            mine = [blob == ZERO or blob in self._added for blob in blob_ids]
        asked = [blob for blob, found in zip(blob_ids, mine, strict=True) if not found]
        answers = iter(self._known.known(asked, self._condemned) if asked else [])
        return [found or next(answers) for found in mine]

    def add(self, data: bytes | memoryview, kind: str = "data", blob_id: bytes | None = None) -> bytes:
        """Store *data* unless it is known; its id."""
        return self.add_many([data], kind, None if blob_id is None else [blob_id])[0]

    def add_many(
        self, pieces: list[bytes | memoryview], kind: str = "data", blob_ids: list[bytes] | None = None
    ) -> list[bytes]:
        """Store each of *pieces* that is not known (looked up in one batch); their ids."""
        ids = [self.keys.blob_id(data) for data in pieces] if blob_ids is None else list(blob_ids)
        known = self.known_many(ids)
        for data, blob_id, found in zip(pieces, ids, known, strict=True):
            if found:
                with self._lock:
                    self.reused += 1
                    self.reused_bytes += len(data)
                continue
            sealed = self.keys.seal(data, blob_id)
            with self._lock:
                if blob_id in self._added:
                    self.reused += 1
                    self.reused_bytes += len(data)
                    continue
                self._added[blob_id] = None
                self._builder.add(blob_id, kind, sealed, len(data))
                self.stored += len(sealed)
                self.new += 1
                full = self._builder.full
                if full:
                    self._ship()
            if full:
                self._send()
        return ids

    def _ship(self) -> None:
        """Close the open pack: :meth:`_send` puts it (holding ``_lock``)."""
        if len(self._builder):
            self._full.append(self._builder)
            self._builder = PackBuilder(self.keys)

    def _send(self) -> None:
        """Put the closed packs in the background, each once fewer than PACKS_IN_FLIGHT
        are: the caller waits here for the store. Not under ``_lock``: a put thread takes
        it when its put is done, and the packs waiting for a put thread hold slots."""
        while True:
            with self._lock:
                if not self._full:
                    return
                finished = [self._full.pop(0)]
            while True:
                if self._in_flight.acquire(timeout=0.5):
                    if not self._closing.is_set():
                        break
                    self._in_flight.release()
                if self._closing.is_set():
                    raise RepositoryError("the backup's writer was closed while a pack waited to be stored")
            with self._lock:
                self._pending.append(self._puts.submit(self._put, finished))

    def _put(self, finished: list[PackBuilder]) -> None:
        """Put one closed pack (joining and hashing 16 MiB: in a put thread), then index it."""
        try:
            name, data, locations = finished.pop().finish()
            self.repository.backend.put(name, data)
            del data
        finally:
            self._in_flight.release()
        with self._lock:
            self._written.update(locations)
            self._added.update(locations)
            due = len(self._written) >= self.INDEX_EVERY
        if due:
            self._index_written()

    def _index_written(self) -> None:
        """Write one index file for the packs put so far, then forget their blobs."""
        with self._indexing:
            with self._lock:
                written, self._written = self._written, {}
            if not written:
                return
            self.repository.write_index_file(written)  # the cache knows them from now on
            with self._lock:
                for blob in written:
                    if self._added.get(blob) is not None:
                        del self._added[blob]

    def flush(self) -> None:
        """Put the last pack, wait for every put, write one index file for them."""
        with self._lock:
            self._ship()
        self._send()
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        self._index_written()

    def close(self) -> None:
        self._closing.set()  # a reader waiting in _ship for a pack whose put is cancelled
        self._puts.shutdown(wait=True, cancel_futures=True)
