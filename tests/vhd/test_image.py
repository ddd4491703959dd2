"""One VHD file: the BAT as data, bitmap caching, and writes killed at any instant."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agentless import vhd
from agentless.vhd import image as image_module
from agentless.vhd.bat import BAT_UNUSED

MiB = 1 << 20


def test_bat_as_data(tmp_path: Path) -> None:
    """The BAT is a uint32 array: allocated entries point at blocks in write order."""
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, 10 * MiB)
    with vhd.Chain.open(path, writable=True) as chain:
        chain.write(6 * MiB, b"a")
        chain.write(0, b"b")
    with vhd.VhdImage.open(path) as image:
        assert image.bat.dtype == np.uint32
        assert image.bat.tolist()[1:3] == [BAT_UNUSED, BAT_UNUSED]
        assert image.allocated_blocks().tolist() == [0, 3]
        assert int(image.bat[3]) < int(image.bat[0])  # block 3 was written first


def test_bitmap_cache_eviction_keeps_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a cache of two bitmaps, writes and reads over many blocks stay exact."""
    monkeypatch.setattr(image_module, "BITMAP_CACHE_BLOCKS", 2)
    base, leaf = tmp_path / "b.vhd", tmp_path / "l.vhd"
    vhd.create_dynamic(base, 16 * MiB, block_size=512 * 1024)
    vhd.create_differencing(leaf, base)
    rng = random.Random(3)
    model = bytearray(16 * MiB)
    with vhd.Chain.open(leaf, writable=True) as chain:
        for _ in range(200):
            off = rng.randrange(16 * MiB - 4096)
            data = rng.randbytes(rng.randrange(1, 4096))
            chain.write(off, data)
            model[off : off + len(data)] = data
        assert len(chain.leaf._bitmaps) <= 2
    with vhd.Chain.open(leaf) as chain:
        assert chain.read(0, 16 * MiB) == bytes(model)


KILLER = r"""
import os, signal, sys, random
from agentless import vhd
limit = int(sys.argv[2])
calls = 0
real = os.pwritev
def pwritev(*args):
    global calls
    calls += 1
    if calls == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
os.pwritev = pwritev
rng = random.Random(5)
with vhd.Chain.open(sys.argv[1], writable=True) as chain:
    for _ in range(8):
        off = rng.randrange(chain.size - 200_000)
        chain.write(off, bytes([0xEE]) * rng.randrange(1, 200_000))
print(calls)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_write_killed_at_every_write_call(tmp_path: Path, kind: str) -> None:
    """SIGKILL before each write system call of a series of writes (block allocations,
    data, bitmaps, BAT): the file still opens, checks sound, and every byte reads either
    its old value or the new one."""
    template = tmp_path / "template"
    template.mkdir()
    base = template / "base.vhd"
    vhd.create_dynamic(base, 8 * MiB, block_size=512 * 1024)
    old = random.Random(1).randbytes(8 * MiB)
    with vhd.Chain.open(base, writable=True) as chain:
        chain.write(0, old[: 4 * MiB])
    old = old[: 4 * MiB] + bytes(4 * MiB)
    target = base
    if kind == "differencing":
        target = template / "leaf.vhd"
        vhd.create_differencing(target, base)
    dry = tmp_path / "dry"
    subprocess.run(["cp", "-a", str(template), str(dry)], check=True)
    out = subprocess.run(
        [sys.executable, "-c", KILLER, str(dry / target.name), "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    calls = int(out.stdout)
    assert calls > 8
    old_array = np.frombuffer(old, dtype=np.uint8)
    for limit in range(1, calls + 1):
        work = tmp_path / f"k{limit}"
        subprocess.run(["cp", "-a", str(template), str(work)], check=True)
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(work / target.name), str(limit)], capture_output=True
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert vhd.check(work / target.name) == [], f"killed before write call {limit}"
        with vhd.Chain.open(work / target.name) as chain:
            now = np.frombuffer(chain.read(0, chain.size), dtype=np.uint8)
        assert bool(((now == old_array) | (now == 0xEE)).all()), f"killed before write call {limit}"
        subprocess.run(["rm", "-rf", str(work)], check=True)
