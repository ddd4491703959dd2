"""The kill matrix's guest (bench/campaign/killbed.py) on a real site: what it accepts of
the write it had in flight when the host died, and when it counts as connected again."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.campaign.killbed import VM, Bed, Guest, in_flight_part
from tests.sites import MiB, consistent_prefix, guest, running_site

SECTOR = 512


def test_a_write_in_flight_at_a_crash_is_whole_absent_or_old_and_new_sector_by_sector() -> None:
    rng = random.Random(1)
    model = rng.randbytes(64 * 1024)
    data = rng.randbytes(8 * SECTOR)
    offset = 4 * SECTOR

    def disk(*sectors: str) -> bytes:  # o: the model's sector, n: the write's, x: neither
        read = bytearray(model)
        for index, kind in enumerate(sectors):
            at = offset + index * SECTOR
            if kind == "n":
                read[at : at + SECTOR] = data[index * SECTOR : (index + 1) * SECTOR]
            elif kind == "x":
                read[at : at + SECTOR] = bytes(SECTOR)
        return bytes(read)

    for shape in ("nnnnnnnn", "oooooooo", "nnnooooo", "onononon"):
        read = disk(*shape)
        assert in_flight_part(model, read, (offset, data)) == read[offset : offset + len(data)]
    assert in_flight_part(model, disk(*"nnnxoooo"), (offset, data)) is None
    elsewhere = bytearray(disk(*"nnnnoooo"))
    elsewhere[0] ^= 1  # a byte outside the write's range: a lost write, not a torn one
    assert in_flight_part(model, bytes(elsewhere), (offset, data)) is None


def test_the_guest_logs_what_the_disk_holds_of_a_write_torn_by_the_crash(tmp_path: Path) -> None:
    """The host died in the middle of the guest's write: after the restart the disk
    holds its first sectors and not the others (as a kill between a VHD block's data and
    its sector bitmap, or between two blocks, leaves it). No flushed write was lost: the
    guest reports nothing, its model is the disk, and its log explains the disk."""
    size = 4 * MiB
    rng = random.Random(2)
    with running_site(tmp_path) as site, site.host_client() as host:
        host.create_vm(VM, [size])
        host.start_vm(VM)
        model = bytearray(rng.randbytes(size))
        offset, data = MiB + 3 * SECTOR, rng.randbytes(32768)
        with guest(host, VM, 0) as disk:
            disk.write(0, bytes(model))
            disk.write(offset, data[:8192])  # what the killed host left of the write
            disk.flush()
            base = bytes(model)
            writer = Guest(host, model, 3)  # not started: it reconciles as after a loss
            writer._reconciled(disk, (offset, data))
            image = disk.read(0, size)
    assert writer.problems == []
    assert not writer.broken_log
    assert bytes(writer.model) == image
    assert consistent_prefix(base, list(writer._log), image) == 1


def test_the_guest_counts_as_disconnected_from_a_host_kill_until_it_is_back(tmp_path: Path) -> None:
    """Killed, the host takes the guest's write in flight with it: until the guest has
    connected to the restarted host and logged what the disk holds of that write, a
    mark (the start of a backup's check) waits – here, while the host is down, it
    cannot be had at all. Then the next backup is the disk at an instant of the log."""
    bed = Bed(tmp_path / "bed", 4 * MiB, 4)
    try:
        bed.guest.mark()
        bed.kill_host()
        with pytest.raises(RuntimeError, match="could not reach its disk"):
            bed.guest.mark(timeout=2)
        bed.restart_host()
        base, writes = bed.guest.mark()
        point = bed.run_ok("backup", "--vm", VM, "--full")["backups"][0]["point"]
        assert bed.exact(point, base, writes) is None
        assert bed.guest.problems == []
    finally:
        bed.close()
