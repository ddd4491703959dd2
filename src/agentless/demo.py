"""The project's main job, run by ``make demo``.

For now: a VHD round trip. A raw image with data and holes is imported into a dynamic VHD,
a differencing disk (a snapshot leaf) takes new writes, the chain is mapped, checked,
exported and compared byte for byte, then the leaf is coalesced into its parent and the
result compared again. Later the demo grows into the full backup and restore scenario.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import tempfile
import time

from agentless import vhd
from agentless.units import format_size

MiB = 1 << 20


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    rng = random.Random(2018)
    with tempfile.TemporaryDirectory(prefix="agentless-demo-") as work:
        raw = os.path.join(work, "disk.raw")
        size = 256 * MiB
        model = bytearray(size)
        for _ in range(24):
            off = rng.randrange(0, size // MiB - 4) * MiB
            chunk = rng.randbytes(rng.choice((64 * 1024, MiB, 3 * MiB)))
            model[off : off + len(chunk)] = chunk
        with open(raw, "wb") as f:
            f.truncate(size)
            for start in range(0, size, MiB):
                block = model[start : start + MiB]
                if any(block):
                    f.seek(start)
                    f.write(block)

        started = time.perf_counter()
        base = os.path.join(work, "base.vhd")
        stats = vhd.import_raw(raw, base)
        print(f"imported  {format_size(size)} raw -> {format_size(stats.bytes_written)} of VHD data")

        leaf = os.path.join(work, "leaf.vhd")
        vhd.create_differencing(leaf, base)
        with vhd.Chain.open(leaf, writable=True) as chain:
            for _ in range(200):
                off = rng.randrange(0, size - 70_000)
                data = rng.randbytes(rng.randrange(1, 70_000))
                chain.write(off, data)
                model[off : off + len(data)] = data
            extents = chain.extents()
            chain.flush()
        print(f"snapshot  200 unaligned writes into a differencing leaf; chain maps {len(extents)} extents")

        problems = vhd.check(leaf)
        print(f"check     {'sound' if not problems else problems[0]}")

        out = os.path.join(work, "out.raw")
        vhd.export_raw(leaf, out)
        expected = hashlib.sha256(model).hexdigest()
        same_chain = _digest(out) == expected
        print(f"export    chain == model: {same_chain}")

        result = vhd.coalesce(leaf, remove_child=True)
        out2 = os.path.join(work, "out2.raw")
        vhd.export_raw(base, out2)
        same_after = _digest(out2) == expected
        print(f"coalesce  {format_size(result.bytes_copied)} merged; base == model: {same_after}")
        print(f"done in {time.perf_counter() - started:.2f}s")
        return 0 if same_chain and same_after and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
