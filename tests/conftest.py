"""Shared fixtures: the interop oracles (real programs) and scratch directories."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

import pytest
from xdist.scheduler import LoadGroupScheduling

# fixtures for any test directory: seaweed_s3; site, second_site; postgresql_cluster, db_url; tls_dir
pytest_plugins = ["tests.s3server", "tests.sites", "tests.postgresql", "tests.nbd.serving"]


def require_tool(name: str, package: str | None = None) -> str:
    """Path of the program *name*; skips the test, saying which program is missing and how
    to get it – its Debian *package* when given, else the list of them – when it is not
    installed (``make test`` installs them when run as root)."""
    path = shutil.which(name)
    if path is None:
        packages = package or (
            "qemu-utils, libnbd-bin, nbdkit, nbd-server, qemu-system-x86, "
            "fdisk, gdisk, dosfstools, ntfs-3g, xfsprogs, mtools, exfatprogs, exfat-fuse"
        )
        pytest.skip(f"{name} not installed (Debian: {packages}; `make test` as root)")
    return path


def run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a program, capturing its output; fail the test with its stderr when it fails."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own ``$XDG_CACHE_HOME``: vmbackup's local caches (the index cache)
    of one test never answer another's (the processes a test starts inherit it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


# Modules whose tests share one expensive module fixture: `--dist loadgroup` (make test)
# runs each of them whole in one xdist process.
ONE_PROCESS = {
    "tests/test_fleet_netns.py",  # its fleet of network namespaces
    # the consoles' browser tests: a site, a daemon and a browser per module
    "tests/backup/test_console.py",
    "tests/backup/test_console_points.py",
    "tests/wincenter/test_console.py",
    # a VM of six file systems backed up once (35 s), and the storage fault rigs: each
    # process that got one of their tests built its own
    "tests/backup/test_files_e2e.py",
    "tests/backup/test_storage_faults.py",
}


class _LoadGroup(LoadGroupScheduling):
    """xdist's loadgroup, with the modules of :data:`ONE_PROCESS` as groups. Their
    ``xdist_group`` mark alone does not group them: xdist 3.8 names a group by appending
    it to ``item._nodeid``, which pytest 9.2 no longer reads (a node's id is ``_id``), so
    every test goes its own way – and each process that gets one starts the fleet."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if module in ONE_PROCESS else super()._split_scope(nodeid)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of :data:`ONE_PROCESS` first, the longest (the network-namespace fleet,
    ~4 minutes in one process) at the very front: collected last, they were handed out
    last, and one process worked through them alone while the others had nothing left."""
    order = {module: rank for rank, module in enumerate(sorted(ONE_PROCESS, key=_weight))}
    items.sort(key=lambda item: order.get(item.nodeid.split("::", 1)[0], len(order)))


def _weight(module: str) -> tuple[bool, str]:
    return (module != "tests/test_fleet_netns.py", module)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> LoadGroupScheduling | None:
    """The scheduler of ``--dist loadgroup``: :class:`_LoadGroup`."""
    if config.getvalue("dist") != "loadgroup":
        return None
    return _LoadGroup(config, log)  # type: ignore[arg-type]
