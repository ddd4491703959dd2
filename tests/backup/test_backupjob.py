"""A backup of a big sparse disk in bounded memory, and its restore writing only what is
allocated: a real WinServer host and WinCenter on loopback, ``vmbackup`` as a user runs
it (``bench/big_disks.py`` is the same at 8 x 2040 GiB with 1 GiB written)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from tests.backup.conftest import _ok
from tests.peakrss import run_measured
from tests.sites import Site, configure, guest

MiB, GiB = 1 << 20, 1 << 30
DISK = 2040 * GiB  # the VHD format's limit for one disk
CHUNK = 65536
PAGE_SPAN = 4096 * CHUNK  # the disk one index page covers (256 MiB)
RSS_BOUND = 512 * MiB
PAGES = 256  # index pages the incremental changes


def _vmbackup(env: dict[str, str], *args: str) -> tuple[dict[str, Any], int]:
    """``vmbackup ARGS --json`` run to its end: its answer and its peak RSS (bytes, its own)."""
    done, peak = run_measured("agentless.backup.cli", [*args, "--json"], env)
    assert peak, done.stderr
    return _ok(done), peak


def _write_chunks(site: Site, offsets: list[int], rng: random.Random, model: dict[int, bytes]) -> None:
    """One 64 KiB chunk of random data at each of *offsets*."""
    with site.host_client() as host, guest(host, "big", 0) as disk:
        for offset in offsets:
            model[offset] = rng.randbytes(CHUNK)
            disk.write(offset, model[offset])
        disk.flush()


def test_a_2040_gib_disk_backs_up_in_bounded_memory_and_restores_sparse(site: Site, tmp_path: Path) -> None:
    """A 2040 GiB disk (8 160 index pages): a full backup of 16 MiB, then one chunk
    written in each of 256 index pages and an incremental that reads just those chunks;
    both ``vmbackup`` processes stay under 512 MiB. The restore writes the allocated
    chunks and nothing else, and the new VHD on the host holds them and its metadata, no
    zeros. ``bench/big_disks.py`` measures 8 such
    disks with 1 GiB written, where holding index pages and read buffers went over 512
    MiB (``tests/backup/test_diskindex.py`` checks the bound on held pages)."""
    env = configure(site, tmp_path, str(tmp_path / "repo"))
    rng = random.Random(14)
    model: dict[int, bytes] = {}
    with site.host_client() as host:
        host.create_vm("big", [DISK])
        host.start_vm("big")
    _write_chunks(site, [GiB + n * CHUNK for n in range(PAGES)], rng, model)
    full, full_rss = _vmbackup(env, "backup", "--vm", "big")
    pages = sorted(rng.sample(range(DISK // PAGE_SPAN), PAGES))
    _write_chunks(site, [page * PAGE_SPAN + rng.randrange(4096) * CHUNK for page in pages], rng, model)
    incremental, incremental_rss = _vmbackup(env, "backup", "--vm", "big")
    [f], [i] = full["backups"], incremental["backups"]
    assert f["type"] == "full" and i["type"] == "incremental"
    assert i["read"] == PAGES * CHUNK  # CBT: the chunks written since, nothing else
    rss = f"peak RSS: full {full_rss / MiB:.0f} MiB, incremental {incremental_rss / MiB:.0f} MiB"
    assert full_rss < RSS_BOUND and incremental_rss < RSS_BOUND, rss

    restored, restore_rss = _vmbackup(env, "restore", i["point"], "--as-new-vm", "big-restored")
    assert restored["written"] == len(model) * CHUNK  # holes are never written
    assert restore_rss < RSS_BOUND
    with site.host_client() as host:
        [disk] = host.vm("big-restored").disks
        # on the host: the data, a sector bitmap per 2 MiB block (a 4 KiB file system block
        # each), the 4 MiB BAT – and no zeros
        assert os.stat(disk.path).st_blocks * 512 <= restored["written"] + len(model) * 4096 + 8 * MiB
        host.start_vm("big-restored")
        with guest(host, "big-restored", 0) as disk_view:
            for offset, data in model.items():
                assert disk_view.read(offset, CHUNK) == data
            assert disk_view.read(DISK - CHUNK, CHUNK) == bytes(CHUNK)
