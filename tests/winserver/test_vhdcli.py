"""``winserver vhd ...`` run as a real program: what people and scripts see.

Every test starts the console script in a subprocess (``python -m agentless.winserver.cli``
when the script is not installed) and looks only at exit codes, stdout, stderr and files:

* success prints a report, one JSON document with ``--json``, and exits 0;
* an expected failure prints exactly one line on stderr (never a traceback), nothing on
  stdout, and exits 1; a wrong command line exits 2 with argparse's usage message.

The library itself only prepares disks for failure cases and reads back what the commands
wrote (each subprocess costs a Python start-up, and the whole module must stay fast).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from agentless import vhd

pytestmark = pytest.mark.timeout(60)

_SCRIPT = Path(sys.executable).with_name("winserver")
WINSERVER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "agentless.winserver.cli"]

K, M, G = 1 << 10, 1 << 20, 1 << 30
BLOCK = 512 * K
REPORTING_COMMANDS = ["create", "info", "map", "check", "repair", "coalesce", "import", "export", "write"]


# ---------------------------------------------------------------------- running the program


def run(
    *args: object, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``winserver vhd ARGS...``; output decoded, never raises on a non-zero exit."""
    result = subprocess.run(
        [*WINSERVER, "vhd", *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=60,
        cwd=cwd,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def ok(*args: object, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    result = run(*args, stdin=stdin, cwd=cwd)
    assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def ok_json(*args: object, stdin: bytes | None = None, cwd: Path | None = None) -> Any:
    """Run a command with ``--json`` that must succeed; its one JSON document."""
    return json.loads(ok(*args, "--json", stdin=stdin, cwd=cwd))


def fails(*args: object, stdin: bytes | None = None) -> str:
    """Run a command that must fail as an expected failure: exit 1, exactly one line on
    stderr, nothing on stdout. Returns that line."""
    result = run(*args, stdin=stdin)
    assert result.returncode == 1, f"{args} exited {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].startswith("winserver")
    return lines[0]


def usage_error(*args: object) -> str:
    """Run a command whose command line is wrong: exit 2, argparse's usage and one error
    line on stderr, no traceback. Returns the error line."""
    result = run(*args)
    assert result.returncode == 2, f"{args} exited {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("winserver") and ": error: " in last, result.stderr
    return last


# ---------------------------------------------------------------------- files


def random_file(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def extents(path: Path) -> list[tuple[int, int]]:
    """The ``map --json`` extents of *path* as (offset, length) pairs."""
    document = ok_json("map", path)
    assert document["allocated"] == sum(e["length"] for e in document["extents"])
    return [(e["offset"], e["length"]) for e in document["extents"]]


def contents(path: Path) -> bytes:
    """The bytes of the whole chain of *path*, read with the library: the oracle for what
    the commands wrote (cheaper than running ``export`` each time)."""
    with vhd.Chain.open(path) as chain:
        return chain.read(0, chain.size)


def export(disk: Path, raw: Path) -> bytes:
    """The whole chain of *disk* as raw bytes, through ``export``."""
    document = ok_json("export", disk, raw)
    assert document["raw"] == str(raw)
    data = raw.read_bytes()
    assert len(data) == document["size"]
    raw.unlink()
    return data


def patched(data: bytes, offset: int, piece: bytes) -> bytes:
    return data[:offset] + piece + data[offset + len(piece) :]


# ---------------------------------------------------------------------- create and info


def test_create_dynamic(tmp_path: Path) -> None:
    """A dynamic disk of the default block size, as ``create --json`` and ``info --json``
    describe it."""
    path = tmp_path / "d.vhd"
    created = ok_json("create", path, "--size", "64M")
    assert created["path"] == str(path)
    assert created["type"] == "dynamic"
    assert created["size"] == 64 * M
    assert created["block_size"] == 2 * M
    assert created["max_table_entries"] == 32
    assert created["allocated_blocks"] == 0
    assert created["file_size"] == path.stat().st_size < 64 * K
    uuid.UUID(created["unique_id"])
    info = ok_json("info", path)
    assert info["chain"] == [str(path)]
    assert {k: v for k, v in info.items() if k != "chain"} == created


def test_info_fields(tmp_path: Path) -> None:
    """Every field of ``info --json`` for a dynamic disk, with its type and meaning."""
    path = tmp_path / "d.vhd"
    ok("create", path, "--size", "10G")
    info = ok_json("info", path)
    assert set(info) == {
        "path",
        "type",
        "size",
        "unique_id",
        "timestamp",
        "creator",
        "geometry",
        "file_size",
        "block_size",
        "max_table_entries",
        "allocated_blocks",
        "chain",
    }
    assert (info["type"], info["size"], info["max_table_entries"]) == ("dynamic", 10 * G, 5120)
    when = datetime.datetime.fromisoformat(info["timestamp"])
    assert abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 3600
    assert info["creator"] == "tap"
    geometry = info["geometry"]
    assert set(geometry) == {"cylinders", "heads", "sectors"}
    assert geometry["cylinders"] * geometry["heads"] * geometry["sectors"] * 512 <= 10 * G
    text = ok("info", path)
    assert f"path: {path}" in text and "type: dynamic" in text and f"chain: {path}" in text


def test_create_fixed(tmp_path: Path) -> None:
    """A fixed disk: the data then the footer, no dynamic header fields."""
    path = tmp_path / "f.vhd"
    created = ok_json("create", path, "--size", "1M", "--type", "fixed")
    assert (created["type"], created["size"], created["file_size"]) == ("fixed", M, M + 512)
    assert "block_size" not in created and "parent" not in created
    assert path.stat().st_size == M + 512
    assert extents(path) == []
    assert "created fixed disk" in ok("create", tmp_path / "g.vhd", "--size", "1M", "--type", "fixed")


@pytest.mark.parametrize(("block", "size"), [("512K", 524288), ("1M", M), ("256M", 256 * M)])
def test_create_block_size(tmp_path: Path, block: str, size: int) -> None:
    """``--block-size`` sets the header's Block Size and so the number of BAT entries."""
    path = tmp_path / "d.vhd"
    created = ok_json("create", path, "--size", "512M", "--block-size", block)
    assert created["block_size"] == size
    assert created["max_table_entries"] == 512 * M // size


def test_create_differencing(tmp_path: Path) -> None:
    """``--parent`` makes a differencing disk of the parent's size and block size that
    records the parent's id, name and two locators."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    parent = ok_json("create", base, "--size", "8M", "--block-size", "512K")
    created = ok_json("create", child, "--parent", base)
    assert created["type"] == "differencing"
    assert (created["size"], created["block_size"]) == (8 * M, BLOCK)
    assert created["unique_id"] != parent["unique_id"]
    assert created["parent"]["unique_id"] == parent["unique_id"]
    assert created["parent"]["name"] == "base.vhd"
    locators = {loc["platform"]: loc["path"] for loc in created["parent"]["locators"]}
    assert locators == {"W2ru": ".\\base.vhd", "W2ku": str(base)}
    info = ok_json("info", child)
    assert info["chain"] == [str(child), str(base)]
    assert f"parent: base.vhd ({parent['unique_id']})" in ok("info", child)


def test_create_differencing_over_fixed(tmp_path: Path) -> None:
    """A differencing disk over a fixed parent takes the default block size."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    ok("create", base, "--size", "4M", "--type", "fixed")
    created = ok_json("create", child, "--parent", base)
    assert (created["type"], created["size"], created["block_size"]) == ("differencing", 4 * M, 2 * M)


def test_relative_parent_survives_move(tmp_path: Path) -> None:
    """Paths given relative to the working directory work, and the relative locator
    (``W2ru``) still finds the parent after the whole directory has moved."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    ok("create", "base.vhd", "--size", "4M", cwd=tmp_path / "a")
    created = ok_json("create", "sub/child.vhd", "--parent", "base.vhd", cwd=tmp_path / "a")
    locators = {loc["platform"]: loc["path"] for loc in created["parent"]["locators"]}
    assert locators["W2ru"] == "..\\base.vhd"
    (tmp_path / "a").rename(tmp_path / "b")
    info = ok_json("info", tmp_path / "b" / "sub" / "child.vhd")
    assert info["chain"] == [str(tmp_path / "b" / "sub" / "child.vhd"), str(tmp_path / "b" / "base.vhd")]


# ---------------------------------------------------------------------- write and map


def test_write_then_map_dynamic(tmp_path: Path) -> None:
    """``write --offset N --input FILE`` allocates whole blocks of a dynamic disk, which
    ``map --json`` lists merged; the bytes read back through ``export``."""
    disk = tmp_path / "d.vhd"
    ok("create", disk, "--size", "8M", "--block-size", "512K")
    assert extents(disk) == []
    first = random_file(tmp_path / "a.bin", 3000, seed=1)
    report = ok_json("write", disk, "--offset", M + 100, "--input", tmp_path / "a.bin")
    assert report == {"vhd": str(disk), "offset": M + 100, "bytes_written": 3000}
    assert extents(disk) == [(2 * BLOCK, BLOCK)]
    second = random_file(tmp_path / "b.bin", BLOCK + 1, seed=2)  # blocks 3 and 4
    ok("write", disk, "--offset", "1536K", "--input", tmp_path / "b.bin")
    assert extents(disk) == [(2 * BLOCK, 3 * BLOCK)]
    document = ok_json("map", disk)
    assert (document["size"], document["allocated"]) == (8 * M, 3 * BLOCK)
    expected = patched(patched(bytes(8 * M), M + 100, first), 3 * BLOCK, second)
    assert contents(disk) == expected
    assert ok_json("info", disk)["allocated_blocks"] == 3


def test_write_from_stdin(tmp_path: Path) -> None:
    """``--input -`` reads the bytes from standard input; ``--offset`` takes suffixes."""
    disk = tmp_path / "d.vhd"
    ok("create", disk, "--size", "4M", "--block-size", "512K")
    data = random.Random(3).randbytes(10000)
    assert ok_json("write", disk, "--offset", "2M", "--input", "-", stdin=data)["bytes_written"] == 10000
    assert contents(disk)[2 * M : 2 * M + 10000] == data
    assert "wrote 5 bytes at offset 7" in ok("write", disk, "--offset", 7, "--input", "-", stdin=b"hello")


def test_write_differencing(tmp_path: Path) -> None:
    """Writes to a differencing disk go to the child only, sector by sector: the child's
    map shows the sectors written over the parent's blocks, the parent is unchanged."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    ok("create", base, "--size", "4M", "--block-size", "512K")
    base_data = random_file(tmp_path / "base.bin", 4096, seed=4)
    ok("write", base, "--offset", 0, "--input", tmp_path / "base.bin")
    ok("create", child, "--parent", base)
    before = contents(base)
    piece = random_file(tmp_path / "piece.bin", 1000, seed=5)
    report = ok_json("write", child, "--offset", 3 * M + 100, "--input", tmp_path / "piece.bin")
    assert report["bytes_written"] == 1000
    # block 0 of the parent, and the three sectors of bytes 3M+100 .. 3M+1100 of the child
    assert extents(child) == [(0, BLOCK), (3 * M, 1536)]
    assert ok_json("info", child)["allocated_blocks"] == 1
    assert contents(child) == patched(before, 3 * M + 100, piece)
    assert contents(base) == before == patched(bytes(4 * M), 0, base_data)
    overwrite = random_file(tmp_path / "over.bin", 512, seed=6)
    ok("write", child, "--offset", 1024, "--input", tmp_path / "over.bin")
    assert contents(child)[:4096] == patched(base_data, 1024, overwrite)


def test_write_fixed(tmp_path: Path) -> None:
    """A fixed disk is written in place; its map comes from the file's data regions."""
    disk = tmp_path / "f.vhd"
    ok("create", disk, "--size", "8M", "--type", "fixed")
    data = random_file(tmp_path / "a.bin", 8192, seed=7)
    ok("write", disk, "--offset", "4M", "--input", tmp_path / "a.bin")
    assert disk.stat().st_size == 8 * M + 512
    [(offset, length)] = extents(disk)
    assert offset <= 4 * M and 4 * M + 8192 <= offset + length <= 8 * M
    assert contents(disk)[4 * M : 4 * M + 8192] == data


# ---------------------------------------------------------------------- check


def test_check_sound(tmp_path: Path) -> None:
    """A sound disk (and chain) checks ok: exit 0, one line on stdout."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    ok("create", base, "--size", "4M")
    ok("create", child, "--parent", base)
    for path in (base, child):
        assert ok("check", path) == f"{path}: ok\n"
        assert ok_json("check", path) == {"path": str(path), "ok": True, "repairable": False, "problems": []}


def _break_footer_checksum(path: Path) -> int:
    """Change a byte of the footer's Original Size, leaving the checksum stale; the file
    offset of the checksum field."""
    end = path.stat().st_size - 512
    with path.open("r+b") as f:
        f.seek(end + 40)
        f.write(b"\x7f")
    return end + 64


def test_check_corrupt(tmp_path: Path) -> None:
    """A corrupt disk: exit 1, exactly one line on stderr naming the file, the field and the
    offset; with ``--json`` the problems as a document (still exit 1)."""
    path = tmp_path / "d.vhd"
    ok("create", path, "--size", "4M")
    at = _break_footer_checksum(path)
    line = fails("check", path)
    assert line.startswith(f"winserver vhd check: {path}: footer.checksum at offset {at}: ")
    result = run("check", path, "--json")
    assert result.returncode == 1 and result.stderr == ""
    document = json.loads(result.stdout)
    assert document["ok"] is False
    [problem] = document["problems"]
    assert problem["path"] == str(path)
    assert (problem["field"], problem["offset"]) == ("footer.checksum", at)
    assert "stored" in problem["reason"] and "computed" in problem["reason"]
    assert problem["used"] == "the footer copy at offset 0"
    assert problem["repair"] == "rewrite the footer at the end from the copy at offset 0"
    assert document["repairable"] is True


def _damage(path: Path, how: str) -> None:
    """Break a 4 MiB dynamic disk with data as issue 13 lists: the footer at the end,
    its copy at 0, both, the dynamic header, a BAT entry out of range."""
    end = path.stat().st_size - 512
    places = {
        "end": [end + 40],
        "copy": [40],
        "both": [end + 40, 40],
        "header": [512 + 64],  # Parent Unicode Name, checksum left stale
    }
    with path.open("r+b") as f:
        for offset in places.get(how, []):
            f.seek(offset)
            f.write(b"\x7f")
        if how == "bat":
            f.seek(1536 + 4 * 5)
            f.write((1 << 30).to_bytes(4, "big"))  # block 5 far past the end of the file


@pytest.mark.parametrize(
    ("how", "fields", "used", "mended"),
    [
        ("end", ["footer.checksum"], "the footer copy at offset 0", True),
        ("copy", ["footer copy.checksum"], "the footer at the end", True),
        ("both", ["footer.checksum", "footer copy.checksum"], None, False),
        ("header", ["header.checksum"], None, False),
        ("bat", ["bat[5]"], None, False),
    ],
)
def test_check_reports_damage_and_repair_mends_what_it_can(
    tmp_path: Path, how: str, fields: list[str], used: str | None, mended: bool
) -> None:
    """Each damaged structure: ``check`` exits 1 with one line per problem naming the copy
    it read instead and whether ``repair`` mends it; ``repair`` then mends the footers
    (the disk checks ok and reads as before) and leaves the rest as it was, exit 1."""
    path = tmp_path / "d.vhd"
    ok("create", path, "--size", "4M", "--block-size", "512K")
    random_file(tmp_path / "a.bin", 3 * BLOCK, seed=21)
    ok("write", path, "--offset", 4096, "--input", tmp_path / "a.bin")
    before = contents(path)
    _damage(path, how)
    damaged = path.read_bytes()

    result = run("check", path)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(fields)
    for line, field in zip(lines, fields, strict=True):
        assert line.startswith(f"winserver vhd check: {path}: {field} at offset "), line
        if used:
            assert f"(read {used} instead)" in line
        verdict = (
            f"`winserver vhd repair {path}` would " if mended else "`winserver vhd repair` cannot mend this"
        )
        assert verdict in line, line
    document = json.loads(run("check", path, "--json").stdout)
    assert [p["field"] for p in document["problems"]] == fields
    assert document["problems"][0]["used"] == used and document["repairable"] is mended

    repaired = run("repair", path)
    assert "Traceback" not in repaired.stderr
    if mended:
        assert repaired.returncode == 0 and repaired.stderr == ""
        assert repaired.stdout == f"{path}: {fields[0]}: {document['problems'][0]['repair']}\n"
        assert ok("check", path) == f"{path}: ok\n"
        assert contents(path) == before
        assert ok("repair", path) == f"{path}: ok, nothing to repair\n"
    else:
        assert repaired.returncode == 1 and repaired.stdout == ""
        assert [line.split(": ", 2)[1:2] for line in repaired.stderr.splitlines()] == [[str(path)]] * len(
            fields
        )
        assert path.read_bytes() == damaged


def test_check_missing_parent(tmp_path: Path) -> None:
    """A child whose parent is gone fails the check, naming the child."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    ok("create", base, "--size", "4M")
    ok("create", child, "--parent", base)
    base.unlink()
    line = fails("check", child)
    assert f"{child}: parent: " in line and "base.vhd" in line
    assert fails("info", child).startswith(f"winserver: {child}: parent ")


# ---------------------------------------------------------------------- coalesce


def _chain_with_data(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """base.vhd with data in blocks 0 and 2, child.vhd over it with data overlapping both
    and in a block of its own; (base, child, the chain's bytes)."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    ok("create", base, "--size", "4M", "--block-size", "512K")
    random_file(tmp_path / "p.bin", BLOCK + 4096, seed=8)
    ok("write", base, "--offset", 0, "--input", tmp_path / "p.bin")
    ok("create", child, "--parent", base)
    random_file(tmp_path / "c.bin", 5000, seed=9)
    ok("write", child, "--offset", BLOCK - 1000, "--input", tmp_path / "c.bin")
    ok("write", child, "--offset", 3 * M + 7, "--input", tmp_path / "c.bin")
    return base, child, contents(child)


def test_coalesce(tmp_path: Path) -> None:
    """``coalesce`` copies the child's sectors into the parent and removes the child; the
    parent alone then reads as the chain did."""
    base, child, chain = _chain_with_data(tmp_path)
    assert contents(base) != chain
    report = ok_json("coalesce", child)
    assert report["child"] == str(child)
    assert report["parent"] == str(base)
    assert report["child_removed"] is True
    assert report["bytes_copied"] == 2 * 5120  # each 5000-byte write touched 10 sectors
    assert not child.exists()
    assert contents(base) == chain
    assert ok("check", base) == f"{base}: ok\n"


def test_coalesce_keep_child(tmp_path: Path) -> None:
    """``--keep-child`` leaves the child in place; it and the parent both read as the chain."""
    base, child, chain = _chain_with_data(tmp_path)
    report = ok_json("coalesce", child, "--keep-child")
    assert report["child_removed"] is False
    assert child.exists()
    assert contents(base) == chain
    assert contents(child) == chain
    assert "coalesced" in ok("coalesce", child, "--keep-child")


def test_coalesce_not_differencing(tmp_path: Path) -> None:
    """Coalescing a disk without a parent is an expected failure."""
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, 4 * M)
    assert "not a differencing disk" in fails("coalesce", path)
    assert path.exists()


# ---------------------------------------------------------------------- import and export


def _sparse_raw(path: Path) -> bytes:
    """An 8 MiB raw image of 512 KiB blocks::

    block   0      1       2..5   6          7..14  15
            data   zeros   hole   some data  hole   data at the very end
                   (written, so not a hole)
    """
    rng = random.Random(10)
    size = 8 * M
    with path.open("wb") as f:
        f.truncate(size)
        f.write(rng.randbytes(BLOCK))
        f.write(bytes(BLOCK))
        f.seek(6 * BLOCK + 1234)
        f.write(rng.randbytes(1000))
        f.seek(size - 700)
        f.write(rng.randbytes(700))
    return path.read_bytes()


def test_import_keeps_zero_blocks_unallocated(tmp_path: Path) -> None:
    """``import`` allocates only blocks with non-zero data: holes and written zeros stay
    unallocated, as ``map --json`` shows."""
    raw, disk = tmp_path / "in.raw", tmp_path / "d.vhd"
    data = _sparse_raw(raw)
    report = ok_json("import", raw, disk, "--block-size", "512K")
    assert report["vhd"] == str(disk)
    assert report["size"] == len(data)
    assert report["bytes_written"] == 3 * BLOCK
    assert extents(disk) == [(0, BLOCK), (6 * BLOCK, BLOCK), (15 * BLOCK, BLOCK)]
    info = ok_json("info", disk)
    assert (info["type"], info["size"], info["block_size"], info["allocated_blocks"]) == (
        "dynamic",
        8 * M,
        BLOCK,
        3,
    )
    assert ok("check", disk) == f"{disk}: ok\n"


def test_export_is_exact_and_sparse(tmp_path: Path) -> None:
    """``export`` of an imported disk gives back the input bytes, as a sparse file."""
    raw, disk, out = tmp_path / "in.raw", tmp_path / "d.vhd", tmp_path / "out.raw"
    data = _sparse_raw(raw)
    ok("import", raw, disk, "--block-size", "512K")
    report = ok_json("export", disk, out)
    assert (report["raw"], report["size"]) == (str(out), len(data))
    assert report["bytes_written"] <= 3 * BLOCK
    assert out.read_bytes() == data
    st = out.stat()
    assert st.st_size == 8 * M
    assert st.st_blocks * 512 <= 2 * M, f"{st.st_blocks * 512} bytes allocated of {st.st_size}"


def test_import_fixed(tmp_path: Path) -> None:
    """``import --type fixed`` makes a fixed disk that exports to the same bytes; a raw
    size that is not a multiple of 512 is rounded up with zeros."""
    raw, disk = tmp_path / "in.raw", tmp_path / "f.vhd"
    data = random_file(raw, 100_000, seed=11)
    report = ok_json("import", raw, disk, "--type", "fixed")
    assert report["size"] == 100_352
    assert ok_json("info", disk)["type"] == "fixed"
    assert contents(disk) == data + bytes(352)


def test_import_fragmented_raw(tmp_path: Path) -> None:
    """A raw file whose data lie in many small pieces within one block: the block is
    written once and the report counts it once."""
    raw, disk = tmp_path / "in.raw", tmp_path / "d.vhd"
    with raw.open("wb") as f:
        f.truncate(4 * M)
        for offset in range(0, BLOCK, 64 * K):  # 8 data ranges in block 0, holes between
            f.seek(offset)
            f.write(b"\1" * 4096)
    report = ok_json("import", raw, disk, "--block-size", "512K")
    assert extents(disk) == [(0, BLOCK)]
    assert report["bytes_written"] == BLOCK


def test_export_chain(tmp_path: Path) -> None:
    """``export`` of a differencing disk writes the whole chain."""
    base, child, chain = _chain_with_data(tmp_path)
    assert export(child, tmp_path / "out.raw") == chain
    expected = export(base, tmp_path / "base.raw")
    expected = patched(expected, BLOCK - 1000, (tmp_path / "c.bin").read_bytes())
    expected = patched(expected, 3 * M + 7, (tmp_path / "c.bin").read_bytes())
    assert chain == expected


# ---------------------------------------------------------------------- expected failures


@pytest.mark.parametrize(
    "args",
    [
        ("info", "{missing}"),
        ("map", "{missing}"),
        ("check", "{missing}"),
        ("coalesce", "{missing}"),
        ("export", "{missing}", "{tmp}/out.raw"),
        ("import", "{missing}", "{tmp}/out.vhd"),
        ("create", "{tmp}/c.vhd", "--parent", "{missing}"),
        ("write", "{missing}", "--offset", "0", "--input", "{tmp}/in.bin"),
        ("write", "{tmp}/d.vhd", "--offset", "0", "--input", "{missing}"),
    ],
    ids=lambda args: args[0] + ("-input" if args[-1] == "{missing}" and args[0] == "write" else ""),
)
def test_missing_file(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A file that does not exist: one line naming it, exit 1, nothing created."""
    vhd.create_dynamic(tmp_path / "d.vhd", M)
    (tmp_path / "in.bin").write_bytes(b"x" * 512)
    before = sorted(os.listdir(tmp_path))
    missing = tmp_path / "missing.vhd"
    line = fails(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert "missing.vhd" in line and "No such file" in line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "args",
    [
        ("create", "{target}", "--size", "1M"),
        ("create", "{target}", "--size", "1M", "--type", "fixed"),
        ("create", "{target}", "--parent", "{disk}"),
        ("import", "{raw}", "{target}"),
        ("export", "{disk}", "{target}"),
    ],
    ids=["create", "create-fixed", "create-parent", "import", "export"],
)
def test_existing_target(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A command never overwrites an existing file: one line, exit 1, file untouched."""
    disk, raw, target = tmp_path / "d.vhd", tmp_path / "in.raw", tmp_path / "target"
    vhd.create_dynamic(disk, M)
    random_file(raw, 4096, seed=12)
    target.write_bytes(b"precious")
    line = fails(*(a.format(disk=disk, raw=raw, target=target) for a in args))
    assert str(target) in line and "exists" in line
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["d.vhd", "in.raw", "target"]


@pytest.mark.parametrize(
    "args",
    [
        ("create", "{target}", "--size", "1M"),
        ("import", "{raw}", "{target}"),
        ("export", "{disk}", "{target}"),
    ],
    ids=["create", "import", "export"],
)
def test_target_in_missing_directory(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A target whose directory does not exist: the one line names that target."""
    disk, raw, target = tmp_path / "d.vhd", tmp_path / "in.raw", tmp_path / "nodir" / "x"
    vhd.create_dynamic(disk, M)
    random_file(raw, 4096, seed=15)
    line = fails(*(a.format(disk=disk, raw=raw, target=target) for a in args))
    assert ".tmp" not in line and str(target) in line


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ("1000", "multiple of 512"),
        ("0", "multiple of 512"),
        ("2041G", "2040 GiB"),
        ("2040G1", None),
        ("10Q", None),
        ("-1M", None),
        ("1.5G", None),
    ],
)
def test_bad_size(tmp_path: Path, size: str, words: str | None) -> None:
    """A size the format cannot hold fails with exit 1 and one line; text that is not a
    size at all is a command-line error (exit 2). No file is left behind either way."""
    path = tmp_path / "d.vhd"
    if words is None:
        assert "argument --size" in usage_error("create", path, "--size", size)
    else:
        assert words in fails("create", path, "--size", size)
    assert os.listdir(tmp_path) == []


def test_size_limit(tmp_path: Path) -> None:
    """2040 GiB is the largest disk: it is made (sparsely); 2040 GiB + 512 is refused."""
    ok("create", tmp_path / "max.vhd", "--size", str(2040 * G), "--type", "fixed")
    assert "2040 GiB" in fails("create", tmp_path / "big.vhd", "--size", str(2040 * G + 512))
    assert "2040 GiB" in fails("create", tmp_path / "big.vhd", "--size", "2T")


@pytest.mark.parametrize("block", ["3M", "256K", "512M", "1000"])
def test_bad_block_size(tmp_path: Path, block: str) -> None:
    """A block size that is not a power of two from 512 KiB to 256 MiB: exit 1."""
    assert "block size" in fails("create", tmp_path / "d.vhd", "--size", "4M", "--block-size", block)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("offset", "length"),
    [(4 * M - 100, 1000), (4 * M, 1), (0, 4 * M + 1), (10 * G, 512)],
    ids=["across-end", "at-end", "too-long", "far"],
)
def test_write_past_end(tmp_path: Path, offset: int, length: int) -> None:
    """A write that does not fit the disk: one line, exit 1, nothing written."""
    disk = tmp_path / "d.vhd"
    vhd.create_dynamic(disk, 4 * M, BLOCK)
    random_file(tmp_path / "in.bin", length, seed=13)
    size_before = disk.stat().st_size
    line = fails("write", disk, "--offset", offset, "--input", tmp_path / "in.bin")
    assert str(disk) in line and "nothing written" in line
    assert disk.stat().st_size == size_before
    with vhd.Chain.open(disk) as chain:
        assert chain.extents() == []


def test_write_past_end_from_stdin(tmp_path: Path) -> None:
    """The same from standard input, whose length is not known in advance."""
    disk = tmp_path / "d.vhd"
    vhd.create_dynamic(disk, 4 * M)
    before = disk.read_bytes()
    line = fails("write", disk, "--offset", 4 * M - 2, "--input", "-", stdin=b"abcd")
    assert str(disk) in line and "do not fit" in line and "nothing written" in line
    assert disk.read_bytes() == before


def test_corrupt_disk_fails_cleanly(tmp_path: Path) -> None:
    """Every command that opens a corrupt disk fails with one line naming the defect."""
    disk = tmp_path / "d.vhd"
    vhd.create_dynamic(disk, 4 * M)
    at = _break_footer_checksum(disk)
    (tmp_path / "in.bin").write_bytes(b"x")
    for args in (
        ("info", disk),
        ("map", disk),
        ("export", disk, tmp_path / "out.raw"),
        ("write", disk, "--offset", 0, "--input", tmp_path / "in.bin"),
        ("create", tmp_path / "child.vhd", "--parent", disk),
        ("coalesce", disk),
    ):
        line = fails(*args)
        assert f"{disk}: footer.checksum at offset {at}: " in line, args
    assert sorted(os.listdir(tmp_path)) == ["d.vhd", "in.bin"]


@pytest.mark.parametrize(
    "args",
    [
        ("frobnicate",),
        ("info",),
        ("write", "{disk}", "--input", "-"),
        ("write", "{disk}", "--offset", "5X", "--input", "-"),
        ("create", "{disk}", "--size", "1M", "--type", "sparse"),
        ("import", "{disk}"),
        ("info", "{disk}", "--verbose"),
    ],
    ids=["unknown-command", "no-file", "no-offset", "bad-offset", "bad-type", "no-target", "bad-option"],
)
def test_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A wrong command line exits 2 with argparse's message, before touching any file."""
    disk = tmp_path / "d.vhd"
    usage_error(*(a.format(disk=disk) for a in args))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args",
    [("create", "{disk}"), ("create", "{disk}", "--parent", "{base}", "--size", "1M")],
    ids=["no-size", "parent-and-size"],
)
def test_create_option_conflicts(tmp_path: Path, args: tuple[str, ...]) -> None:
    """``create`` without ``--size``, or with ``--parent`` and ``--size``, says what to
    give in one line, without a traceback, and makes nothing."""
    base, disk = tmp_path / "base.vhd", tmp_path / "d.vhd"
    vhd.create_dynamic(base, M)
    result = run(*(a.format(disk=disk, base=base) for a in args))
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("winserver vhd create")
    assert "--size" in result.stderr
    assert not disk.exists()


@pytest.mark.parametrize(
    "args",
    [("create", "{disk}"), ("create", "{disk}", "--parent", "{base}", "--size", "1M")],
    ids=["no-size", "parent-and-size"],
)
def test_create_option_conflicts_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Missing or conflicting ``create`` options are a wrong command line: exit 2."""
    base, disk = tmp_path / "base.vhd", tmp_path / "d.vhd"
    vhd.create_dynamic(base, M)
    assert run(*(a.format(disk=disk, base=base) for a in args)).returncode == 2


# ---------------------------------------------------------------------- --json everywhere


@pytest.mark.parametrize("command", REPORTING_COMMANDS)
def test_every_reporting_command_takes_json(command: str) -> None:
    """Every command that reports documents ``--json`` in its help."""
    assert "--json" in ok(command, "--help")


def test_json_output_is_one_document(tmp_path: Path) -> None:
    """With ``--json`` each command prints exactly one JSON object on stdout and nothing
    on stderr."""
    base, child, raw = tmp_path / "base.vhd", tmp_path / "child.vhd", tmp_path / "in.raw"
    random_file(raw, 4096, seed=14)
    steps: list[tuple[object, ...]] = [
        ("create", base, "--size", "4M"),
        ("create", child, "--parent", base),
        ("write", child, "--offset", 512, "--input", raw),
        ("info", child),
        ("map", child),
        ("check", child),
        ("repair", child),
        ("export", child, tmp_path / "out.raw"),
        ("import", tmp_path / "out.raw", tmp_path / "again.vhd"),
        ("coalesce", child),
    ]
    for args in steps:
        result = run(*args, "--json")
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
        assert result.stdout.endswith("}\n")
        assert isinstance(json.loads(result.stdout), dict), args
