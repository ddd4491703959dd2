"""The memory backend: objects in a dict, for the tests of the layers above storage.

It keeps the whole contract – naming rule, NotFound, atomic overwrite, thread safety –
so that a repository test on memory means the same as one on disk, only faster. Nothing
survives the process; ``durable`` here means "stored before put returns".
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

from ...lifetime import Closing
from .backend import NotFound, check_name, check_prefix, check_range

__all__ = ["MemoryBackend"]

_numbers = itertools.count(1)


class MemoryBackend(Closing):
    """Objects in memory. ``objects`` (name -> bytes) may be read and altered by tests,
    e.g. to corrupt or remove an object behind the repository's back."""

    def __init__(self, label: str | None = None):
        self.location = f"memory:{label or next(_numbers)}"
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"{self.location}/{name}: no such object", name=name)

    def put(self, name: str, data: bytes | memoryview) -> None:
        check_name(name)
        value = bytes(data)
        with self._lock:
            self.objects[name] = value

    def get(self, name: str) -> bytes:
        check_name(name)
        with self._lock:
            value = self.objects.get(name)
        if value is None:
            raise self._not_found(name)
        return value

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        return self.get(name)[offset : offset + length]

    def size(self, name: str) -> int:
        return len(self.get(name))

    def exists(self, name: str) -> bool:
        check_name(name)
        with self._lock:
            return name in self.objects

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        with self._lock:
            names = [name for name in self.objects if name.startswith(prefix)]
        return iter(names)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        with self._lock:
            found = [(name, len(value)) for name, value in self.objects.items() if name.startswith(prefix)]
        return iter(found)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self.objects.pop(name, None)

    def close(self) -> None:
        pass
