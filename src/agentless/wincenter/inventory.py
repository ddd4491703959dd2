"""The inventory: WinServer hosts, and their storage pools, VMs, disks and NICs as synced.

A host is registered with its API URL, its host token and its certificate, which WinCenter
pins (``winserver init`` wrote it to ``pki/server-cert.pem``); the token is kept sealed
under the center's secret key. WinCenter talks to hosts only through the host API's
typed client (:mod:`agentless.winserver.client`) – nothing else of WinServer.

The hosts are the truth; WinCenter's records are a cache that :meth:`Inventory.sync`
brings up to date (pools and VMs a host no longer has are dropped). Every change made
through WinCenter – a VM created, started, stopped, deleted – is done on the host first
and then synced, so a failure halfway leaves at worst a stale cache, which the next sync
mends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, cast

from cryptography import x509
from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from agentless.winserver.client import HostApiError, HostClient, HostUnreachable
from agentless.wire import SrInfo, VmInfo

from .center import Center
from .errors import ConflictError, HostCallError, NotFoundError, WinCenterError
from .models import Host, Pool, Vm, VmDisk, VmNic, utcnow
from .schemas import HostOut, PoolOut, VmDiskOut, VmNicOut, VmOut

__all__ = ["HostCallError", "Inventory"]

ClientFactory = Callable[[str, str, str], HostClient]  # (url, token, cert_pem)
HostState = Literal["online", "unreachable", "unknown"]


@contextlib.contextmanager
def _host_errors(host_name: str) -> Iterator[None]:
    """A host's refusals keep their status (404, 409, 422); the rest is a 502."""
    try:
        yield
    except HostUnreachable as error:
        raise HostCallError(f"host {host_name} is unreachable: {error}") from None
    except HostApiError as error:
        if error.status in (404, 409, 422):
            raise HostCallError(f"host {host_name}: {error.detail}", error.status, error.title) from None
        raise HostCallError(f"host {host_name} answered {error.status}: {error.detail}") from None


def _describe_host(host: Host) -> HostOut:
    return HostOut(
        id=host.uuid,
        name=host.name,
        url=host.url,
        state=cast(HostState, host.state),
        last_sync=host.last_sync,
        cert=host.cert_pem,
    )


def _describe_pool(pool: Pool) -> PoolOut:
    return PoolOut(id=pool.uuid, host=pool.host_uuid, name=pool.name, default=pool.is_default)


def _describe_vm(vm: Vm) -> VmOut:
    return VmOut(
        id=vm.uuid,
        name=vm.name,
        host=vm.host_uuid,
        vcpus=vm.vcpus,
        memory=vm.memory,
        power_state=vm.power_state,
        disks=[
            VmDiskOut(position=d.position, vdi=d.vdi_uuid, size=d.size, pool=d.pool_uuid) for d in vm.disks
        ],
        nics=[VmNicOut(position=n.position, mac=n.mac, network=n.network) for n in vm.nics],
    )


def _with_parts(query: Select[Vm]) -> Select[Vm]:
    """*query* of VMs loading their disks and NICs with it (one ``IN`` query each for all
    the VMs it finds), instead of two lazy queries per VM when they are read."""
    return query.options(selectinload(Vm.disks), selectinload(Vm.nics))


def _assign(row: object, **values: object) -> None:
    """Set the attributes of *row* that differ from *values* (an assignment of an equal
    value would still mark the row changed, and cost an UPDATE)."""
    for name, value in values.items():
        if getattr(row, name) != value:
            setattr(row, name, value)


class Inventory:
    """Hosts and what they hold, for one center. Methods are blocking (they call hosts);
    every database change is one transaction."""

    def __init__(
        self,
        center: Center,
        client_factory: ClientFactory = HostClient,
        on_seen: Callable[[str], None] | None = None,
    ):
        """*on_seen* is told the uuid of every host a sync reached (the retries of the
        steps that failed on it start at once)."""
        self.center = center
        self._client_factory = client_factory
        self.on_seen = on_seen
        self._guard = threading.Lock()
        self._sync_locks: dict[str, threading.Lock] = {}
        self._synced: dict[str, tuple[float, HostOut]] = {}  # host -> (sync began, answer)

    # ------------------------------------------------------------------ hosts

    def register(self, url: str, token: str, cert_pem: str) -> HostOut:
        """Register the host at *url* (its certificate *cert_pem* pinned, its *token*
        sealed) and sync it. Registering the same host again updates its URL, token and
        certificate. HostCallError if it cannot be reached with these."""
        try:
            x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError:
            raise WinCenterError("cert is not a PEM certificate (the host's pki/server-cert.pem)") from None
        with self._client_factory(url, token, cert_pem) as client, _host_errors(url):
            identity = client.host()
        host_uuid, name = identity.uuid, identity.name
        sealed = self.center.secrets.seal_text(token, host_uuid)
        with self.center.database.session() as s:
            host = s.get(Host, host_uuid)
            clash = s.scalars(select(Host).where(Host.name == name, Host.uuid != host_uuid)).first()
            if clash is not None:
                raise ConflictError(f"another host is registered as {name!r} ({clash.uuid})")
            if host is None:
                host = Host(uuid=host_uuid, name=name, url=url, token_sealed=sealed, cert_pem=cert_pem)
                s.add(host)
            else:
                host.url, host.token_sealed, host.cert_pem = url, sealed, cert_pem
            host.state = "online"
        return self.sync(host_uuid)

    def hosts(self) -> list[HostOut]:
        with self.center.database.session() as s:
            return [_describe_host(h) for h in s.scalars(select(Host).order_by(Host.name))]

    def host(self, ref: str) -> HostOut:
        with self.center.database.session() as s:
            return _describe_host(self._host(s, ref))

    def forget(self, ref: str) -> HostOut:
        """Drop a host and its cached records (the host itself is untouched)."""
        with self.center.database.session() as s:
            host = self._host(s, ref)
            description = _describe_host(host)
            s.delete(host)
        return description

    @contextlib.contextmanager
    def calling(self, host_uuid: str) -> Iterator[HostClient]:
        """A client of the host's API, whose failures become :class:`HostCallError`."""
        with self.center.database.session() as s:
            host = self._host(s, host_uuid)
            name, url, sealed, cert, uuid = host.name, host.url, host.token_sealed, host.cert_pem, host.uuid
        token = self.center.secrets.open_text(sealed, uuid)
        with self._client_factory(url, token, cert) as client, _host_errors(name):
            yield client

    @staticmethod
    def _host(s: Session, ref: str) -> Host:
        host = s.get(Host, ref) or s.scalars(select(Host).where(Host.name == ref)).first()
        if host is None:
            raise NotFoundError(f"no host {ref!r}")
        return host

    # ------------------------------------------------------------------ sync

    def sync(self, host_uuid: str) -> HostOut:
        """Bring the records of one host up to date from its API; returns the host.
        An unreachable host is marked so (and HostCallError raised).

        Syncs of one host run one at a time, and a caller that waited for a sync that
        began after its own call answers with that one: a burst of requests (twenty
        backups of VMs not yet known) costs one or two syncs, and no two transactions
        rewrite the same records at once."""
        asked = time.monotonic()
        with self._lock(host_uuid):
            done = self._synced.get(host_uuid)
            if done is not None and done[0] >= asked:
                return done[1]
            started = time.monotonic()
            result = self._sync(host_uuid)
            self._synced[host_uuid] = (started, result)
        if self.on_seen is not None:
            self.on_seen(host_uuid)
        return result

    def _lock(self, host_uuid: str) -> threading.Lock:
        """The lock under which the records of one host are rewritten."""
        with self._guard:
            return self._sync_locks.setdefault(host_uuid, threading.Lock())

    def _sync(self, host_uuid: str) -> HostOut:
        try:
            with self.calling(host_uuid) as client:
                srs, vms = client.list_srs(), client.list_vms()
        except HostCallError:
            with self.center.database.session() as s:
                self._host(s, host_uuid).state = "unreachable"
            raise
        for attempt in range(3):  # two syncs of one host may race to insert a record
            try:
                with self.center.database.session() as s:
                    self._apply(s, host_uuid, srs, vms)
                    return _describe_host(self._host(s, host_uuid))
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def sync_all(self) -> list[HostOut]:
        """Sync every host; unreachable ones are marked (by :meth:`sync`) and skipped."""
        synced = []
        for host in self.hosts():
            with contextlib.suppress(HostCallError):
                synced.append(self.sync(host.id))
        return synced

    def _apply(self, s: Session, host_uuid: str, srs: Sequence[SrInfo], vms: Sequence[VmInfo]) -> None:
        host = self._host(s, host_uuid)
        pools = {p.uuid: p for p in host.pools}
        for sr in srs:
            pool = pools.pop(sr.uuid, None)
            if pool is None:
                pool = Pool(uuid=sr.uuid, host_uuid=host.uuid, name=sr.name, path=sr.path)
                s.add(pool)
            pool.name, pool.path, pool.is_default = sr.name, sr.path, sr.default
        for gone in pools.values():
            s.delete(gone)
        s.flush()
        known = {p.uuid for p in s.scalars(select(Pool).where(Pool.host_uuid == host.uuid))}
        records = {vm.uuid: vm for vm in s.scalars(_with_parts(select(Vm).where(Vm.host_uuid == host.uuid)))}
        for state in vms:
            self._apply_vm(s, host.uuid, records.pop(state.uuid, None), state, known)
        for gone_vm in records.values():
            s.delete(gone_vm)
        host.state = "online"
        host.last_sync = utcnow()

    @staticmethod
    def _apply_vm(s: Session, host_uuid: str, vm: Vm | None, state: VmInfo, pools: set[str]) -> Vm:
        """Make the record *vm* (None: a new one) say what *state* says, changing only the
        columns and rows that differ: a sync of a host whose VMs did not change writes
        nothing (each rewritten row is a write, and every VM's disks and NICs rewritten
        at every sync made a sync cost a transaction as big as the inventory). Nothing is
        flushed here: a sync of a thousand VMs is one flush."""
        if vm is None:
            vm = Vm(uuid=state.uuid, host_uuid=host_uuid, name=state.name, memory=state.memory)
            s.add(vm)
        _assign(vm, name=state.name, vcpus=state.vcpus, memory=state.memory)
        _assign(vm, power_state=state.power_state)
        disks = {d.position: d for d in vm.disks}
        for disk in state.disks:
            pool = disk.sr if disk.sr in pools else None
            row = disks.pop(disk.position, None)
            if row is None:
                vm.disks.append(
                    VmDisk(position=disk.position, vdi_uuid=disk.vdi, size=disk.size, pool_uuid=pool)
                )
            else:
                _assign(row, vdi_uuid=disk.vdi, size=disk.size, pool_uuid=pool)
        nics = {n.position: n for n in vm.nics}
        for nic in state.nics:
            row_nic = nics.pop(nic.position, None)
            if row_nic is None:
                vm.nics.append(VmNic(position=nic.position, mac=nic.mac, network=nic.network))
            else:
                _assign(row_nic, mac=nic.mac, network=nic.network)
        for gone_disk in disks.values():
            vm.disks.remove(gone_disk)
        for gone_nic in nics.values():
            vm.nics.remove(gone_nic)
        return vm

    def sync_vm(self, host_uuid: str, state: VmInfo) -> VmOut:
        """Record one VM as its host just described it (after a change made through
        WinCenter); returns WinCenter's view of it."""
        with self._lock(host_uuid), self.center.database.session() as s:
            known = {p.uuid for p in s.scalars(select(Pool).where(Pool.host_uuid == host_uuid))}
            record = s.scalars(_with_parts(select(Vm).where(Vm.uuid == state.uuid))).first()
            vm = self._apply_vm(s, host_uuid, record, state, known)
            s.flush()
            return _describe_vm(vm)

    # ------------------------------------------------------------------ pools and VMs

    def pools(self, host: str | None = None) -> list[PoolOut]:
        with self.center.database.session() as s:
            query = select(Pool).order_by(Pool.host_uuid, Pool.name)
            if host is not None:
                query = query.where(Pool.host_uuid == self._host(s, host).uuid)
            return [_describe_pool(p) for p in s.scalars(query)]

    def pool(self, ref: str) -> PoolOut:
        with self.center.database.session() as s:
            pool = s.get(Pool, ref)
            if pool is None:
                raise NotFoundError(f"no storage pool {ref!r}")
            return _describe_pool(pool)

    def vms(
        self,
        *,
        host: str | None = None,
        name: str | None = None,
        power_state: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[VmOut], int]:
        """VMs by name (filtered by host, exact name, power state), *limit* from
        *offset*, and how many match in all."""
        with self.center.database.session() as s:
            query = select(Vm)
            if host is not None:
                query = query.where(Vm.host_uuid == self._host(s, host).uuid)
            if name is not None:
                query = query.where(Vm.name == name)
            if power_state is not None:
                query = query.where(Vm.power_state == power_state)
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            # the page's disks and NICs in one query each, not two queries per VM
            rows = s.scalars(_with_parts(query.order_by(Vm.name, Vm.uuid).limit(limit).offset(offset)))
            return [_describe_vm(vm) for vm in rows], total

    def vm(self, ref: str) -> VmOut:
        """A VM by id, or by name when that is unique."""
        with self.center.database.session() as s:
            vm = s.get(Vm, ref)
            if vm is None:
                named = list(s.scalars(select(Vm).where(Vm.name == ref)).all())
                if len(named) > 1:
                    raise ConflictError(f"{len(named)} VMs are named {ref!r}: give the id")
                vm = named[0] if named else None
            if vm is None:
                raise NotFoundError(f"no VM {ref!r}")
            return _describe_vm(vm)

    def lookup_vm(self, ref: str) -> VmOut:
        """:meth:`vm`, syncing the hosts first when the VM is not known (made on a host
        since the last sync)."""
        try:
            return self.vm(ref)
        except NotFoundError:
            self.sync_all()
            return self.vm(ref)

    def create_vm(
        self,
        name: str,
        disks: Sequence[int],
        nics: Sequence[str] = (),
        vcpus: int = 1,
        memory: int = 1 << 30,
        *,
        host: str | None = None,
        pool: str | None = None,
    ) -> VmOut:
        """Create a halted VM with blank disks on *host*, or in *pool* (its host), or on
        the only host there is."""
        host_uuid, sr = self.placement(host, pool)
        with self.calling(host_uuid) as client:
            state = client.create_vm(name, list(disks), list(nics), vcpus, memory, sr=sr)
        return self.sync_vm(host_uuid, state)

    def placement(self, host: str | None, pool: str | None) -> tuple[str, str | None]:
        """(host uuid, SR uuid or None for the host's default) for a new VM: *pool*'s
        host, *host*, or else the only host online – asking the hosts again first when
        some are recorded unreachable, since one may have come back since."""
        if pool is not None:
            found = self.pool(pool)
            if host is not None and self.host(host).id != found.host:
                raise ConflictError(f"pool {pool} is not on host {host}")
            return found.host, found.id
        if host is not None:
            return self.host(host).id, None
        hosts = self.hosts()
        if len([h for h in hosts if h.state == "online"]) != 1 and any(h.state != "online" for h in hosts):
            # a host recorded unreachable may be back (restarted since): ask them before
            # refusing, instead of waiting for the periodic sync
            self.sync_all()
            hosts = self.hosts()
        online = [h for h in hosts if h.state == "online"]
        if len(online) != 1:
            raise WinCenterError(f"{len(online)} hosts are online: say which host or pool the VM goes to")
        return online[0].id, None

    def power(self, ref: str, action: Literal["start", "stop"]) -> VmOut:
        """``start`` or ``stop`` a VM on its host."""
        vm = self.vm(ref)
        with self.calling(vm.host) as client:
            state = client.start_vm(vm.id) if action == "start" else client.stop_vm(vm.id)
        return self.sync_vm(vm.host, state)

    def delete_vm(self, ref: str) -> VmOut:
        """Delete a halted VM and its disks on its host, then its records."""
        vm = self.vm(ref)
        with self.calling(vm.host) as client:
            client.delete_vm(vm.id)
        with self.center.database.session() as s:
            row = s.get(Vm, vm.id)
            if row is not None:
                s.delete(row)
        return vm
