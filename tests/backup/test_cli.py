"""The ``vmbackup`` command line itself: where a WinCenter token may come from (a file,
the environment – never only the process's arguments), that no secret reaches what is
printed or logged, that gc's summary line says what it did, and that a command loads only
its group's modules."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agentless.backup.cli import GROUPS, build_parser
from agentless.backup.packs import TARGET_SIZE as PACK
from agentless.backup.repository import CHUNK_SIZE, Repository
from agentless.backup.settings import Settings
from agentless.units import format_size
from tests.backup.conftest import vmbackup
from tests.fleet import running_fleet
from tests.helpers import refused_port
from tests.sites import MiB, configure, guest, write_random

TOKEN = "wct_" + "T0kenT0kenT0kenT0kenT0kenT0kenT0kenT0kenX"  # the shape of a WinCenter token
DB_SECRET = "db-pass-9f3e"
HOOK_SECRET = "hook-sig-71c2"


def _env(tmp_path: Path) -> dict[str, str]:
    env = os.environ | {"VMBACKUP_CONFIG": str(tmp_path / "cfg" / "config.json")}
    for name in ("VMBACKUP_TOKEN", "VMBACKUP_DATABASE", "VMBACKUP_REPO", "VMBACKUP_PASSWORD"):
        env.pop(name, None)
    return env


def _settings(tmp_path: Path) -> Settings:
    return Settings.load(str(tmp_path / "cfg" / "config.json"))


def test_config_takes_the_token_from_a_file(tmp_path: Path) -> None:
    env = _env(tmp_path)
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o600)
    done = vmbackup(env, "config", "--center", "https://center:9443", "--token-file", str(secret))
    assert done.returncode == 0, done.stderr
    assert _settings(tmp_path).token == TOKEN
    assert TOKEN not in done.stdout + done.stderr and "--token-file" in done.stdout
    assert stat.S_IMODE(os.stat(tmp_path / "cfg" / "config.json").st_mode) == 0o600
    shown = json.loads(vmbackup(env, "config", "--json").stdout)
    assert shown["token"] is True and TOKEN not in json.dumps(shown)

    empty = tmp_path / "empty"
    empty.write_text("\n")
    refused = vmbackup(env, "config", "--token-file", str(empty))
    assert refused.returncode == 1 and "holds no token" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    both = vmbackup(env, "config", "--token-file", str(secret), "--token", "x")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_config_takes_the_token_from_the_environment(tmp_path: Path) -> None:
    env = _env(tmp_path) | {"VMBACKUP_TOKEN": TOKEN}
    done = vmbackup(env, "config", "--center", "https://center:9443", "--json")
    assert done.returncode == 0, done.stderr
    assert _settings(tmp_path).token == TOKEN
    document = json.loads(done.stdout)
    assert document["token"] is True and document["token_from"] == "$VMBACKUP_TOKEN"
    assert TOKEN not in done.stdout + done.stderr
    other = _env(tmp_path) | {"VMBACKUP_TOKEN": "wct_another_site"}  # exported for a second site's restore
    kept = vmbackup(other, "config", "--repo", str(tmp_path / "repo"), "--json")
    assert kept.returncode == 0 and json.loads(kept.stdout)["token_from"] is None, kept.stderr
    assert _settings(tmp_path).token == TOKEN  # a saved token is replaced only with --center or a flag
    stdin = vmbackup(_env(tmp_path), "config", "--token-file", "-", "--json")  # no terminal: empty
    assert stdin.returncode == 1 and "holds no token" in stdin.stderr


def test_config_prints_no_secret(tmp_path: Path) -> None:
    """The database URL's password and the webhook's query are masked in both outputs;
    what they say otherwise (which server, which account) stays."""
    env = _env(tmp_path) | {"VMBACKUP_TOKEN": TOKEN}
    database = f"postgresql://vmbackup:{DB_SECRET}@127.0.0.1:1/state"
    webhook = f"https://hooks.example/run-failed?sig={HOOK_SECRET}"
    set_up = vmbackup(env, "config", "--database", database, "--webhook", webhook)
    assert set_up.returncode == 0, set_up.stderr
    settings = _settings(tmp_path)
    assert settings.database == database and settings.webhook == webhook  # stored as given
    for args in (("config",), ("config", "--json")):
        shown = vmbackup(_env(tmp_path), *args)
        assert shown.returncode == 0, shown.stderr
        output = shown.stdout + shown.stderr
        for secret in (DB_SECRET, HOOK_SECRET, TOKEN):
            assert secret not in output, (args, output)
        assert "postgresql://vmbackup:***@127.0.0.1:1/state" in output
        assert "https://hooks.example/run-failed?sig=***" in output
    unreachable = vmbackup(_env(tmp_path), "policy", "list")  # nobody listens on port 1
    assert unreachable.returncode == 1 and "postgresql://vmbackup:***@127.0.0.1:1" in unreachable.stderr
    assert DB_SECRET not in unreachable.stderr + unreachable.stdout


def test_the_scheduler_logs_no_webhook_secret(tmp_path: Path) -> None:
    """A run that fails is posted to the webhook; the webhook being down is logged –
    without its query, which holds its secret."""
    env = _env(tmp_path)
    repo = str(tmp_path / "repo")
    Repository.init(repo).close()
    made = vmbackup(env, "policy", "create", "p", "--vm", "a", "--schedule", "@daily", "--repo", repo)
    assert made.returncode == 0, made.stderr
    with refused_port() as port:  # nobody listens
        webhook = f"http://127.0.0.1:{port}/hook?sig={HOOK_SECRET}"
        run = vmbackup(env, "run-now", "p", "--retries", "0", "--webhook", webhook)
    assert run.returncode == 1  # no WinCenter configured: the run fails, the webhook hears of it
    assert "not delivered" in run.stderr, run.stderr
    assert HOOK_SECRET not in run.stderr + run.stdout
    assert "/hook?sig=***" in run.stderr


def test_gc_after_a_failed_backup_counts_what_it_freed(tmp_path: Path) -> None:
    """A backup that failed after putting packs, before indexing them, left them for gc:
    the summary counts them among the packs deleted, as the bytes freed do."""
    repo = str(tmp_path / "repo")
    rng = random.Random(5)
    with Repository.init(repo) as repository, repository.writer() as writer:
        for _ in range(3 * PACK // CHUNK_SIZE):  # three packs put, then the backup fails
            writer.add(rng.randbytes(CHUNK_SIZE))
    packs = [p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()]
    assert len(packs) >= 2  # what the failed backup left
    freed = format_size(sum(p.stat().st_size for p in packs))
    env = _env(tmp_path) | {"VMBACKUP_REPO": repo}
    collected = vmbackup(env, "gc")
    assert collected.returncode == 0, collected.stderr
    line = collected.stdout.strip()
    assert line.startswith(f"{len(packs)} pack(s) deleted ({freed} freed;"), line
    assert f"{len(packs)} of them left by failed or killed backups" in line, line
    report = json.loads(vmbackup(env, "gc", "--json").stdout)  # a second run: nothing left
    assert report["orphans"] == [] and report["bytes_freed"] == 0


def test_the_index_cache_lives_where_it_is_told(tmp_path: Path) -> None:
    """``$XDG_CACHE_HOME/vmbackup/<repository id>/`` by default, ``--cache-dir`` where
    given, none left with ``--no-cache``; a default place that cannot be made: one
    warning and a temporary cache, the command still works."""
    repo = str(tmp_path / "repo")
    with Repository.init(repo) as repository, repository.writer() as writer:
        writer.add(random.Random(1).randbytes(CHUNK_SIZE))
        writer.flush()
        repository_id = repository.config["id"]
    xdg = tmp_path / "xdg"
    env = _env(tmp_path) | {"VMBACKUP_REPO": repo, "XDG_CACHE_HOME": str(xdg)}
    assert vmbackup(env, "gc").returncode == 0
    assert (xdg / "vmbackup" / repository_id / "index" / "lock").is_file()
    given = tmp_path / "given"
    assert vmbackup(env, "gc", "--cache-dir", str(given)).returncode == 0
    assert (given / repository_id / "index" / "lock").is_file()
    assert stat.S_IMODE((given / repository_id / "index").stat().st_mode) == 0o700
    for made in (xdg, given):
        for path in sorted(made.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    done = vmbackup(env, "gc", "--no-cache", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["deleted"] == []
    assert not list(xdg.rglob("*")) and not list(given.rglob("*"))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    odd = vmbackup(env | {"XDG_CACHE_HOME": str(blocked)}, "gc")
    assert odd.returncode == 0, odd.stderr
    assert "using a temporary cache" in odd.stderr and len(odd.stderr.strip().splitlines()) == 1, odd.stderr
    refused = vmbackup(env, "gc", "--cache-dir", str(blocked))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert str(blocked) in refused.stderr


def test_backup_all_backs_up_every_vm_wincenter_lists(tmp_path: Path) -> None:
    """``backup --all``: every VM of every host WinCenter lists, once, ``--parallel`` at
    a time – a full backup each, then an incremental each; with ``--vm`` too, or with
    neither, the command line is refused (exit 2)."""
    with running_fleet(tmp_path, 2) as fleet:
        names = fleet.make_vms(5, MiB)
        with fleet.host_client(0) as host:  # one VM running, with data its guest wrote
            host.start_vm(names[0])
            with guest(host, names[0], 0) as disk:
                write_random(disk, bytearray(MiB), random.Random(5), 10)
        fleet.sync()
        env = configure(fleet, tmp_path, str(tmp_path / "repo"))  # type: ignore[arg-type]
        full = json.loads(vmbackup(env, "backup", "--all", "--parallel", "3", "--json").stdout)
        assert full["failed"] == []
        assert sorted(b["vm"] for b in full["backups"]) == names
        assert {b["type"] for b in full["backups"]} == {"full"}
        again = json.loads(vmbackup(env, "backup", "--all", "--json").stdout)
        assert sorted(b["vm"] for b in again["backups"]) == names
        assert {b["type"] for b in again["backups"]} == {"incremental"}
        points = json.loads(vmbackup(env, "list", "--json").stdout)["points"]
        assert sorted(p["vm"] for p in points) == sorted(names * 2)
        both = vmbackup(env, "backup", "--all", "--vm", names[0])
        neither = vmbackup(env, "backup")
        assert (both.returncode, neither.returncode) == (2, 2)
        assert "not allowed with" in both.stderr and "--vm --all" in neither.stderr
        with fleet.host_client(0) as host:
            host.stop_vm(names[0])


_LOADED = """
import sys
from agentless.backup.cli import build_parser
build_parser(sys.argv[1])
heavy = ("agentless.wddk", "agentless.wincenter.client", "agentless.nbd.client", "httpx", "sqlalchemy")
print(" ".join(sorted(m for m in heavy if m in sys.modules)))
"""


@pytest.mark.parametrize(
    ("command", "loaded"),
    [
        ("list", ""),
        ("verify", ""),
        ("copy", ""),
        ("backup", "agentless.nbd.client agentless.wddk agentless.wincenter.client httpx"),
    ],
)
def test_a_command_loads_only_its_group(command: str, loaded: str) -> None:
    """The repository commands load neither WinCenter's client nor wddk (nor SQLAlchemy):
    they were most of `vmbackup list`'s start."""
    argv = [sys.executable, "-c", _LOADED, command]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert done.stdout.split() == loaded.split()


def test_every_group_declares_the_commands_it_is_named_for() -> None:
    everything, _ = build_parser(None)
    [action] = [a for a in everything._actions if a.dest == "command"]
    names = set(action.choices)  # type: ignore[arg-type]
    assert {"init", "list", "verify", "gc", "copy", "backup", "restore", "policy", "serve"} <= names
    for command, module in GROUPS.items():
        parser, modules = build_parser(command)
        assert [m.__name__.rsplit(".", 1)[1] for m in modules] == [module]
        [action] = [a for a in parser._actions if a.dest == "command"]
        assert command in action.choices  # type: ignore[operator]


_SAYING = """
import sys, threading
from agentless.backup.clitools import say

def lines(thread):
    for n in range(2000):
        say(f"thread {thread} line {n}")

threads = [threading.Thread(target=lines, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_log_lines_from_threads_stay_whole() -> None:
    """Four threads logging at once through a real pipe: every line on stderr is one whole
    line (``print`` wrote text and newline apart, and a test once read a port back from
    the log as ``42457`` joined to the next line's year)."""
    done = subprocess.run([sys.executable, "-c", _SAYING], capture_output=True, text=True, check=True)
    lines = done.stderr.splitlines()
    assert len(lines) == 8000
    assert all(line.startswith("thread ") and line.count("line") == 1 for line in lines)
