"""Faults on purpose: wrappers that corrupt what is read or stop storing mid-way, so that
tests can prove the repository detects every corrupted byte and survives a crash.

* :class:`BitFlipBackend` – some objects read back with one bit flipped, like a disk or
  a bucket that rots. The flip is a property of the stored object, not of the read: the
  same bit of the same object is wrong on every ``get`` and every ``get_range`` that
  covers it, so a retry does not hide it.
* :class:`FailingBackend` – after *n* successful puts the process "crashes": every later
  ``put`` and ``delete`` raises :class:`SimulatedCrash` and changes nothing, while reads
  go on so that the test can look at what the crash left behind.

Both pass every other call to the backend they wrap, and satisfy the contract otherwise.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Collection, Iterator

from ...lifetime import Closing
from .backend import Backend, StorageError, check_range

__all__ = ["BitFlipBackend", "FailingBackend", "SimulatedCrash"]


class SimulatedCrash(StorageError):
    """Raised by FailingBackend in place of a crash; never retried (a crashed process
    does not retry). Tests catch it where the process would have died."""

    retryable = False


class BitFlipBackend(Closing):
    """*inner* with one bit flipped in each corrupt object as it is read. An object is
    corrupt when its name is in *names*, or – with *rate* – for a fraction *rate* of all
    names, chosen by a hash of *seed* and the name (the same names every run). Which bit
    is also chosen by that hash. Empty objects have no bit to flip. ``flipped`` records
    the names served corrupted."""

    def __init__(self, inner: Backend, rate: float = 0.0, names: Collection[str] = (), seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, not {rate}")
        self.inner = inner
        self.location = inner.location
        self.rate = rate
        self.names = frozenset(names)
        self.seed = seed
        self.flipped: set[str] = set()
        self._lock = threading.Lock()

    def _digest(self, name: str) -> int:
        data = f"{self.seed}\0{name}".encode()
        return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")

    def is_corrupt(self, name: str) -> bool:
        """Whether *name* reads back with a flipped bit."""
        if name in self.names:
            return True
        return self.rate > 0.0 and (self._digest(name) >> 64) / 2.0**64 < self.rate

    def bit(self, name: str, size: int) -> int:
        """The index of the flipped bit (0 = the low bit of byte 0) of an object of *size*."""
        return (self._digest(name) & (2**64 - 1)) % (size * 8)

    def _flip(self, name: str, data: bytes, offset: int, size: int) -> bytes:
        """*data*, the bytes of *name* from *offset*, with the object's bad bit flipped if
        it falls within them."""
        if size == 0 or not self.is_corrupt(name):
            return data
        bit = self.bit(name, size)
        index = bit // 8 - offset
        if not 0 <= index < len(data):
            return data
        with self._lock:
            self.flipped.add(name)
        changed = bytearray(data)
        changed[index] ^= 1 << (bit % 8)
        return bytes(changed)

    def put(self, name: str, data: bytes | memoryview) -> None:
        self.inner.put(name, data)

    def get(self, name: str) -> bytes:
        data = self.inner.get(name)
        return self._flip(name, data, 0, len(data))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        data = self.inner.get_range(name, offset, length)
        if not data or not self.is_corrupt(name):
            return data
        return self._flip(name, data, offset, self.inner.size(name))

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list_sizes(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()


class FailingBackend(Closing):
    """*inner* that lets *fail_after_n_puts* puts through, then crashes: every later put
    and delete raises :class:`SimulatedCrash` without touching *inner*. ``puts`` counts
    the puts that went through; ``crashed`` tells whether the crash happened."""

    def __init__(self, inner: Backend, fail_after_n_puts: int):
        if fail_after_n_puts < 0:
            raise ValueError(f"fail_after_n_puts must be >= 0, not {fail_after_n_puts}")
        self.inner = inner
        self.location = inner.location
        self.fail_after_n_puts = fail_after_n_puts
        self.puts = 0
        self.crashed = False
        self._lock = threading.Lock()

    def _crash(self, name: str, action: str) -> SimulatedCrash:
        return SimulatedCrash(
            f"{self.location}/{name}: simulated crash: {action} after {self.puts} puts", name=name
        )

    def put(self, name: str, data: bytes | memoryview) -> None:
        with self._lock:
            if self.crashed or self.puts >= self.fail_after_n_puts:
                self.crashed = True
                raise self._crash(name, "put")
            self.puts += 1  # counted before it is stored: concurrent puts never pass n
        self.inner.put(name, data)

    def get(self, name: str) -> bytes:
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(name, offset, length)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list_sizes(prefix)

    def delete(self, name: str) -> None:
        with self._lock:
            if self.crashed:
                raise self._crash(name, "delete")
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()
