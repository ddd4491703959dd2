"""A storage repository that fills up under a restore: a real small file system (tmpfs,
mounted by the test, so it needs root) as the SR of a real host, a real WinCenter and the
``vmbackup restore`` command as a user runs it.

The restore must fail at once with one line that names the lack of space (the host answers
each write that cannot be stored with NBD_ENOSPC), its abort must remove the half-made VM
and its files although the SR is still full (closing the disk cannot persist its CBT log
there), and once space is free the host works on that SR as before."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.winserver.client import HostApiError, HostClient
from tests.backup.conftest import _ok, vmbackup
from tests.helpers import wait_until
from tests.sites import Site, configure
from tests.sites import guest as guest_disk

MiB = 1 << 20


@contextlib.contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of *size* bytes mounted on *path* for the test (skips when not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a full SR needs root (mount -t tmpfs)")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "agentless-test", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _gone(host: HostClient, vm: str, timeout: float = 60) -> None:
    """Wait until *vm* is no longer on the host (fails the test after *timeout* s)."""
    wait_until(lambda: vm not in [v.name for v in host.list_vms()], timeout, f"VM {vm!r} to leave the host")


def test_restore_onto_a_full_sr_fails_at_once_and_cleans_up(site: Site, tmp_path: Path) -> None:
    env = configure(site, tmp_path, str(tmp_path / "repo"))
    # more 1 MiB runs than the restore's queue holds (64): its writers all fail at once
    data = random.Random(5).randbytes(80 * MiB)
    with site.host_client() as host:
        host.create_vm("big", [96 * MiB])
        host.start_vm("big")
        with guest_disk(host, "big", 0) as guest:
            for offset in range(0, len(data), 8 * MiB):
                guest.write(offset, data[offset : offset + 8 * MiB])
            guest.flush()
    [done] = _ok(vmbackup(env, "backup", "--vm", "big", "--json"))["backups"]  # type: ignore[misc]

    with _tmpfs(tmp_path / "small", 128 * MiB) as mount:
        sr_dir = mount / "sr"
        filler = mount / "filler"
        with open(filler, "wb") as f:  # leaves 8 MiB: the VM's files fit, its data does not
            f.write(bytes(120 * MiB))
        with site.host_client() as host, site.client() as center:
            small = host.create_sr("small", str(sr_dir))
            center.sync_host(center.hosts()[0].id)

        rest = mount / "rest"
        with open(rest, "wb") as f, contextlib.suppress(OSError):
            while True:  # not a page left: not even a blank VM fits
                f.write(bytes(MiB))
        with site.host_client() as host:
            with pytest.raises(HostApiError) as refused:
                host.create_vm("blank", [MiB], sr="small")
            assert refused.value.status == 507 and "no space left" in refused.value.detail
        assert os.listdir(sr_dir) == []  # what the failed creation made is gone
        rest.unlink()

        started = time.monotonic()
        failed = vmbackup(
            env, "restore", done["point"], "--as-new-vm", "copy", "--target", small.uuid, timeout=120
        )
        took = time.monotonic() - started
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1, failed.stderr
        assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "ENOSPC" in lines[0] or "no space" in lines[0].lower(), lines[0]
        print(f"the restore failed after {took:.1f} s: {lines[0]}")

        with site.host_client() as host, site.client() as center:
            _gone(host, "copy")  # WinCenter aborts the restore in the background
            assert center.vms(name="copy").items == []
            assert host.list_grants() == [] or all(g.revoked for g in host.list_grants())
        assert sorted(os.listdir(sr_dir)) == []  # no VHD, no CBT log left

        filler.unlink()  # space is free again: the same restore onto the same SR works
        restored = _ok(
            vmbackup(
                env,
                "restore",
                done["point"],
                "--as-new-vm",
                "copy",
                "--target",
                small.uuid,
                "--json",
                timeout=120,
            )
        )
        assert restored["vm"] == "copy"
        with site.host_client() as host:
            assert all(d.sr == small.uuid for d in host.vm("copy").disks)
            host.start_vm("copy")
            with guest_disk(host, "copy", 0) as guest:
                assert guest.read(0, len(data)) == data
            host.stop_vm("copy")
            host.delete_vm("copy")  # leaves the tmpfs free to unmount
