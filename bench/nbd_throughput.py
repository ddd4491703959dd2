"""NBD throughput: our server against qemu-nbd, and our client (wddk copy) against nbdcopy.

    .venv/bin/python bench/nbd_throughput.py [--size 2G] [--repeat 3] [--dir /var/tmp]

Server: the same image served by qemu-nbd and by ``winserver serve-disk`` (as raw, and the
same bytes as a dynamic VHD), each read whole by ``nbdcopy --connections=4`` into
``null:``. Client: qemu-nbd serves the raw image; ``nbdcopy`` and ``wddk copy`` (4
connections each) copy it into a new local file. The image is fully allocated with
incompressible data, so every byte travels. Best of --repeat runs, rounds interleaved; the
ratios are what to read (absolute figures are noise on shared machines).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agentless import vhd
from agentless.units import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1 << 20


def make_image(path: Path, size: int) -> None:
    """*size* bytes of data that no block shares with another (a counter in each 4 KiB
    over a random 1 MiB pattern): fully allocated, nothing for anyone to skip."""
    pattern = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for index in range(size // MiB):
            for page in range(0, MiB, 4096):
                pattern[page : page + 8] = (index * 256 + page // 4096).to_bytes(8, "little")
            f.write(pattern)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.args}")
        time.sleep(0.05)
    time.sleep(0.2)


@contextlib.contextmanager
def server(kind: str, image: Path, sock: Path) -> Iterator[str]:
    """Serve *image* read-only on *sock*; yields the NBD URI."""
    if sock.exists():
        sock.unlink()
    if kind.startswith("qemu-nbd"):
        fmt = "vpc" if image.suffix == ".vhd" else "raw"
        args = ["qemu-nbd", "-f", fmt, "-r", "-t", "--shared=8", "-k", str(sock), "-x", "disk", str(image)]
    else:
        args = [PY, "-m", "agentless.winserver.cli", "serve-disk", str(image), "--socket", str(sock)]
        args += ["--read-only", "--name", "disk"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(30)


def warm_memory(path: Path, size: int) -> None:
    """Write and delete *size* bytes, untimed. On these VMs the balloon hands freed memory
    back to the host, and the first write into it runs at a fraction of normal speed for
    any program: without this, whichever copy runs first after a delete pays for it."""
    block = bytes(8 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    path.unlink()


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def best(results: dict[str, list[float]], name: str, fn: Callable[[], float]) -> None:
    results.setdefault(name, []).append(fn())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    size = parse_size(args.size)
    for tool in ("qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: qemu-utils, libnbd-bin)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        raw = work / "disk.raw"
        make_image(raw, size)
        image_vhd = work / "disk.vhd"
        vhd.import_raw(raw, image_vhd)
        sock = work / "nbd.sock"
        out = work / "out.raw"
        results: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for label, kind, image in (
                ("qemu-nbd raw", "qemu-nbd", raw),
                ("ours raw", "ours", raw),
                ("qemu-nbd vhd", "qemu-nbd", image_vhd),
                ("ours vhd", "ours", image_vhd),
            ):
                with server(kind, image, sock) as uri:
                    best(
                        results,
                        f"server {label}",
                        lambda uri=uri: timed(["nbdcopy", "--connections=4", uri, "null:"]),
                    )
            with server("qemu-nbd", raw, sock) as uri:
                for label, command in (
                    ("nbdcopy", ["nbdcopy", "--connections=4", "URI", str(out)]),
                    (
                        "wddk copy",
                        [PY, "-m", "agentless.wddk.cli", "copy", "URI", str(out), "--connections", "4"],
                    ),
                ):
                    out.unlink(missing_ok=True)
                    warm_memory(work / "scratch", size)
                    argv = [uri if a == "URI" else a for a in command]
                    best(results, f"client {label}", lambda argv=argv: timed(argv))
                    if os.path.getsize(out) != size:
                        raise RuntimeError(f"{label} produced {os.path.getsize(out)} bytes")
        mbps = {name: size / min(times) / 1e6 for name, times in results.items()}
        print(f"NBD throughput, {format_size(size)} fully allocated, best of {args.repeat}, 1 MB = 10^6 B")
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
        print()
        print("| measurement | MB/s | reference MB/s | ratio | goal |")
        print("|---|--:|--:|--:|--:|")
        rows = (
            ("server, raw image, read by nbdcopy -C 4", "server ours raw", "server qemu-nbd raw", 1.0),
            ("server, dynamic VHD, read by nbdcopy -C 4", "server ours vhd", "server qemu-nbd vhd", 1.0),
            ("client, wddk copy vs nbdcopy from qemu-nbd", "client wddk copy", "client nbdcopy", 0.9),
        )
        for label, ours, reference, goal in rows:
            ratio = mbps[ours] / mbps[reference]
            verdict = "met" if ratio >= goal else "NOT met"
            print(
                f"| {label} | {mbps[ours]:.0f} | {mbps[reference]:.0f} | {ratio:.2f} | >= {goal} {verdict} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
