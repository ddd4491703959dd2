"""Policies and their schedule: the state database (SQLite, reopened, and PostgreSQL), when a slot
is due – including slots missed while no daemon ran, which make one run – and the
``vmbackup policy`` commands with their errors."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from agentless.backup.policies import PolicyError, RunState, State, VmOutcome, due_slot, next_slot
from agentless.backup.repository import Repository
from tests.backup.conftest import vmbackup

UTC = datetime.UTC


def at(hour: int, minute: int = 0, day: int = 26) -> datetime.datetime:
    return datetime.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def state(db_url: str) -> Iterator[State]:
    """A new state on each engine: SQLite, and a real PostgreSQL (a server's database
    when several machines share the policies)."""
    with State(db_url) as made:
        yield made


pytestmark = pytest.mark.usefixtures("utc_local_time")


def test_a_slot_is_due_once_its_time_has_come(state: State) -> None:
    policy = state.create_policy("hourly", vms=["a"], schedule="0 * * * *", repo="/r", now=at(10, 30))
    assert due_slot(policy, at(10, 59)) is None
    assert due_slot(policy, at(11, 0)) == (at(11), 0)
    state.mark_slot("hourly", at(11))
    policy = state.policy("hourly")
    assert due_slot(policy, at(11, 59)) is None
    assert due_slot(
        policy,
        at(
            12,
            0,
        ),
    ) == (at(12), 0)


def test_slots_missed_while_down_make_one_run_for_the_latest(state: State) -> None:
    """Four slots passed (11:00 .. 14:00) while no daemon ran: one run, for 14:00, that
    stands for the three before; after it nothing is due until 15:00."""
    state.create_policy("hourly", vms=["a"], schedule="0 * * * *", repo="/r", now=at(10, 30))
    due = due_slot(state.policy("hourly"), at(14, 10))
    assert due == (at(14), 3)
    state.mark_slot("hourly", at(14))
    assert due_slot(state.policy("hourly"), at(14, 59)) is None
    assert due_slot(state.policy("hourly"), at(15, 0)) == (at(15), 0)
    assert next_slot("0 2 * * *", at(14, 10)) == at(2, day=27)


def test_an_older_slot_never_moves_the_schedule_back(state: State) -> None:
    state.create_policy("p", vms=["a"], schedule="*/10 * * * *", repo="/r", now=at(9))
    state.mark_slot("p", at(10))
    state.mark_slot("p", at(9, 30))
    last = state.policy("p").last_slot
    assert last is not None and last.replace(tzinfo=UTC) == at(10)


def test_policies_persist_and_describe_themselves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with State(url) as state:
        state.create_policy(
            "nightly",
            vms=["web", "db", "web"],
            schedule="0 2 * * *",
            type="incremental",
            full_every=7,
            keep={"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 0},
            offline=True,
            repo="/backups/main",
            copy_to="s3://offsite/main",
            now=at(8),
        )
        state.create_policy("everything", all_vms=True, schedule="@hourly", repo="/backups/main", now=at(8))
    with State(url) as state:  # a new process sees the same
        described = {p.name: p.describe() for p in state.policies()}
        assert list(described) == ["everything", "nightly"]
        nightly = described["nightly"]
        assert nightly["vms"] == ["web", "db"]
        assert nightly["keep"] == {"keep_daily": 7, "keep_weekly": 4}
        assert (nightly["offline"], nightly["full_every"], nightly["copy_to"]) == (
            True,
            7,
            "s3://offsite/main",
        )
        assert nightly["created"] == "2026-11-26T08:00:00Z" and nightly["last_slot"] is None
        assert described["everything"]["vms"] == "all"
        state.delete_policy("nightly")
        assert [p.name for p in state.policies()] == ["everything"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "bad name"}, "policy name"),
        ({"vms": []}, "--vm VM"),
        ({"all_vms": True}, "not both"),
        ({"schedule": "every day"}, "not a cron expression"),
        ({"schedule": "61 * * * *"}, "not a cron expression"),
        ({"type": "differential"}, "incremental or full"),
        ({"full_every": 0}, "1 or more"),
        ({"keep": {"keep_forever": 1}}, "known rule"),
        ({"keep": {"keep_last": -5}}, "known rule"),
        ({"copy_to": "/r"}, "own repository"),
    ],
)
def test_invalid_policies_are_refused_and_nothing_is_stored(
    state: State, fields: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"name": "p", "vms": ["a"], "schedule": "0 * * * *", "repo": "/r"}
    with pytest.raises(PolicyError, match=message):
        state.create_policy(**(arguments | fields))  # type: ignore[arg-type]
    assert state.policies() == []


def test_names_are_unique_and_unknown_ones_are_errors(state: State) -> None:
    state.create_policy("p", vms=["a"], schedule="0 * * * *", repo="/r")
    with pytest.raises(PolicyError, match="exists already"):
        state.create_policy("p", vms=["b"], schedule="5 * * * *", repo="/r")
    assert state.policy("p").vms == ["a"]
    for call in (state.policy, state.delete_policy):
        with pytest.raises(PolicyError, match="no policy 'q'"):
            call("q")


def test_a_policy_is_changed_whole_and_keeps_its_name_creation_and_last_slot(state: State) -> None:
    made = state.create_policy("p", vms=["a"], schedule="0 * * * *", repo="/r", now=at(1))
    state.mark_slot("p", at(2))
    state.update_policy(
        "p", all_vms=True, schedule="30 1 * * 6", type="full", keep={"keep_daily": 7}, offline=True, repo="/s"
    )
    changed = state.policy("p").describe()
    assert changed["vms"] == "all" and changed["schedule"] == "30 1 * * 6" and changed["type"] == "full"
    assert changed["keep"] == {"keep_daily": 7} and changed["offline"] is True and changed["repo"] == "/s"
    assert changed["created"] == made.describe()["created"]
    assert changed["last_slot"] == "2026-11-26T02:00:00Z"
    with pytest.raises(PolicyError, match="not a cron expression"):
        state.update_policy("p", vms=["b"], schedule="never", repo="/s")
    assert state.policy("p").describe() == changed  # nothing of a refused change is stored
    with pytest.raises(PolicyError, match="no policy 'q'"):
        state.update_policy("q", vms=["b"], schedule="0 * * * *", repo="/s")


def test_the_last_run_of_each_policy(state: State) -> None:
    for name in ("p", "q", "r"):
        state.create_policy(name, vms=["a"], schedule="0 * * * *", repo="/r")
    assert state.last_runs() == {}
    first = state.start_run("p", "manual", now=at(1))
    other = state.start_run("q", "manual", now=at(2))
    newest = state.start_run("p", "schedule", now=at(3))
    state.finish_run(first, RunState.SUCCEEDED, [], now=at(4))
    found = state.last_runs()
    assert {name: run.id for name, run in found.items()} == {"p": newest, "q": other}
    assert found["p"].trigger == "schedule" and found["p"].state == "running"
    state.delete_policy("q")  # its runs stay recorded, a page of policies no longer shows them
    assert set(state.last_runs()) == {"p"}


def test_runs_are_recorded_and_a_dead_process_runs_become_interrupted(state: State) -> None:
    done = state.start_run("p", "manual", now=at(9))
    state.finish_run(
        done,
        "failed",
        [
            VmOutcome("web", "succeeded", "id-1", "full", "ab" * 8, read=10, stored=7, seconds=1.5),
            VmOutcome("db", "failed", "id-2", attempts=3, error="host unreachable"),
        ],
        "1 of 2 VM(s) failed",
        now=at(9, 5),
    )
    left = state.start_run("p", "schedule", at(10), missed=2, now=at(10))
    elsewhere = state.start_run("q", "manual", now=at(10))
    assert state.interrupt_dead(now=at(11)) == []  # this process runs them: alive
    dead = subprocess.Popen(["true"])  # a pid that has ended
    dead.wait()
    with state.engine.begin() as db:  # as the dead process and another machine wrote them
        change = sqlalchemy.text("UPDATE runs SET owner = :owner WHERE id = :id")
        db.execute(change, {"owner": f"{socket.gethostname()}:{dead.pid}", "id": left})
        db.execute(change, {"owner": f"another-machine:{dead.pid}", "id": elsewhere})
    assert state.interrupt_dead(now=at(11)) == [left]  # not the other machine's
    assert state.run(elsewhere).state == "running"
    runs = [r.describe() for r in state.runs("p")]
    assert [(r["id"], r["state"]) for r in runs] == [(left, "interrupted"), (done, "failed")]
    assert runs[0]["missed"] == 2 and runs[0]["slot"] == "2026-11-26T10:00:00Z"
    assert runs[1]["seconds"] == 300.0
    assert [(v["vm"], v["outcome"], v["read"], v["attempts"]) for v in runs[1]["vms"]] == [
        ("web", "succeeded", 10, 1),
        ("db", "failed", 0, 3),
    ]
    totals = {(t["kind"], t.get("state") or t.get("outcome")): t["count"] for t in state.totals()}
    assert totals == {
        ("runs", "failed"): 1,
        ("runs", "interrupted"): 1,
        ("runs", "running"): 1,
        ("vms", "succeeded"): 1,
        ("vms", "failed"): 1,
    }


def test_a_state_of_an_unknown_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    State(url).close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE vmbackup_meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(PolicyError, match="schema 99 is unknown"):
        State(url)


# ---------------------------------------------------------------------- the commands


def _two_repositories(tmp_path: Path) -> tuple[str, str, dict[str, str]]:
    """A repository and an off-site one under *tmp_path*; the environment of commands
    whose settings (and SQLite state) are in ``cfg/`` there, the first repository theirs."""
    repo, offsite = str(tmp_path / "repo"), str(tmp_path / "offsite")
    Repository.init(repo).close()
    Repository.init(offsite).close()
    env = os.environ | {"VMBACKUP_CONFIG": str(tmp_path / "cfg" / "config.json"), "VMBACKUP_REPO": repo}
    env.pop("VMBACKUP_DATABASE", None)
    return repo, offsite, env


def test_policy_commands(tmp_path: Path) -> None:
    repo, offsite, env = _two_repositories(tmp_path)

    made = vmbackup(
        env,
        *("policy", "create", "nightly", "--vm", "web", "--vm", "db", "--schedule", "0 2 * * *"),
        *("--full-every", "7", "--keep-daily", "7", "--keep-weekly", "4", "--copy-to", offsite, "--json"),
    )
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    assert document["vms"] == ["web", "db"] and document["repo"] == repo and document["copy_to"] == offsite
    assert document["next_run"].endswith("T02:00:00+00:00")
    assert (tmp_path / "cfg" / "vmbackup.db").exists()  # SQLite beside the settings

    several = vmbackup(
        env, "policy", "create", "weekly", "--vm", "a", "b", "--vm", "c", "--schedule", "@weekly"
    )
    assert several.returncode == 0, several.stderr
    assert json.loads(vmbackup(env, "policy", "show", "weekly", "--json").stdout)["vms"] == ["a", "b", "c"]
    assert vmbackup(env, "policy", "delete", "weekly").returncode == 0

    listed = vmbackup(env, "policy", "list")
    assert listed.returncode == 0 and "nightly" in listed.stdout and "keep-daily 7" in listed.stdout
    shown = json.loads(vmbackup(env, "policy", "show", "nightly", "--json").stdout)
    assert shown["keep"] == {"keep_daily": 7, "keep_weekly": 4} and shown["runs"] == []
    assert vmbackup(env, "jobs").stdout.strip() == "no runs yet"

    bad = [
        (("policy", "create", "x", "--vm", "a", "--schedule", "at noon"), "not a cron expression"),
        (("policy", "create", "nightly", "--vm", "a", "--schedule", "@daily"), "exists already"),
        (
            ("policy", "create", "y", "--all", "--schedule", "@daily", "--copy-to", str(tmp_path)),
            "no repository",
        ),
        (
            ("policy", "create", "z", "--all", "--schedule", "@daily", "--repo", str(tmp_path / "no")),
            "no repository",
        ),
        (("policy", "show", "nope"), "no policy 'nope'"),
        (("policy", "delete", "nope"), "no policy 'nope'"),
        (("run-now", "nope"), "no policy 'nope'"),
        (("jobs", "--policy", "nope"), "no policy 'nope'"),
        (("jobs", "12345"), "no run 12345"),
        (("serve", "--listen", "nowhere"), "HOST:PORT"),
    ]
    for args, message in bad:
        failed = vmbackup(env, *args)
        assert failed.returncode == 1, (args, failed.stdout, failed.stderr)
        assert message in failed.stderr and "Traceback" not in failed.stderr, (args, failed.stderr)
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    both = vmbackup(env, "policy", "create", "w", "--vm", "a", "--all", "--schedule", "@daily")
    assert both.returncode == 2 and "not allowed with" in both.stderr

    configured = json.loads(vmbackup(env, "config", "--webhook", "http://127.0.0.1:9/hook", "--json").stdout)
    assert configured["webhook"] == "http://127.0.0.1:9/hook"
    assert configured["database"] == f"sqlite:///{tmp_path / 'cfg' / 'vmbackup.db'}"
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    moved = json.loads(vmbackup(env, "config", "--database", elsewhere, "--json").stdout)
    assert moved["database"] == elsewhere and moved["webhook"] == "http://127.0.0.1:9/hook"
    assert vmbackup(env, "policy", "list").stdout.strip() == "no policies"  # another state
    env["VMBACKUP_DATABASE"] = f"sqlite:///{tmp_path / 'cfg' / 'vmbackup.db'}"  # the first one again

    gone = vmbackup(env, "policy", "delete", "nightly")
    assert gone.returncode == 0 and "deleted" in gone.stdout
    assert vmbackup(env, "policy", "list").stdout.strip() == "no policies"


def test_policy_edit_changes_what_it_is_given_and_keeps_the_rest(tmp_path: Path) -> None:
    """``policy edit``: the options given replace those settings (``--vm`` the list,
    ``--all`` instead of a list, ``--online``, ``--full-every 0`` and ``--keep-X 0`` to
    drop, ``--no-copy-to``), the others stay, and so do its creation and the slot it ran
    last; a bad value or an unknown policy is one line and changes nothing."""
    repo, offsite, env = _two_repositories(tmp_path)
    made = vmbackup(
        env,
        *("policy", "create", "nightly", "--vm", "web", "db", "--schedule", "0 2 * * *", "--offline"),
        *("--full-every", "7", "--keep-daily", "7", "--keep-weekly", "4", "--copy-to", offsite, "--json"),
    )
    before = json.loads(made.stdout)
    slot = datetime.datetime(2026, 1, 1, 2, tzinfo=datetime.UTC)
    with State(f"sqlite:///{tmp_path / 'cfg' / 'vmbackup.db'}") as state:
        state.mark_slot("nightly", slot)

    changed = vmbackup(
        env,
        *(
            "policy",
            "edit",
            "nightly",
            "--schedule",
            "30 3 * * *",
            "--keep-daily",
            "0",
            "--keep-monthly",
            "6",
        ),
        *("--online", "--json"),
    )
    assert changed.returncode == 0, changed.stderr
    after = json.loads(changed.stdout)
    assert after["schedule"] == "30 3 * * *" and after["offline"] is False
    assert after["keep"] == {"keep_weekly": 4, "keep_monthly": 6}
    kept = ("vms", "type", "full_every", "repo", "copy_to", "created")
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert after["last_slot"] is not None and after["last_slot"].startswith("2026-01-01T02:00")

    everything = vmbackup(
        env, "policy", "edit", "nightly", "--all", "--full-every", "0", "--no-copy-to", "--json"
    )
    assert everything.returncode == 0, everything.stderr
    shown = json.loads(everything.stdout)
    assert (shown["vms"], shown["full_every"], shown["copy_to"]) == ("all", None, None)
    listed = json.loads(vmbackup(env, "policy", "edit", "nightly", "--vm", "app", "--json").stdout)
    assert listed["vms"] == ["app"]

    for args, message in [
        (("--schedule", "at noon"), "not a cron expression"),
        (("--copy-to", repo), "own repository"),
        (("--repo", str(tmp_path / "none")), "no repository"),
        (("--keep-daily", "-2"), "a count of -1 (all) or more"),
    ]:
        failed = vmbackup(env, "policy", "edit", "nightly", *args)
        assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1, (args, failed.stderr)
        assert message in failed.stderr and "Traceback" not in failed.stderr, (args, failed.stderr)
    unknown = vmbackup(env, "policy", "edit", "nope", "--schedule", "@daily")
    assert unknown.returncode == 1 and unknown.stderr.startswith("vmbackup: no policy 'nope'"), unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    both = vmbackup(env, "policy", "edit", "nightly", "--offline", "--online")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    now = json.loads(vmbackup(env, "policy", "show", "nightly", "--json").stdout)
    assert now.pop("runs") == [] and now == listed  # the refused edits changed nothing
