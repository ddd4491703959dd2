"""The namespace topology of the multi-machine tests (``tests/netns.py``): members reach
each other and the test over the bridge, nothing but their /24 is routed, a cut link
fails connections within seconds and a mended one carries them again, and nothing is
left once the topology is closed."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys

from tests.helpers import wait_until
from tests.netns import NET, Namespace, Topology, require_netns

CONNECT = """
import socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20).close()
    print("connected")
except OSError as error:
    print(f"{type(error).__name__} {error.errno} {time.monotonic() - started:.1f}")
"""


def _connect(member: Namespace, address: str, port: int) -> str:
    done = member.run([sys.executable, "-c", CONNECT, address, str(port)], timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _listening(member: Namespace, port: int) -> None:
    program = f"import socket, time; s = socket.create_server(({member.address!r}, {port})); time.sleep(120)"
    member.popen([sys.executable, "-c", program])
    wait_until(lambda: _connect(member, member.address, port) == "connected", 10, "the listener")


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def test_members_talk_over_the_bridge_a_cut_link_fails_fast_and_nothing_is_left() -> None:
    require_netns()
    with Topology() as net:
        a, b = net.add("a"), net.add("b")
        assert net.subnet.subnet_of(NET) and net.subnet.prefixlen == 24
        assert {ipaddress.ip_address(m.address) for m in (a, b)} <= set(net.subnet.hosts())
        _listening(b, 7000)
        assert _connect(a, b.address, 7000) == "connected"
        with socket.create_connection((b.address, 7000), timeout=5):  # the test, from the root namespace
            pass
        routes = a.run(["ip", "-4", "route"]).stdout.splitlines()
        assert routes == [f"{net.subnet} dev eth0 proto kernel scope link src {a.address} "], routes

        net.cut(b)
        failed = _connect(a, b.address, 7000).split()
        assert failed[:2] == ["OSError", "113"] and float(failed[2]) < 10, failed  # EHOSTUNREACH
        net.mend(b)
        wait_until(lambda: _connect(a, b.address, 7000) == "connected", 20, "the mended link")
        names = (a.name, b.name, net.switch, net.root_link)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [name for name in names[:3] if name in listed], listed
    assert names[3] not in _links()
