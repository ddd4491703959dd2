"""verify: a sound repository is clean; one flipped bit anywhere – a data blob, an index
page, an index file, a restore point, a pack's trailer – is found, and exactly the
restore points it breaks are named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agentless.backup import sweep
from agentless.backup import verify as verify_module
from agentless.backup.keys import CorruptError, Keys
from agentless.backup.packs import PackBuilder
from agentless.backup.repository import CONDEMNED_KIND, Repository
from agentless.backup.storage import Backend, BitFlipBackend, LocalBackend, MemoryBackend
from agentless.backup.verify import verify
from tests.backup.building import Backup, backup, changed, chunk_ids, disk, flipping, page_ids, reopen


@dataclasses.dataclass
class Scene:
    """VM a backed up twice (the second changes chunk 2 of disk 0), VM b once."""

    backend: Backend
    a1: Backup
    a2: Backup
    b1: Backup


def build(backend: Backend, password: str | None = None) -> Scene:
    repo = Repository.init(backend, password)
    a1 = backup(repo, "a", [disk(1, 6, holes=(4,)), disk(2, 3)], "2026-11-24T05:00:00Z")
    a2 = backup(
        repo, "a", [changed(a1.images[0], 10, 2), a1.images[1]], "2026-11-25T05:00:00Z", "incremental"
    )
    b1 = backup(repo, "b", [disk(3, 4)], "2026-11-25T06:00:00Z")
    return Scene(backend, a1, a2, b1)


@pytest.fixture
def scene() -> Scene:
    return build(MemoryBackend())


def check(backend: Backend, read_data: bool = True) -> tuple[list[str], list[str]]:
    report = verify(reopen(backend), read_data=read_data)
    return report.problems, report.affected


def test_a_sound_repository_is_clean(tmp_path: Path) -> None:
    for backend in (MemoryBackend(), LocalBackend(tmp_path / "repo")):
        scene = build(backend)
        for read_data in (False, True):
            report = verify(reopen(backend), read_data=read_data)
            assert report.ok, report.problems
            assert report.affected == [] and report.notices == []
            assert report.points == 3
            assert report.pages == 4  # a1: 2, a2: 1 new (disk 1's page is shared), b1: 1
            assert report.packs == (3 if read_data else 0)
            assert report.blobs == len(
                set().union(
                    *(chunk_ids(reopen(backend), p) | page_ids(reopen(backend), p) for p in points(scene))
                )
            )


def test_a_sound_encrypted_repository_is_clean(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    build(backend, password="secret")
    report = verify(Repository.open(backend, "secret"), read_data=True)
    assert report.ok, report.problems


def points(scene: Scene) -> list[str]:
    return [scene.a1.point, scene.a2.point, scene.b1.point]


def flip_blob(scene: Scene, blob: bytes) -> BitFlipBackend:
    where = reopen(scene.backend).index()[blob]
    return flipping(scene.backend, where.pack, where.offset, where.offset + where.length)


@pytest.mark.parametrize("which", ["new in a2", "shared by a1 and a2", "of b1"])
def test_a_flipped_bit_in_a_data_blob_names_the_points_using_it(scene: Scene, which: str) -> None:
    repo = reopen(scene.backend)
    a1, a2, b1 = (chunk_ids(repo, p) for p in points(scene))
    blob, expected = {
        "new in a2": (min(a2 - a1), [scene.a2.point]),
        "shared by a1 and a2": (min(a1 & a2), sorted([scene.a1.point, scene.a2.point])),
        "of b1": (min(b1), [scene.b1.point]),
    }[which]
    flip = flip_blob(scene, blob)
    problems, affected = check(flip, read_data=False)
    assert problems == [] and affected == []  # the structure check does not read data blobs
    problems, affected = check(flip)
    assert flip.flipped
    assert affected == expected
    assert any(blob.hex()[:16] in line for line in problems), problems


def test_a_flipped_bit_in_an_index_page_is_found_without_reading_data(scene: Scene) -> None:
    repo = reopen(scene.backend)
    only_a1 = page_ids(repo, scene.a1.point) - page_ids(repo, scene.a2.point)
    shared = page_ids(repo, scene.a1.point) & page_ids(repo, scene.a2.point)
    assert len(only_a1) == 1 and len(shared) == 1
    for page, expected in ((min(only_a1), [scene.a1.point]), (min(shared), sorted(points(scene)[:2]))):
        for read_data in (False, True):
            problems, affected = check(flip_blob(scene, page), read_data)
            assert affected == expected
            assert any(page.hex()[:16] in line for line in problems), problems


def test_a_flipped_bit_in_an_index_file_names_the_points_whose_blobs_it_held(scene: Scene) -> None:
    (a1_index,) = scene.a1.index_files
    (b1_index,) = scene.b1.index_files
    # a2 stored only its changed chunk and page: the rest of it is indexed by a1's file
    for name, expected in ((a1_index, sorted(points(scene)[:2])), (b1_index, [scene.b1.point])):
        flip = BitFlipBackend(scene.backend, names={name})
        for read_data in (False, True):
            problems, affected = check(flip, read_data)
            assert affected == expected
            assert any(name in line for line in problems), problems


def test_a_flipped_bit_in_a_restore_point_names_it(scene: Scene) -> None:
    for point in points(scene):
        problems, affected = check(BitFlipBackend(scene.backend, names={f"points/{point}"}), read_data=False)
        assert affected == [point]
        assert len(problems) == 1 and point in problems[0]


@pytest.mark.parametrize("password", [None, "secret"])
def test_a_restore_point_copied_over_another_or_renamed_is_a_problem_naming_it(password: str | None) -> None:
    """Issue 13 item 4: a point file copied over another made ``verify --read-data``
    report nothing. Now it is one problem line naming the point, which is affected."""
    scene = build(MemoryBackend(), password)
    older, newer = scene.a1.point, scene.b1.point
    scene.backend.put(f"points/{newer}", scene.backend.get(f"points/{older}"))
    for read_data in (False, True):
        report = verify(reopen(scene.backend, password), read_data=read_data)
        assert report.problems == [
            f"restore point {newer}: points/{newer}: holds points/{older}, not points/{newer} "
            "(swapped or renamed)"
        ]
        assert report.affected == [newer]
    scene.backend.delete(f"points/{newer}")
    scene.backend.put("points/0123456789abcdef", scene.backend.get(f"points/{older}"))
    scene.backend.delete(f"points/{older}")
    report = verify(reopen(scene.backend, password))
    assert len(report.problems) == 1 and "points/0123456789abcdef: holds points/" in report.problems[0]
    assert report.affected == ["0123456789abcdef"]


def test_an_index_file_copied_over_another_is_a_problem_naming_it(scene: Scene) -> None:
    (a1_index,) = scene.a1.index_files
    (b1_index,) = scene.b1.index_files
    scene.backend.put(b1_index, scene.backend.get(a1_index))
    problems, affected = check(scene.backend)
    assert (
        f"index file {b1_index}: {b1_index}: its content is not that name's (swapped or renamed)" in problems
    )
    assert affected == [scene.b1.point]  # its blobs are indexed nowhere else


def test_a_key_file_out_of_bounds_is_a_problem() -> None:
    backend = MemoryBackend()
    build(backend, password="secret")
    [name] = backend.list("keys/")
    document = json.loads(backend.get(name))
    backend.put("keys/" + "0" * 32, json.dumps(document | {"kdf": document["kdf"] | {"n": 1 << 20}}).encode())
    report = verify(reopen(backend, "secret"))
    assert len(report.problems) == 1 and report.affected == []
    assert report.problems[0].startswith(
        f"key file keys/{'0' * 32}: scrypt parameters n=1048576 r=8 p=1 are outside"
    )


def test_a_flipped_bit_in_a_pack_trailer_is_a_problem_that_breaks_no_point(scene: Scene) -> None:
    (pack,) = scene.b1.packs
    size = scene.backend.size(pack)
    entries = [w for w in reopen(scene.backend).index().values() if w.pack == pack]
    end_of_blobs = max(w.offset + w.length for w in entries)
    problems, affected = check(flipping(scene.backend, pack, end_of_blobs, size))
    assert affected == []
    assert problems and all(pack in line for line in problems)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_flipped_bit_anywhere_is_found(scene: Scene, seed: int) -> None:
    names = [n for n in scene.backend.list() if n.split("/")[0] in ("data", "index", "points")]
    assert len(names) == 9
    for name in names:
        problems, _ = check(BitFlipBackend(scene.backend, names={name}, seed=seed))
        assert problems, f"a flipped bit in {name} went unnoticed"


def test_every_problem_is_reported_not_only_the_first(scene: Scene) -> None:
    repo = reopen(scene.backend)
    blob = min(chunk_ids(repo, scene.b1.point))
    where = repo.index()[blob]
    assert isinstance(scene.backend, MemoryBackend)
    scene.backend.objects[f"points/{scene.a1.point}"] = b"garbage"
    sealed = bytearray(scene.backend.objects[where.pack])
    sealed[where.offset + 20] ^= 0x40
    scene.backend.objects[where.pack] = bytes(sealed)
    problems, affected = check(scene.backend)
    assert affected == sorted([scene.a1.point, scene.b1.point])
    assert len(problems) >= 3  # the point, the pack's name, the blob


def test_a_missing_pack_names_the_points_that_need_it(scene: Scene) -> None:
    (pack,) = scene.a1.packs
    scene.backend.delete(pack)
    problems, affected = check(scene.backend, read_data=False)
    assert affected == sorted(points(scene)[:2])
    assert any(pack in line for line in problems)


@pytest.mark.parametrize("read_data", [False, True])
def test_many_problems_of_a_kind_are_counted_and_every_point_still_named(
    scene: Scene, read_data: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a1's pack gone: its entries (one line each) and the blobs a1 and a2 need from it
    # (one line each) go over a limit of 2 lines a kind; slices of 3 entries, packs read
    # 2 entries' worth at a time
    monkeypatch.setattr(verify_module, "LINES", 2)
    monkeypatch.setattr(verify_module, "GROUP_ENTRIES", 2)
    monkeypatch.setattr(sweep, "STEP", 3)
    (pack,) = scene.a1.packs
    scene.backend.delete(pack)
    report = verify(reopen(scene.backend), read_data=read_data)
    assert report.affected == sorted(points(scene)[:2])
    lines = report.problems
    assert len([line for line in lines if ": its pack " in line]) == 2
    assert len([line for line in lines if line.endswith("is missing (not in the index or its pack)")]) == 2
    more = [line for line in report.problems if line.startswith("… and ")]
    assert {line.rsplit("(", 1)[1] for line in more} == {"missing pack)", "missing)"}
    if read_data:
        assert report.packs == len(list(scene.backend.list("data/")))


def test_a_blob_held_only_by_a_condemned_pack_is_a_problem(scene: Scene) -> None:
    (pack,) = scene.b1.packs
    repo = reopen(scene.backend)
    scene.backend.put(
        "condemned/00000000000000aa",
        repo.keys.seal_meta(CONDEMNED_KIND, {"time": 1.0, "packs": [pack]}, "condemned/00000000000000aa"),
    )
    problems, affected = check(scene.backend, read_data=False)
    assert affected == [scene.b1.point]
    assert any("condemned" in line for line in problems)


@pytest.mark.parametrize("named", ["data/2e/2e1f4406162ef2212a7c0f0f", "3", 1.5, ["data/x"]])
def test_a_condemned_list_that_names_no_pack_is_reported_not_a_crash(scene: Scene, named: object) -> None:
    """Found by the fuzz campaign: a condemned list (sealed with the repository's key)
    naming something that is no pack's name passed the list's check and made verify fail
    with a ValueError deep in its sweep. The list is refused where it is read, and verify
    reports it."""
    repo = reopen(scene.backend)
    name = "condemned/00000000000000ab"
    scene.backend.put(name, repo.keys.seal_meta(CONDEMNED_KIND, {"time": 1.0, "packs": [named]}, name))
    with pytest.raises(CorruptError, match="malformed condemned list"):
        reopen(scene.backend).condemned()
    report = verify(reopen(scene.backend), read_data=False)
    assert any(line.startswith("condemned packs: ") and name in line for line in report.problems)


def test_leftovers_are_notices_not_problems(scene: Scene) -> None:
    builder = PackBuilder(Keys())
    builder.add(bytes(31) + b"\x01", "data", b"\x00whatever", 8)
    name, data, _ = builder.finish()
    scene.backend.put(name, data)
    report = verify(reopen(scene.backend), read_data=True)
    assert report.ok, report.problems
    assert len(report.notices) == 1 and name in report.notices[0]


def test_progress_is_reported(scene: Scene) -> None:
    seen: list[tuple[str, int, int]] = []
    verify(reopen(scene.backend), read_data=True, progress=lambda *a: seen.append(a))
    assert ("points", 3, 3) in seen and ("packs", 3, 3) in seen
