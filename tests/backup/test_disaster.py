"""Disaster backup end to end: site A (a WinServer host, a WinCenter, vmbackup with its
repository, settings and policy state) backs a running two-disk VM up under a policy
that copies every restore point off-site – to another directory, or to an S3 bucket;
then site A is deleted entirely, and the VM is recovered at site B (its own WinCenter
and host) from the off-site copy alone, byte for byte."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.backup.conftest import S3Server, _ok, vmbackup
from tests.sites import Site
from tests.sites import configure as _configure
from tests.sites import guest as _guest
from tests.sites import write_random as _write_random

MiB = 1 << 20
SIZES = [6 * MiB, 3 * MiB]


@pytest.mark.parametrize("offsite_kind", ["directory", "s3"])
def test_site_a_lost_vm_recovered_at_site_b_from_the_offsite_copy(
    site: Site, second_site: Site, tmp_path: Path, offsite_kind: str, request: pytest.FixtureRequest
) -> None:
    a = tmp_path / "site-a-vmbackup"
    a.mkdir()
    extra: dict[str, str] = {}
    if offsite_kind == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        offsite = f"s3://{s3.create_bucket()}/disaster-copies"
        extra = s3.environment()
    else:
        offsite = str(tmp_path / "offsite-disk" / "copies")
    env = _configure(site, a, str(a / "repo"), "site A password", **extra)
    env.pop("VMBACKUP_DATABASE", None)
    env["VMBACKUP_TO_PASSWORD"] = "off-site password"
    made = vmbackup(
        env | {"VMBACKUP_PASSWORD": "off-site password", "VMBACKUP_FROM_PASSWORD": "site A password"},
        *("init", offsite, "--encrypt", "--copy-keys-from", str(a / "repo"), "--json"),
    )
    _ok(made)

    rng = random.Random(2026)
    models = [bytearray(size) for size in SIZES]
    with site.host_client() as host:
        host.create_vm("app", SIZES, ["lan"])
        host.start_vm("app")
    _ok(
        vmbackup(
            env,
            *("policy", "create", "dr", "--vm", "app", "--schedule", "0 3 * * *"),
            *("--keep-last", "2", "--copy-to", offsite, "--json"),
        )
    )
    for _round in range(3):  # a full, then incrementals; the copy keeps the newest two
        with site.host_client() as host:
            for position, model in enumerate(models):
                with _guest(host, "app", position) as guest:
                    _write_random(guest, model, rng, 8)
        run = _ok(vmbackup(env, "run-now", "dr", "--json"))
        assert run["state"] == "succeeded", run
    offsite_points = _ok(
        vmbackup(env | {"VMBACKUP_PASSWORD": "off-site password"}, "list", "--repo", offsite, "--json")
    )
    points = offsite_points["points"]
    assert [p["type"] for p in points] == ["incremental", "incremental"]
    newest = points[-1]["id"]

    # site A is lost: its WinCenter, its host with the VM, vmbackup's repository, settings, state
    site.center.proc.kill()
    site.center.proc.wait()
    site.host_proc.kill()
    site.host_proc.wait()
    for gone in (a, Path(site.host.dir), Path(site.center.dir)):
        shutil.rmtree(gone)
    assert not (a / "repo").exists() and not (a / "vmbackup.db").exists()

    # site B: a fresh vmbackup, the off-site copy's password, site B's WinCenter
    ca_b = tmp_path / "site-b-ca.pem"
    ca_b.write_text(second_site.center.ca_pem)
    with second_site.client() as admin:
        token_b = admin.create_token("backup-operator", "vmbackup at site B").token
    env_b = os.environ | extra | {"VMBACKUP_CONFIG": str(tmp_path / "site-b" / "vmbackup.json")}
    env_b |= {"VMBACKUP_PASSWORD": "off-site password", "VMBACKUP_TOKEN": token_b}
    env_b.pop("VMBACKUP_REPO", None)
    checked = _ok(vmbackup(env_b, "verify", "--repo", offsite, "--read-data", "--json"))
    assert checked["problems"] == [], checked
    restored = _ok(
        vmbackup(
            env_b,
            *("restore", newest, "--from", offsite, "--center", second_site.center.url, "--ca", str(ca_b)),
            *("--as-new-vm", "app", "--json"),
        )
    )
    with second_site.host_client() as host:
        vm = host.vm(str(restored["vm_id"]))
        assert [d.size for d in vm.disks] == SIZES
        assert [n.network for n in vm.nics] == ["lan"]
        host.start_vm(vm.uuid)
        for position, model in enumerate(models):
            with _guest(host, vm.name, position) as guest:
                assert guest.read(0, len(model)) == model, f"disk {position} differs"
