"""Coalesce: the merged parent reads as the chain did, and a kill at any instant of the
merge leaves a chain that reads exactly as before."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentless import vhd

MiB = 1 << 20

# Runs a coalesce that SIGKILLs itself right before its N-th write system call (pwritev) or
# right before unlinking the child: every instant at which the file state can differ.
KILLER = r"""
import os, signal, sys
from agentless import vhd
limit = int(sys.argv[2])
calls = 0
def step():
    global calls
    calls += 1
    if calls == limit:
        os.kill(os.getpid(), signal.SIGKILL)
real_pwritev, real_unlink, real_fsync = os.pwritev, os.unlink, os.fsync
def pwritev(*args):
    step()
    return real_pwritev(*args)
def unlink(*args, **kwargs):
    step()
    return real_unlink(*args, **kwargs)
os.pwritev, os.unlink = pwritev, unlink
vhd.coalesce(sys.argv[1], remove_child=True)
print(calls)
"""


def _make_chain(work: Path, parent_kind: str, seed: int) -> tuple[Path, Path, bytes]:
    """base (dynamic) [-> mid (differencing)] -> leaf, with data in every layer."""
    rng = random.Random(seed)
    size = 12 * MiB
    model = bytearray(size)
    base = work / "base.vhd"
    vhd.create_dynamic(base, size, block_size=MiB)
    with vhd.Chain.open(base, writable=True) as chain:
        for _ in range(4):
            off, data = rng.randrange(size - 300_000), rng.randbytes(rng.randrange(1, 300_000))
            chain.write(off, data)
            model[off : off + len(data)] = data
    parent = base
    if parent_kind == "differencing":
        parent = work / "mid.vhd"
        vhd.create_differencing(parent, base)
        with vhd.Chain.open(parent, writable=True) as chain:
            for _ in range(4):
                off, data = rng.randrange(size - 200_000), rng.randbytes(rng.randrange(1, 200_000))
                chain.write(off, data)
                model[off : off + len(data)] = data
    leaf = work / "leaf.vhd"
    vhd.create_differencing(leaf, parent)
    with vhd.Chain.open(leaf, writable=True) as chain:
        for _ in range(6):
            off, data = rng.randrange(size - 500_000), rng.randbytes(rng.randrange(1, 500_000))
            chain.write(off, data)
            model[off : off + len(data)] = data
    return parent, leaf, bytes(model)


def _reads(path: Path) -> bytes:
    with vhd.Chain.open(path) as chain:
        return chain.read(0, chain.size)


@pytest.mark.parametrize("parent_kind", ["dynamic", "differencing"])
def test_coalesce_merges_child(tmp_path: Path, parent_kind: str) -> None:
    """After coalesce the parent alone reads as the chain through the child did, the
    parent is sound, and the child is gone."""
    parent, leaf, model = _make_chain(tmp_path, parent_kind, seed=1)
    assert _reads(leaf) == model
    result = vhd.coalesce(leaf, remove_child=True)
    assert result.bytes_copied > 0
    assert not leaf.exists()
    assert _reads(parent) == model
    assert vhd.check(parent) == []


def test_coalesce_refuses_non_differencing(tmp_path: Path) -> None:
    """A disk without a parent has nothing to merge into: a clear error, no change."""
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, MiB)
    before = path.read_bytes()
    with pytest.raises(vhd.VhdError, match="not a differencing disk"):
        vhd.coalesce(path)
    assert path.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("parent_kind", ["dynamic", "differencing"])
def test_kill_at_every_write_keeps_chain_intact(tmp_path: Path, parent_kind: str) -> None:
    """SIGKILL before each write system call of a coalesce (and before the unlink of the
    child): the surviving chain reads exactly as before, checks sound, and a second
    coalesce finishes the job."""
    template = tmp_path / "template"
    template.mkdir()
    parent, leaf, model = _make_chain(template, parent_kind, seed=7)
    dry = tmp_path / "dry"
    subprocess.run(["cp", "-a", str(template), str(dry)], check=True)
    total = subprocess.run(
        [sys.executable, "-c", KILLER, str(dry / leaf.name), "0"], capture_output=True, text=True, check=True
    )
    calls = int(total.stdout.strip())
    assert calls > 10
    print(f"{calls} kill points")
    env = dict(os.environ)
    for limit in range(1, calls + 1):
        work = tmp_path / f"kill{limit}"
        subprocess.run(["cp", "-a", str(template), str(work)], check=True)
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(work / leaf.name), str(limit)], capture_output=True, env=env
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        survivor = work / leaf.name if (work / leaf.name).exists() else work / parent.name
        assert _reads(survivor) == model, f"killed before call {limit}"
        assert vhd.check(survivor) == [], f"killed before call {limit}"
        if survivor.name == leaf.name:
            vhd.coalesce(survivor, remove_child=True)
        assert _reads(work / parent.name) == model
        subprocess.run(["rm", "-rf", str(work)], check=True)
