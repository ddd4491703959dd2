"""Sequential throughput of VHD disks, measured against plain file I/O in the same run.

Run from the top of the tree::

    .venv/bin/python bench/vhd_throughput.py [--size 2G] [--chunk 8M] [--repeat 3] [--dir DIR]

Absolute times on a shared machine are noise, so every figure is printed next to a
reference taken in the same run on the same file system:

* **plain** – a raw file of the same size written and read with ``os.pwritev`` /
  ``os.preadv`` in the same chunks from and into one reused buffer: what Python can do
  with no format at all;
* **cp** – ``cp --reflink=never`` of that raw file (reads it and writes a new file).

The disks measured, each written and read whole through :class:`agentless.vhd.Chain` in
chunks of ``--chunk`` bytes (``Chain.write`` from one buffer, ``Chain.readinto`` into one
reused buffer):

==========  ===============================================================================
fixed       ``create_fixed`` (a sparse file until written)
dynamic     ``create_dynamic`` (no block allocated until written)
chain       a dynamic base written whole, and a differencing leaf over it in which every
            other 2 MiB block (the even ones) was rewritten; reads fall through to the base
            for the odd blocks
==========  ===============================================================================

Operations, each the best of ``--repeat`` runs on a freshly made disk; the runs go
round-robin (reference, fixed, dynamic, chain, then again) so that every subject meets the
same state of the machine:

* ``write new`` – the whole disk into a new disk: allocates file-system blocks (raw file,
  fixed VHD), VHD blocks (dynamic VHD) or the odd blocks of the leaf (chain);
* ``rewrite`` – the whole disk again, every block now allocated;
* ``read`` – the whole disk; the page cache is warm (the data was just written and the
  machine has more memory than the files), so this measures the code path, not the disk.
  The chain is read before its ``write new``, while half of its blocks come from the base.

Writes are timed without ``fsync`` unless ``--fsync`` is given; each timed write is
followed by an untimed ``fsync`` so that dirty pages of one measurement do not slow down
the next. 1 MB = 10^6 bytes. The exit status is 0 whether or not the goal is met.

First-touch memory: in a virtual machine whose balloon reports free pages to the host
(``virtio_balloon`` with free page reporting, as on the machines of docs/performance.md), the first write into
memory the host has taken back costs a host page fault per page: filling new page cache
then runs at about 0.5 GB/s whatever the code does. Each pass that fills new page cache
(``write new``, ``cp``) is therefore preceded by an untimed write and delete of a scratch
file of the same size, so that it reuses memory the guest has just freed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from agentless import vhd
from agentless.units import format_size, parse_size

MB = 1_000_000
GOAL_MB_S = 1000.0
BLOCK = vhd.DEFAULT_BLOCK_SIZE
DISKS = ("fixed", "dynamic", "chain")
DISK_NAMES = {
    "fixed": "fixed VHD",
    "dynamic": "dynamic VHD",
    "chain": "2-layer chain",
}
OPERATIONS = ("write new", "rewrite", "read")

# ---------------------------------------------------------------------- data


def pattern(source: bytes, offset: int, length: int) -> bytes:
    """The bytes that lie at ``[offset, offset + length)`` of a disk filled with *source*
    repeated from offset 0 (the writes below always start at multiples of its length)."""
    array = np.frombuffer(source, dtype=np.uint8)
    return np.resize(np.roll(array, -(offset % array.size)), length).tobytes()


@dataclasses.dataclass
class Workload:
    """What every measurement writes: *size* bytes in chunks of *chunk* from *data*."""

    size: int
    chunk: int
    data: bytes  # chunk bytes, written at every chunk offset of the base or whole disk
    leaf_data: bytes  # chunk bytes, the pattern of the leaf's rewritten blocks
    fsync: bool  # include fsync in the write timings

    def chunks(self) -> Iterator[tuple[int, int]]:
        for offset in range(0, self.size, self.chunk):
            yield offset, min(self.chunk, self.size - offset)


# ---------------------------------------------------------------------- timed passes


def chain_write(path: str, work: Workload) -> float:
    """Seconds to write the whole disk at *path* through ``Chain.write``."""
    view = memoryview(work.data)
    with vhd.Chain.open(path, writable=True) as disk:
        start = time.perf_counter()
        for offset, n in work.chunks():
            disk.write(offset, view[:n])
        if work.fsync:
            disk.flush()
        elapsed = time.perf_counter() - start
        disk.flush()  # settle (untimed unless --fsync)
    return elapsed


def chain_read(path: str, work: Workload) -> float:
    """Seconds to read the whole disk at *path* through ``Chain.readinto``, one buffer."""
    buf = memoryview(bytearray(work.chunk))
    with vhd.Chain.open(path) as disk:
        start = time.perf_counter()
        for offset, n in work.chunks():
            disk.readinto(offset, buf[:n])
        return time.perf_counter() - start


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def plain_write(path: str, work: Workload, flags: int) -> float:
    """Seconds to write the whole raw file with ``os.pwritev`` (*flags* add to O_WRONLY)."""
    view = memoryview(work.data)
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        start = time.perf_counter()
        for offset, n in work.chunks():
            _pwrite_all(fd, view[:n], offset)
        if work.fsync:
            os.fsync(fd)
        elapsed = time.perf_counter() - start
        os.fsync(fd)
    finally:
        os.close(fd)
    return elapsed


def plain_read(path: str, work: Workload) -> float:
    """Seconds to read the whole raw file with ``os.preadv`` into one reused buffer."""
    buf = memoryview(bytearray(work.chunk))
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset, n in work.chunks():
            done = 0
            while done < n:
                got = os.preadv(fd, [buf[done:n]], offset + done)
                if got == 0:
                    raise EOFError(f"{path}: short at {offset + done}")
                done += got
        return time.perf_counter() - start
    finally:
        os.close(fd)


def copy_file(source: str, target: str, work: Workload) -> float:
    """Seconds for ``cp`` to copy *source* to a new *target*."""
    start = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", source, target], check=True)
    if work.fsync:
        _fsync_path(target)
    elapsed = time.perf_counter() - start
    _fsync_path(target)
    return elapsed


def prefault(directory: str, work: Workload) -> None:
    """Write and delete a scratch file of the disk's size (untimed) just before a timed
    pass that fills new page cache, so that the pass reuses memory the guest has just
    freed instead of memory the host has taken back (see the module docstring)."""
    scratch = os.path.join(directory, "scratch.img")
    view = memoryview(work.data)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset, n in work.chunks():
            _pwrite_all(fd, view[:n], offset)
    finally:
        os.close(fd)
        os.unlink(scratch)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- checks


def verify(path: str, work: Workload, leaf_blocks: bool) -> None:
    """Read a few blocks back (untimed) and compare them with what was written: a
    benchmark of wrong data is worth nothing. *leaf_blocks*: even blocks hold the leaf's
    pattern."""
    blocks = work.size // BLOCK
    sample = sorted({0, 1, 2, 3, blocks // 2, blocks // 2 + 1, blocks - 2, blocks - 1} & set(range(blocks)))
    with vhd.Chain.open(path) as disk:
        for block in sample:
            source = work.leaf_data if leaf_blocks and block % 2 == 0 else work.data
            expected = pattern(source, block * BLOCK, BLOCK)
            if disk.read(block * BLOCK, BLOCK) != expected:
                raise AssertionError(f"{path}: block {block} does not read back as written")


# ---------------------------------------------------------------------- runs


class Results:
    """Best seconds per (subject, operation); every run is also printed to stderr as it ends."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.best: dict[tuple[str, str], float] = {}

    def add(self, subject: str, operation: str, seconds: float) -> None:
        key = (subject, operation)
        self.best[key] = min(seconds, self.best.get(key, float("inf")))
        print(f"  {subject:<14} {operation:<10} {self.size / seconds / MB:10.0f} MB/s", file=sys.stderr)

    def mb_s(self, subject: str, operation: str) -> float | None:
        seconds = self.best.get((subject, operation))
        return None if seconds is None else self.size / seconds / MB


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


def reference_round(directory: str, work: Workload, results: Results) -> None:
    """One run of every reference measurement; leaves no file behind."""
    raw = os.path.join(directory, "raw.img")
    copy = os.path.join(directory, "copy.img")
    try:
        prefault(directory, work)
        results.add("plain", "write new", plain_write(raw, work, os.O_CREAT | os.O_EXCL))
        results.add("plain", "rewrite", plain_write(raw, work, 0))
        results.add("plain", "read", plain_read(raw, work))
        prefault(directory, work)
        results.add("cp", "copy", copy_file(raw, copy, work))
    finally:
        _remove(raw, copy)


def disk_round(kind: str, directory: str, work: Workload, results: Results) -> None:
    """One run of every measurement of *kind* on a new disk; leaves no file behind but
    the chain's base (see :func:`make_base`)."""
    path = os.path.join(directory, f"{kind}.vhd")
    try:
        if kind == "fixed":
            vhd.create_fixed(path, work.size)
        elif kind == "dynamic":
            vhd.create_dynamic(path, work.size)
        else:
            vhd.create_differencing(path, os.path.join(directory, "base.vhd"))
            _rewrite_even_blocks(path, work)
            results.add(kind, "read", chain_read(path, work))
            verify(path, work, leaf_blocks=True)
        prefault(directory, work)
        results.add(kind, "write new", chain_write(path, work))
        results.add(kind, "rewrite", chain_write(path, work))
        if kind != "chain":
            results.add(kind, "read", chain_read(path, work))
        verify(path, work, leaf_blocks=False)
    finally:
        _remove(path)


def make_base(directory: str, work: Workload) -> None:
    """The chain's base, a dynamic disk written whole (untimed), shared by every round."""
    base = os.path.join(directory, "base.vhd")
    vhd.create_dynamic(base, work.size)
    chain_write(base, work)


def _rewrite_even_blocks(path: str, work: Workload) -> None:
    """Untimed set-up of the chain: the leaf's pattern into blocks 0, 2, 4, ..."""
    with vhd.Chain.open(path, writable=True) as disk:
        for block in range(0, work.size // BLOCK, 2):
            disk.write(block * BLOCK, pattern(work.leaf_data, block * BLOCK, BLOCK))
        disk.flush()


# ---------------------------------------------------------------------- report


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (
        f"{os.cpu_count()} cores ({model}), {format_size(memory)} RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, numpy {np.__version__}"
    )


def file_system(directory: str) -> str:
    """The type of the file system that holds *directory* (longest mount point)."""
    best, kind = "", "unknown"
    real = os.path.realpath(directory)
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1]
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: Results, disks: list[str]) -> str:
    headers = ("disk", "operation", "MB/s", "plain MB/s", "ours/plain", "cp MB/s", "ours/cp", ">= 1 GB/s")
    rows: list[tuple[str, ...]] = []
    copy = results.mb_s("cp", "copy")
    for operation in OPERATIONS:
        rows.append(
            ("raw file (plain)", operation, _cell(results.mb_s("plain", operation), ".0f")) + ("",) * 5
        )
    rows.append(("raw file (cp)", "copy", _cell(copy, ".0f")) + ("",) * 5)
    for kind in disks:
        for operation in OPERATIONS:
            ours = results.mb_s(kind, operation)
            plain = results.mb_s("plain", operation)
            rows.append(
                (
                    DISK_NAMES[kind],
                    operation,
                    _cell(ours, ".0f"),
                    _cell(plain, ".0f"),
                    _cell(None if ours is None or plain is None else ours / plain, ".2f"),
                    _cell(copy, ".0f"),
                    _cell(None if ours is None or copy is None else ours / copy, ".2f"),
                    "-" if ours is None else ("yes" if ours >= GOAL_MB_S else "NO"),
                )
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# ---------------------------------------------------------------------- main


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sequential VHD read/write throughput against plain pwritev/preadv and cp."
    )
    parser.add_argument("--size", type=_size, default=2 << 30, help="virtual disk size (default 2G)")
    parser.add_argument("--chunk", type=_size, default=8 << 20, help="bytes per read/write call (default 8M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (default 3)")
    parser.add_argument(
        "--dir", default="/var/tmp", help="where to make the temporary files (default /var/tmp)"
    )
    parser.add_argument(
        "--disks",
        default=",".join(DISKS),
        help=f"comma-separated subset of {','.join(DISKS)} (default all)",
    )
    parser.add_argument("--fsync", action="store_true", help="include fsync in the write timings")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % BLOCK:
        parser.error(f"--size must be a positive multiple of {format_size(BLOCK)}")
    if args.chunk <= 0 or args.chunk % vhd.SECTOR_SIZE:
        parser.error(f"--chunk must be a positive multiple of {vhd.SECTOR_SIZE}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    disks = [d for d in args.disks.split(",") if d]
    unknown = sorted(set(disks) - set(DISKS))
    if unknown or not disks:
        parser.error(f"--disks: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(DISKS)}")
    args.disks = [d for d in DISKS if d in disks]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(20240601)
    work = Workload(
        size=args.size,
        chunk=args.chunk,
        data=rng.bytes(args.chunk),
        leaf_data=rng.bytes(args.chunk),
        fsync=args.fsync,
    )
    results = Results(args.size)
    directory = tempfile.mkdtemp(prefix="vhd-bench-", dir=args.dir)
    try:
        if "chain" in args.disks:
            make_base(directory, work)
        # Rounds go round-robin over the subjects rather than repeating each in turn, so
        # that the reference and every disk meet the same machine state (see the module
        # docstring on first-touch memory).
        for run in range(1, args.repeat + 1):
            print(f"run {run} of {args.repeat}:", file=sys.stderr)
            reference_round(directory, work, results)
            for kind in args.disks:
                disk_round(kind, directory, work, results)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("VHD sequential throughput")
    print(f"  machine: {machine()}")
    print(f"  files:   {args.dir} ({file_system(args.dir)})")
    print(
        f"  disk {format_size(args.size)} in chunks of {format_size(args.chunk)}, best of {args.repeat}; "
        f"page cache warm for reads; writes {'with' if args.fsync else 'without'} fsync; 1 MB = 10^6 B"
    )
    print()
    print(table(results, args.disks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
