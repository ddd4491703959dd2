"""Interval arithmetic behind extent maps, against a brute-force model."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from agentless.vhd.extents import as_extents, merge, runs, union

intervals = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=30)


def _cover(pairs: list[tuple[int, int]]) -> set[int]:
    return {i for start, length in pairs for i in range(start, start + length)}


@given(intervals)
def test_merge_is_sorted_disjoint_cover(pairs: list[tuple[int, int]]) -> None:
    """merge() covers exactly the input points, sorted, with no two extents touching."""
    starts = np.array([s for s, _ in pairs], dtype=np.int64)
    ends = np.array([s + n for s, n in pairs], dtype=np.int64)
    merged = as_extents(*merge(starts, ends))
    assert _cover([(e.offset, e.length) for e in merged]) == _cover(pairs)
    for a, b in itertools.pairwise(merged):
        assert a.end < b.offset
    assert all(e.length > 0 for e in merged)


@given(intervals, intervals)
def test_union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    """union() of two maps covers both."""

    def arrays(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.array([s for s, _ in pairs], dtype=np.int64),
            np.array([s + n for s, n in pairs], dtype=np.int64),
        )

    merged = as_extents(*union(arrays(a), arrays(b)))
    assert _cover([(e.offset, e.length) for e in merged]) == _cover(a) | _cover(b)


@given(st.lists(st.booleans(), max_size=100))
def test_runs(bits: list[bool]) -> None:
    """runs() finds exactly the True positions."""
    starts, ends = runs(np.array(bits, dtype=bool))
    found = {i for s, e in zip(starts.tolist(), ends.tolist(), strict=True) for i in range(s, e)}
    assert found == {i for i, bit in enumerate(bits) if bit}
