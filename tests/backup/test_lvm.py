"""The logical volumes of an LVM2 physical volume as the worker reads them: metadata made
by LVM's own tools on a loop device (without device-mapper, see guestimages.make_lvm),
file systems by ``mkfs.*`` written at the LVs' extents, ``blkid`` the oracle of their
kinds, labels and UUIDs; then ``vmbackup files`` over a restore point of that disk."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import secrets
from pathlib import Path
from typing import Any

import pytest

from agentless.backup import fsprobe, lvm
from agentless.backup.fsworker import FsWorker
from agentless.backup.repository import Repository
from tests.backup.building import backup
from tests.backup.conftest import vmbackup
from tests.backup.guestimages import Lv, MiB, Pv, blank, blkid, make_disk, make_fs, make_lvm
from tests.conftest import run

PASSWORD = "lvm test"
SPARE = 'start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 7]'


@dataclasses.dataclass
class Site:
    group: str
    pv_image: Path  # the physical volume alone (a disk without a table)
    disk: Path  # an MBR disk: 1 an ext4, 2 (type 8e) the physical volume
    plain: Path
    root: Path  # ext4 in two segments, the second before the first on the PV
    data: Path  # XFS in one segment
    pv: Pv


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    tmp = tmp_path_factory.mktemp("lvm")
    group = f"vgt{secrets.token_hex(3)}"
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(random.Random(7).randbytes(6 * MiB))  # across the segments' seam
    root = make_fs(tmp, "ext4", 12 * MiB, "lvroot")
    data = make_fs(tmp, "xfs", 64 * MiB, "xlv")
    plain = make_fs(tmp, "ext4", 8 * MiB, "plain")
    pv_image = blank(tmp / "pv.img", 112 * MiB)
    thin_pool = (
        'start_extent = 0 extent_count = 2 type = "thin-pool" metadata = "pool_tmeta" pool = "pool_tdata" '
        'transaction_id = 1 chunk_size = 128 discards = "passdown" zero_new_blocks = 1'
    )
    lvs = [
        Lv("root", [(10, 1), (2, 2)], root),
        Lv("data", [(11, 16)], data),
        Lv(
            "wide",
            [],
            segment='start_extent = 0 extent_count = 2 type = "striped" stripe_count = 2 '
            'stripe_size = 128 stripes = ["pv0", 0, "pv0", 1]',
        ),
        Lv("pool", [], segment=thin_pool),
        Lv(
            "thin1",
            [],
            segment='start_extent = 0 extent_count = 1 type = "thin" thin_pool = "pool" '
            "transaction_id = 0 device_id = 1",
        ),
        Lv("pool_tmeta", [(4, 1)], hidden=True),
        Lv("pool_tdata", [(5, 2)], hidden=True),
        Lv("lvol0_pmspare", [], segment=SPARE, hidden=True),
    ]
    pv = make_lvm(tmp, pv_image, group, lvs)
    assert (pv.pe_start, pv.extent) == (1 * MiB, 4 * MiB), pv  # the layout above assumes them
    disk = make_disk(tmp, "mbr", "label: dos\n,9M,83\n,112M,8e\n", [plain, pv_image], 128 * MiB)
    return Site(group, pv_image, disk, plain, root, data, pv)


def _probe(disk: Path) -> dict[str, Any]:
    with open(disk, "rb") as f, FsWorker(f, disk.stat().st_size) as worker:
        found: dict[str, Any] = worker.call("probe")
    return found


def test_logical_volumes_are_probed_after_their_physical_volume(site: Site) -> None:
    found = _probe(site.disk)
    assert found["scheme"] == "mbr" and found["problems"] == []
    g = site.group
    volumes = {v["partition"]: v for v in found["volumes"]}
    assert list(volumes) == [1, 2, f"{g}/root", f"{g}/data", f"{g}/wide", f"{g}/pool", f"{g}/thin1"]
    plain, pv = volumes[1], volumes[2]
    assert (plain["filesystem"], plain["label"], plain["uuid"]) == blkid(site.plain)
    pv_blkid = run(["blkid", "-p", "-s", "UUID", "-o", "value", str(site.pv_image)]).stdout.strip()
    assert (pv["filesystem"], pv["uuid"], pv["volume_group"], pv["type"]) == ("lvm2", pv_blkid, g, "8e")
    assert pv["uuid"] == site.pv.uuid and "problem" not in pv
    for name, image in (("root", site.root), ("data", site.data)):
        volume = volumes[f"{g}/{name}"]
        assert (volume["filesystem"], volume["label"], volume["uuid"]) == blkid(image)
        assert (volume["volume_group"], volume["logical_volume"], volume["physical_volume"]) == (g, name, 2)
        assert volume["size"] == image.stat().st_size and volume["start"] is None
        assert f'{name} {{\n\t\t\tid = "{volume["lv_uuid"]}"' in site.pv.metadata
    for name, problem in (
        ("wide", "segment 1 is striped over 2 stripes (only linear segments are read)"),
        ("pool", "segment 1 is of type 'thin-pool' (only linear segments are read)"),
        ("thin1", "segment 1 is of type 'thin' (only linear segments are read)"),
    ):
        volume = volumes[f"{g}/{name}"]
        assert volume["filesystem"] == "unknown" and volume["problem"] == f"{g}/{name}: {problem}"
    assert (volumes[f"{g}/wide"]["size"], volumes[f"{g}/thin1"]["size"]) == (8 * MiB, 4 * MiB)


def test_a_logical_volume_reads_its_segments_in_order(site: Site) -> None:
    """root's first 4 MiB are extent 10 of the PV, the next 8 MiB extents 2–3: the LV's
    bytes are the file system's, and a file across the seam reads back whole."""
    with open(site.disk, "rb") as f:
        size = site.disk.stat().st_size
        for name, image in (("root", site.root), ("data", site.data)):
            volume_file, filesystem = fsprobe.volume(f, size, f"{site.group}/{name}")
            assert filesystem == blkid(image)[0]
            assert volume_file.at(0, volume_file.size) == image.read_bytes(), name
        chunks: list[bytes] = []

        def keep(data: list[Any] | bytes) -> None:
            assert isinstance(data, bytes)
            chunks.append(data)

        fsprobe.run(f, size, "read", {"partition": f"{site.group}/root", "path": "/big.bin"}, keep)
        assert b"".join(chunks) == random.Random(7).randbytes(6 * MiB)
        with pytest.raises(ValueError, match=r"/thin1: segment 1 is of type 'thin'"):
            fsprobe.volume(f, size, f"{site.group}/thin1")
        with pytest.raises(ValueError, match=rf"no logical volume {site.group}/nope \(logical volumes: "):
            fsprobe.volume(f, size, f"{site.group}/nope")
    whole = _probe(site.pv_image)  # the physical volume is the whole disk
    names = [v["partition"] for v in whole["volumes"]]
    assert whole["scheme"] == "none" and names[:3] == [0, f"{site.group}/root", f"{site.group}/data"]


def test_a_group_of_plain_linear_volumes_reads_as_written(tmp_path: Path) -> None:
    """A group of a one-segment volume and a two-segment one whose second segment lies
    before its first on the PV (no other kind beside them): both read as the file
    systems written."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(random.Random(8).randbytes(3 * MiB))
    first, second = make_fs(tmp_path, "ext4", 8 * MiB, "one"), make_fs(tmp_path, "ext2", 12 * MiB, "two")
    pv_image = blank(tmp_path / "pv.img", 40 * MiB)
    group = f"vgt{secrets.token_hex(3)}"
    make_lvm(tmp_path, pv_image, group, [Lv("one", [(6, 2)], first), Lv("two", [(3, 2), (0, 1)], second)])
    with open(pv_image, "rb") as f:
        pv = lvm.read_physical_volume(fsprobe.window(f, 0, 40 * MiB))
        assert [(lv.name, lv.pieces[0][0]) for lv in pv.logical_volumes] == [("one", 0), ("two", 0)]
        for lv, image in zip(pv.logical_volumes, (first, second), strict=True):
            volume = lv.file()
            assert volume.at(0, volume.size) == image.read_bytes(), lv.name
    found = _probe(pv_image)
    described = [(v["partition"], v["filesystem"], v["label"], v["uuid"]) for v in found["volumes"][1:]]
    assert described == [(f"{group}/one", *blkid(first)), (f"{group}/two", *blkid(second))]


def test_a_damaged_metadata_area_is_one_problem(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "damaged.img"
    image = bytearray(site.disk.read_bytes())
    pv_start = 10 * MiB
    head = bytes(image[pv_start : pv_start + site.pv.pe_start])
    marker = f"{site.group} {{\nid = ".encode()
    at = head.find(marker)
    assert at > 0
    while at >= 0:  # every copy in the metadata ring
        image[pv_start + at : pv_start + at + 300] = random.Random(at).randbytes(300)
        at = head.find(marker, at + 1)
    disk.write_bytes(image)
    found = _probe(disk)
    assert [v["partition"] for v in found["volumes"]] == [1, 2]
    plain, pv = found["volumes"]
    assert (plain["filesystem"], plain["label"]) == ("ext4", "plain")
    assert pv["filesystem"] == "lvm2" and pv["volume_group"] is None
    assert pv["problem"] == "LVM metadata unreadable: the metadata text fails its CRC (damaged)"
    with open(disk, "rb") as f, pytest.raises(ValueError, match="partition 2: LVM metadata unreadable"):
        fsprobe.volume(f, len(image), f"{site.group}/root")


def test_files_lists_and_gets_a_logical_volume(site: Site, tmp_path: Path) -> None:
    with Repository.init(str(tmp_path / "repo"), PASSWORD) as repository:
        point = backup(repository, "lvm", [site.disk.read_bytes()]).point
    env = {**os.environ, "VMBACKUP_REPO": str(tmp_path / "repo"), "VMBACKUP_PASSWORD": PASSWORD}
    g = site.group
    text = vmbackup(env, "files", point)
    assert text.returncode == 0, text.stderr
    _kind, label, uuid = blkid(site.root)
    assert f"\n    logical volume {g}/root: ext4, 12.0 MiB, label '{label}', UUID {uuid}\n" in text.stdout
    assert f"  partition 2: lvm2, 112.0 MiB at 10.0 MiB, UUID {site.pv.uuid} (type 8e)\n" in text.stdout
    assert f"    logical volume {g}/thin1: unknown, 4.0 MiB – {g}/thin1: segment 1 is of type" in text.stdout

    listed = vmbackup(env, "files", point, "ls", "--partition", f"{g}/root", "/", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["partition"] == f"{g}/root"
    sizes = {e["path"]: e["size"] for e in document["entries"]}
    assert sizes["/big.bin"] == 6 * MiB and sizes["/hello.txt"] == 6
    plain = vmbackup(env, "files", point, "ls", "--partition", "1", "/hello.txt")
    assert plain.returncode == 0 and plain.stdout == "/hello.txt\n", plain.stderr

    out = tmp_path / "out"
    out.mkdir()
    got = vmbackup(
        env, "files", point, "get", "--partition", f"{g}/root", "/big.bin", "/hello.txt", "-o", str(out)
    )
    assert got.returncode == 0, got.stderr
    assert (out / "big.bin").read_bytes() == random.Random(7).randbytes(6 * MiB)
    assert (out / "hello.txt").read_text() == "hello\n"
    for partition, message in (
        (f"{g}/wide", f"{g}/wide: segment 1 is striped over 2 stripes"),
        (f"{g}/nope", f"no logical volume {g}/nope (logical volumes: {g}/root, {g}/data, {g}/wide"),
        ("-v/x", "is neither a partition number nor VG/LV"),
    ):
        failed = vmbackup(env, "files", point, "ls", f"--partition={partition}", "/")
        assert failed.returncode != 0 and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('vg { id = "unterminated }', "cannot read at character"),
        ("vg { a = 1 ", "section 'vg' is not closed"),
        ("vg { a = [1, 2 }", "unexpected '}' in a list"),
        ("vg { a b }", "'a' is followed by 'b'"),
        ("a {" * 40 + "}" * 40, "nested too deep"),
        ("} x", "unexpected '}'"),
    ],
)
def test_the_metadata_parser_refuses_malformed_text(text: str, message: str) -> None:
    with pytest.raises(lvm.LvmError, match=message):
        lvm.parse(text)


def test_the_metadata_parser_reads_lvm_text() -> None:
    text = 'vg { # a comment\n id = "a\\"b" seqno = 3 status = ["READ", "WRITE"]\n pvs { pv0 { n = -1 } } }\n'
    assert lvm.parse(text) == {
        "vg": {"id": 'a"b', "seqno": 3, "status": ["READ", "WRITE"], "pvs": {"pv0": {"n": -1}}}
    }
