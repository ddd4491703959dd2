"""Network namespaces for the tests: a private switch, one address per namespace, links
that can be cut. The multi-machine tests (``tests/test_fleet_netns.py``) run each daemon
in a namespace of its own through :class:`Topology`; ``tests/netfleet.py`` starts the
daemons.

What runs where::

      root namespace (the test process: pytest, boto3, psycopg, the Python clients)
        agn<pid>t<k>  198.18.N.254/24       (only this /24 is routed there: no default
            │                                route is touched, nothing reaches a real NIC)
      ┌─────┴───────────── agn<pid>-<k>-switch ───────────────────────────┐
      │   bridge br0:  root   host0   host1   center   s3   ...            │
      └───────────────────────│───────│───────│────────│──────────────────┘
                           eth0 .1  eth0 .2  eth0 .3  eth0 .4       (each its own namespace,
                       agn<pid>-<k>-host0 ...                         lo up, no default route)

* Addresses come from 198.18.0.0/15 (RFC 2544: reserved for network tests), one /24
  per topology: ``198.18.0.0 + 256·N``, N chosen under a lock file among the /24s that no
  interface of the root namespace has yet (parallel xdist workers, and a crashed earlier
  session's leftovers, never share one). Members get .1, .2, … in the order they are
  added; the root namespace .254.
* The root namespace is on the bridge so that the test itself (boto3, psycopg, the
  WinCenter and host clients) reaches the daemons. Its veth end has IPv6 off and one
  address whose /24 route covers only this topology's subnet; the namespaces have no
  route but their /24, so no packet goes anywhere but these namespaces and loopback.
* Unix sockets (the VM guests' datapath sockets) are files: the test reaches them from
  the root namespace as usual.
* A process runs in a namespace by ``ip netns exec NAME program ...`` (``ip`` execs
  the program, so the ``Popen``'s pid is the program's own).
* :meth:`Topology.cut` takes a member's link down at the bridge (its end in the
  switch namespace): nothing reaches it or leaves it – a connection attempt to it fails
  once ARP gives up (``No route to host`` after ~3 s: the others' ARP entries for it
  are flushed, as if it had been gone a while), an open one stalls.
  :meth:`Topology.mend` brings the link back.
* Teardown (:meth:`Topology.close`, also when a test fails): every process in each
  namespace (``ip netns pids``) is killed, the namespaces are deleted, and the switch
  namespace with the bridge and every veth end goes with them. Leftovers of a session
  that died are removed by the next one (namespaces named after a pid that is gone).

Reading a failure: the namespaces are ``agn<pid>-<k>-<member>`` (``ip netns list``
while a test hangs); ``ip netns exec NAME ss -tnp`` shows who talks to whom; each
daemon's output is a file under the test's directory (tests/netfleet.py names them).

:func:`require_netns` skips, saying why, where no namespace can be made: not root,
no ``ip`` (Debian: iproute2), or ``ip netns add`` refused (a container without
CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = ["NET", "Namespace", "NetnsUnavailable", "Topology", "require_netns", "topology"]

NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544, reserved for network tests
PREFIX = f"agn{os.getpid()}"
_LOCK = Path(tempfile.gettempdir()) / "agentless-netns.lock"
_topologies = itertools.count()


class NetnsUnavailable(Exception):
    """No network namespace can be made here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
    return done


def check_netns() -> None:
    """NetnsUnavailable, saying why, unless namespaces can be made here."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the ip program is missing (Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add)")
    probe = f"{PREFIX}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise NetnsUnavailable(f"ip netns add refused: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


def require_netns() -> None:
    """Skip the test, saying why, where network namespaces cannot be made."""
    try:
        check_netns()
    except NetnsUnavailable as why:
        pytest.skip(str(why))


def _pids(namespace: str) -> list[int]:
    done = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split()]


def _kill_all(namespace: str) -> None:
    """SIGKILL every process in *namespace*, until none is left."""
    for _ in range(50):
        pids = _pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # our children are reaped here (others by their parent, or init)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def _remove_leftovers() -> None:
    """The namespaces of sessions that are gone (named after a dead pid): their
    processes killed, the namespaces deleted (their veths and bridge with them)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = re.match(r"agn(\d+)-", name)
        if not found or int(found[1]) == os.getpid():
            continue
        try:
            os.kill(int(found[1]), 0)
            continue  # its session is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_all(name)
        _ip("netns", "del", name, check=False)


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    """The networks of 198.18.0.0/15 that the root namespace has an address or a route in."""
    used = []
    lines = _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines()
    for found in (re.search(r"inet (\S+)", line) for line in lines):
        if found:
            used.append(ipaddress.IPv4Interface(found[1]).network)
    for line in _ip("-4", "route", "show", check=False).stdout.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            used.append(ipaddress.IPv4Network(line.split()[0], strict=False))
    return [network for network in used if network.overlaps(NET)]


@dataclasses.dataclass
class Namespace:
    """One member of a topology: a network namespace with one address on the bridge."""

    name: str  # the netns name (ip netns list)
    member: str  # its short name in the topology (host0, center, ...)
    address: str  # its IPv4 address (/24 on the bridge)
    link: str  # its veth's end in the switch namespace: what cut() takes down
    procs: list[subprocess.Popen[str]] = dataclasses.field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        """*args* run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def popen(self, args: Sequence[str], **options: object) -> subprocess.Popen[str]:
        """A program started in this namespace (killed at teardown if still running)."""
        proc: subprocess.Popen[str] = subprocess.Popen(self.command(*args), text=True, **options)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def run(
        self, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """A program run to its end in this namespace, its output captured."""
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )


class Topology:
    """A switch namespace with a bridge, the root namespace on it, and members added by
    :meth:`add` – one namespace and one address each. A context manager: everything is
    removed on the way out. NetnsUnavailable when namespaces cannot be made."""

    def __init__(self) -> None:
        check_netns()
        self.index = next(_topologies)
        self.prefix = f"{PREFIX}-{self.index}"
        self.switch = f"{self.prefix}-switch"
        self.root_link = f"{PREFIX}t{self.index}"
        self.members: dict[str, Namespace] = {}
        self._made: list[str] = []
        try:
            with open(_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions pick their /24 one at a time
                _remove_leftovers()
                self.subnet = self._pick_subnet()
                self._make_switch()
        except BaseException:
            self.close()
            raise

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _subnets_in_use()
        subnets = list(NET.subnets(new_prefix=24))
        start = (os.getpid() * 7 + self.index) % len(subnets)
        for subnet in subnets[start:] + subnets[:start]:
            if not any(subnet.overlaps(network) for network in used):
                return subnet
        raise NetnsUnavailable("every /24 of 198.18.0.0/15 is in use on this machine")

    def _make_switch(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        sw = ["-n", self.switch]
        _ip(*sw, "link", "set", "lo", "up")
        _ip(*sw, "link", "add", "br0", "type", "bridge")
        _ip(*sw, "link", "set", "br0", "up")
        # the root namespace's port: its end here is "root", its own end root_link
        _ip(
            "link",
            "add",
            "name",
            self.root_link,
            "type",
            "veth",
            "peer",
            "name",
            "root",
            "netns",
            self.switch,
        )
        Path(f"/proc/sys/net/ipv6/conf/{self.root_link}/disable_ipv6").write_text("1")
        _ip(*sw, "link", "set", "root", "master", "br0", "up")
        _ip("addr", "add", f"{self.address(254)}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")

    def address(self, host: int) -> str:
        return str(self.subnet.network_address + host)

    def add(self, member: str) -> Namespace:
        """A new namespace *member* on the bridge, with the next address."""
        assert member not in self.members and len(member) <= 15, member
        name = f"{self.prefix}-{member}"
        _ip("netns", "add", name)
        self._made.append(name)
        address = self.address(len(self.members) + 1)
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            "name",
            member,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            name,
        )
        _ip("-n", self.switch, "link", "set", "dev", member, "master", "br0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        namespace = Namespace(name, member, address, member)
        self.members[member] = namespace
        return namespace

    def cut(self, member: Namespace) -> None:
        """Take *member*'s link down at the bridge: it is cut off from everyone. The
        others forget its link-layer address too (``ip neigh flush``), as they would a
        while after it vanished: a connection to it then fails with ``No route to host``
        once ARP gives up (~3 s), instead of waiting out a timeout of its own."""
        _ip("-n", self.switch, "link", "set", "dev", member.link, "down")
        _ip("neigh", "flush", "to", member.address, "dev", self.root_link, check=False)
        for other in self.members.values():
            _ip("-n", other.name, "neigh", "flush", "to", member.address, check=False)

    def mend(self, member: Namespace) -> None:
        """Bring *member*'s link up again."""
        _ip("-n", self.switch, "link", "set", "dev", member.link, "up")

    def remove(self, member: Namespace) -> None:
        """Kill every process in *member*'s namespace and delete it (its link goes too)."""
        for proc in member.procs:
            if proc.poll() is None:
                proc.kill()
        _kill_all(member.name)
        for proc in member.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        _ip("netns", "del", member.name, check=False)
        self.members.pop(member.member, None)
        with contextlib.suppress(ValueError):
            self._made.remove(member.name)

    def close(self) -> None:
        """Remove every member, then the switch (the bridge and the root's veth with it)."""
        for member in list(self.members.values()):
            self.remove(member)
        # the root namespace's end now (a deleted namespace's links go when the kernel
        # gets to it, which may be later): its address and route are gone on return
        _ip("link", "del", self.root_link, check=False)
        for name in self._made:
            _kill_all(name)
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """A topology for a test (skips, saying why, where namespaces cannot be made)."""
    try:
        made = Topology()
    except NetnsUnavailable as why:
        pytest.skip(str(why))
    with made:
        yield made
