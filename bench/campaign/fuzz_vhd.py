"""Fuzz target: the VHD parser – footer, dynamic header, BAT, sector bitmaps, parent
locators, chain opening – through its public readers (:func:`agentless.vhd.check`,
:meth:`agentless.vhd.Chain.open`, reads, extents, a write).

Templates are real files made by the library: a dynamic base with data in two blocks, a
differencing child over it (whose locators name the base), a fixed disk. Each is held
as the list of its non-zero sectors, so writing an input is a truncate and a few small
writes (data blocks stay sparse). An input mutates one or two of them by structure:

* footer and header fields set to interesting values (offsets, sizes, counts, types),
  BAT entries pointed at other blocks, metadata or past the end, bitmaps filled or
  cleared, locator entries and their data replaced by other paths (the file itself, a
  directory, /dev/null, a missing file, NULs), the file cut or grown;
* then, most of the time, the checksums fixed, so that the input gets past them;
* sometimes a few blind byte edits on top.

Checked per input: no exception but :class:`~agentless.vhd.VhdError` from any reader;
``check`` finds no problem only in a file that opens; a write to a chain that opened is
read back exactly.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

from agentless import vhd
from agentless.vhd.footer import vhd_checksum

from .fuzzing import fuzz_outcome, run_target
from .harness import Outcome, Row, Scale
from .mutate import havoc, interesting, put_int

__all__ = ["EXPECTED", "ROW", "case", "prepare"]

EXPECTED: tuple[type[BaseException], ...] = (vhd.VhdError,)
BOUND = 5.0
_BLOCK = 512 * 1024
_FOOTER_FIELDS = ((0, 8), (8, 4), (12, 4), (16, 8), (40, 8), (48, 8), (56, 4), (60, 4), (68, 16), (84, 1))
_HEADER_FIELDS = ((0, 8), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (40, 16), (56, 4))
_LOCATOR_FIELDS = ((4, 4), (8, 4), (12, 4), (16, 8))
_PLATFORMS = (b"W2ru", b"W2ku", b"MacX", b"\0\0\0\0", b"Wi2r", b"Wi2k", b"XXXX")


@dataclasses.dataclass
class _Image:
    """A VHD file as its non-zero runs of sectors (offset -> bytes), its size, and the
    offsets of its structures (from the library's own parse of the template)."""

    size: int
    runs: dict[int, bytearray]
    header: int | None
    bat: int | None
    entries: int
    locators: list[int]  # offsets of locator data
    blocks: list[int]  # offsets of allocated blocks (their bitmaps)

    def copy(self) -> _Image:
        return dataclasses.replace(self, runs={k: bytearray(v) for k, v in self.runs.items()})

    def at(self, offset: int, length: int) -> tuple[bytearray, int]:
        """The run holding [offset, offset+length) and the position in it: runs that
        overlap the range are merged into one (runs never overlap)."""
        for start, run in self.runs.items():
            if 0 <= start <= offset and offset + length <= start + len(run):
                return run, offset - start
        lo, hi = offset, offset + length
        overlapping = [s for s, r in self.runs.items() if s >= 0 and s < hi and s + len(r) > lo]
        lo = min([lo, *overlapping])
        hi = max([hi, *(s + len(self.runs[s]) for s in overlapping)])
        merged = bytearray(hi - lo)
        for s in overlapping:
            run = self.runs.pop(s)
            merged[s - lo : s - lo + len(run)] = run
        self.runs[lo] = merged
        return merged, offset - lo

    def write(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            footer = self.runs.get(-1)
            for offset, run in self.runs.items():
                if offset >= 0 and offset < self.size:
                    os.pwrite(fd, run[: self.size - offset], offset)
            os.ftruncate(fd, self.size)
            if footer is not None and self.size >= len(footer):
                os.pwrite(fd, footer, self.size - len(footer))
        finally:
            os.close(fd)


def _template(path: Path) -> _Image:
    with vhd.VhdImage.open(path) as image:
        size = os.path.getsize(path)
        data = path.read_bytes()
        runs: dict[int, bytearray] = {-1: bytearray(data[-512:])}  # -1: the footer, at the end
        body = data[:-512]
        offset = 0
        while offset < len(body):
            if any(body[offset : offset + 512]):
                start = offset
                while offset < len(body) and any(body[offset : offset + 512]):
                    offset += 512
                runs[start] = bytearray(body[start:offset])
            else:
                offset += 512
        header = image.header
        return _Image(
            size=size,
            runs=runs,
            header=image.footer.data_offset if header else None,
            bat=header.table_offset if header else None,
            entries=header.max_table_entries if header else 0,
            locators=[loc.offset for loc in header.locators if loc.used] if header else [],
            blocks=[int(b) * 512 for b in image.bat if b != 0xFFFFFFFF] if header else [],
        )


@dataclasses.dataclass
class _State:
    templates: dict[str, _Image]
    files: dict[str, str]  # name -> path of the file an input is written to
    paths: list[str]  # what a locator may name
    dirty: set[str] = dataclasses.field(default_factory=set)  # files that differ from their template


def prepare(workdir: Path) -> _State:
    """Make the template files with the library, in *workdir*."""
    work = workdir / "t"
    work.mkdir(exist_ok=True)
    base, child, fixed = work / "base.vhd", work / "child.vhd", work / "fixed.vhd"
    vhd.create_dynamic(base, 2 * _BLOCK, block_size=_BLOCK)
    with vhd.Chain.open(base, writable=True) as disk:
        disk.write(0, b"base" * 1024)
        disk.write(2 * _BLOCK - 4096, b"tail" * 1024)
    vhd.create_differencing(child, base)
    with vhd.Chain.open(child, writable=True) as disk:
        disk.write(_BLOCK + 512, b"leaf" * 256)
    vhd.create_fixed(fixed, 64 * 1024)
    templates = {name: _template(work / f"{name}.vhd") for name in ("base", "child", "fixed")}
    (work / "dir").mkdir(exist_ok=True)
    (work / "short").write_bytes(b"conectix")
    paths = [
        "base.vhd",
        "./base.vhd",
        str(base),
        f"../{work.name}/base.vhd",
        "child.vhd",
        str(child),
        "fixed.vhd",
        "missing.vhd",
        "dir",
        ".",
        "..",
        "/",
        "/dev/null",
        "short",
        "",
        "base.vhd\0junk",
        "C:\\images\\base.vhd",
        ".\\base.vhd",
        "x" * 300,
        "\udcff\ufffe",
    ]
    files = {name: str(work / f"{name}.vhd") for name in templates}
    return _State(templates, files, paths)


def _fix_checksums(image: _Image, rng: random.Random) -> None:
    copy = 0 if image.header is not None else None  # fixed disks have no copy
    for offset, size, at in ((-1, 512, 64), (copy, 512, 64), (image.header, 1024, 36)):
        if offset is None or rng.random() < 0.1:
            continue
        run, pos = image.at(offset, size) if offset >= 0 else (image.runs[-1], 0)
        raw = run[pos : pos + size]
        if len(raw) == size:
            put_int(run, pos + at, 4, vhd_checksum(raw, at))


def _encode(path: str, rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return path.encode("utf-8", "surrogatepass")
    return path.encode("utf-16-le", "surrogatepass")


def _mutate(image: _Image, state: _State, rng: random.Random) -> None:
    near = (image.size, image.header or 0, image.bat or 0, *image.blocks, *image.locators)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.randrange(11 if image.header is not None else 4)
        if kind == 0:  # a footer field, at the end, in the copy at 0, or both
            offset, size = rng.choice(_FOOTER_FIELDS)
            value = interesting(rng, 8 * size, near)
            where = rng.choice(("end", "end", "copy", "both"))
            if where in ("end", "both"):
                put_int(image.runs[-1], offset, size, value)
            if where in ("copy", "both") and image.header is not None:
                run, pos = image.at(0, 512)
                put_int(run, pos + offset, size, value)
        elif kind == 1:  # the file cut or grown
            image.size = max(
                0,
                rng.choice(
                    (
                        image.size - 512,
                        image.size + 512,
                        image.size - _BLOCK,
                        image.size + rng.randrange(1, 4096),
                        rng.randrange(image.size + 1),
                        512,
                    )
                ),
            )
        elif kind == 2:  # disk type or unique id swapped
            put_int(image.runs[-1], 60, 4, rng.choice((2, 3, 4, 1, 5, 0)))
        elif kind == 3:  # blind edits of the footer
            havoc(image.runs[-1], rng, rng.randrange(1, 4))
            del image.runs[-1][512:]
            image.runs[-1].extend(bytes(512 - len(image.runs[-1])))
        elif kind == 4:  # a header field
            offset, size = rng.choice(_HEADER_FIELDS)
            run, pos = image.at(image.header or 0, 1024)
            put_int(run, pos + offset, size, interesting(rng, 8 * size, near))
        elif kind == 5 and image.bat is not None:  # a BAT entry
            index = rng.randrange(max(1, image.entries + 1))
            run, pos = image.at(image.bat + 4 * index, 4)
            choices = [
                0xFFFFFFFF,
                0,
                (image.header or 0) // 512,
                image.bat // 512,
                image.size // 512,
                image.size // 512 - 1,
                interesting(rng, 32),
            ]
            choices += [b // 512 + rng.choice((-1, 0, 1)) for b in image.blocks]
            put_int(run, pos, 4, rng.choice(choices) & 0xFFFFFFFF)
        elif kind == 6:  # a parent locator entry
            index = rng.randrange(8)
            run, pos = image.at((image.header or 0) + 576 + 24 * index, 24)
            if rng.random() < 0.4:
                run[pos : pos + 4] = rng.choice(_PLATFORMS)
            else:
                offset, size = rng.choice(_LOCATOR_FIELDS)
                put_int(run, pos + offset, size, interesting(rng, 8 * size, near))
        elif kind == 7 and image.locators:  # a locator's data: another path
            offset = rng.choice(image.locators)
            run, pos = image.at(offset, 512)
            data = _encode(rng.choice(state.paths), rng)
            run[pos : pos + 512] = data[:512].ljust(512, b"\0")
            header, hpos = image.at(image.header or 0, 1024)
            for i in range(8):  # the entry's length follows the data, most of the time
                entry = hpos + 576 + 24 * i
                if int.from_bytes(header[entry + 16 : entry + 24], "big") == offset and rng.random() < 0.8:
                    put_int(header, entry + 8, 4, len(data))
        elif kind == 8:  # the parent's name
            run, pos = image.at((image.header or 0) + 64, 512)
            name = rng.choice(state.paths).encode("utf-16-be", "surrogatepass")[:512]
            run[pos : pos + 512] = name.ljust(512, b"\0")
        elif kind == 9 and image.blocks:  # a sector bitmap
            run, pos = image.at(rng.choice(image.blocks), 128)
            fill = rng.choice((b"\xff", b"\0", bytes([rng.randrange(256)])))
            start, end = sorted((rng.randrange(129), rng.randrange(129)))
            run[pos + start : pos + end] = fill * (end - start)
        else:  # blind edits of the header or the BAT
            offset = rng.choice([o for o in (image.header, image.bat) if o is not None])
            run, pos = image.at(offset, 512)
            piece = havoc(bytearray(run[pos : pos + 512]), rng, rng.randrange(1, 5))
            run[pos : pos + 512] = piece[:512].ljust(512, b"\0")
    if rng.random() < 0.85:
        _fix_checksums(image, rng)
    if rng.random() < 0.05:
        victim = rng.choice([k for k in image.runs if k >= 0] or [-1])
        havoc(image.runs[victim], rng, rng.randrange(1, 4))


def case(state: _State, rng: random.Random) -> bool:
    """One input: mutate one or two templates, write them, run every reader on the leaf."""
    choice = rng.random()
    mutated = (
        {"child"} if choice < 0.5 else {"base"} if choice < 0.7 else {"fixed"} if choice < 0.8 else set()
    )
    if not mutated or rng.random() < 0.15:
        mutated |= {"child", "base"}
    for name, template in state.templates.items():
        if name in mutated:
            image = template.copy()
            _mutate(image, state, rng)
            image.write(state.files[name])
            state.dirty.add(name)
        elif name in state.dirty:
            template.write(state.files[name])
            state.dirty.discard(name)
    leaf = state.files[rng.choice(("child", "child", "base", "fixed"))]
    try:
        chain = vhd.Chain.open(leaf)
    except vhd.VhdError:
        if rng.random() < 0.25 and not vhd.check(leaf):
            raise AssertionError("check found no problem in a file that does not open") from None
        return False
    with chain:
        size = chain.size
        if rng.random() < 0.2:
            chain.extents()
        for _ in range(2):
            offset = rng.choice((0, size - 512, rng.randrange(size), size - 1, _BLOCK - 1))
            offset = max(0, min(offset, size - 1))
            length = min(size - offset, rng.choice((1, 512, 4096, 65536, _BLOCK + 1)))
            chain.read(offset, length)
            chain.file_source(offset, length)
            chain.extents(offset, length)
    if rng.random() < 0.5:
        vhd.check(leaf)
    if rng.random() < 0.2:
        offset = rng.randrange(0, max(1, size - 4096))
        data = rng.randbytes(min(4096, size - offset))
        state.dirty.update(state.templates)  # a write may change any file of the chain
        with vhd.Chain.open(leaf, writable=True) as disk:
            disk.write(offset, data)
        with vhd.Chain.open(leaf) as disk:
            if disk.read(offset, len(data)) != data:
                raise AssertionError(f"a write of {len(data)} bytes at {offset} did not read back")
    return True


def run(scale: Scale) -> Outcome:
    tally = run_target(__name__, scale, BOUND)
    what = "mutated VHD files (footer, header, BAT, bitmaps, locators, chains)"
    return fuzz_outcome(tally, what, scale, BOUND, __name__, accepted="opened as sound")


ROW = Row(
    name="fuzz-vhd",
    title="VHD parser: footer, dynamic header, BAT, bitmaps, parent locators, chain open",
    checked="only VhdError raised, each input within 5 s, RSS flat; check() agrees with open; "
    "writes read back",
    run=run,
)
