"""The systemd units of ``deploy/systemd/`` (docs/deployment.md), checked as far as a
machine without a running systemd can check them:

- ``systemd-analyze verify`` of each unit in a scratch root (the system's own units
  copied in, the ExecStart programs as stubs), with nothing printed, and the offline
  ``systemd-analyze security`` exposure under a bound;
- each ExecStart, its specifiers and variables expanded as systemd would with the unit's
  defaults, parsed by the real argparse parser of that command – and so are the flags
  the environment file examples suggest (the worker flags of ``vmbackup serve`` too);
- no secret on a command line or in ``Environment=`` (which ``systemctl show`` tells any
  local user): password and token files only under the credentials directory, no
  ``--token``, ``--password``, database URL or URL with a password;
- every credential loaded is used, and every one used is loaded;
- the hardening settings, and the reasons written where one is left out;
- every listening address defaults to loopback, through a variable the example
  environment file documents;
- the sysusers.d and tmpfiles.d snippets applied to a scratch root: users, 0700
  directories, 0600 root-owned credential files;
- the daemons that the units run with ``MemoryDenyWriteExecute=yes`` serve requests
  under ``prctl(PR_SET_MDWE)``, the kernel's form of that restriction.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agentless.backup import cli as backup_cli
from agentless.backup.settings import DEFAULT_NBD_PORT as VMBACKUP_NBD_PORT
from agentless.wincenter import cli as wincenter_cli
from agentless.wincenter.center import DEFAULT_PORT as WINCENTER_PORT
from agentless.winserver import cli as winserver_cli
from agentless.winserver.host import DEFAULT_API_PORT, DEFAULT_NBD_PORT
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "systemd"
UNITS = ("winserver", "wincenter", "vmbackup")
PREFIX = "/opt/agentless/bin/"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
EXPOSURE = 2.0  # systemd-analyze security: 0 best, 10 worst; "OK" is below 4.5


# what each unit must set, exactly
HARDENING = {
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateMounts": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "RemoveIPC": "yes",
    "SystemCallArchitectures": "native",
    "Restart": "on-failure",
    "Type": "exec",
}
# where a unit departs from HARDENING or adds to it: setting -> value (None: absent,
# and then a comment of the unit names the setting and says why)
DEPARTURES: dict[str, dict[str, str | None]] = {
    "winserver": {
        "MemoryDenyWriteExecute": None,  # qemu's TCG is a JIT
        "PrivateDevices": None,  # /dev/kvm
        "DevicePolicy": "closed",
        "DeviceAllow": "/dev/kvm rw",
        "KillMode": "mixed",
    },
    "wincenter": {
        "MemoryDenyWriteExecute": "yes",
        "PrivateDevices": "yes",
        "ProcSubset": "pid",
    },
    "vmbackup": {
        "MemoryDenyWriteExecute": "yes",
        "PrivateDevices": "yes",
        "ProcSubset": "pid",
        "KillMode": "mixed",
    },
}
# shortest stop each daemon needs before SIGKILL (see the unit's comment)
STOP_SECONDS = {"winserver": 120, "wincenter": 10, "vmbackup": 120}

BIND_FLAGS = {"--bind", "--listen", "--nbd-listen"}
SECRET_FLAGS = {"--token", "--password", "--db", "--database"}  # the value itself on argv
FILE_FLAGS = {"--password-file", "--to-password-file", "--token-file"}  # must be credentials
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY\b|ACCESS_KEY", re.IGNORECASE)


# ---------------------------------------------------------------------- reading units


def read_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (keys may repeat), comments left out."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def unit(name: str) -> dict[str, list[str]]:
    return read_unit(DEPLOY / f"{name}.service")


def service(settings: dict[str, list[str]], key: str) -> str | None:
    """The last value of ``[Service] key`` (as systemd takes it), None when unset."""
    values = settings.get(f"Service.{key}")
    return values[-1] if values else None


def comments(name: str) -> str:
    return "\n".join(
        line
        for line in (DEPLOY / f"{name}.service").read_text().splitlines()
        if line.lstrip().startswith("#")
    )


def defaults(settings: dict[str, list[str]]) -> dict[str, str]:
    """The unit's ``Environment=`` assignments."""
    found = {}
    for value in settings.get("Service.Environment", []):
        for word in shlex.split(value):
            key, _, assigned = word.partition("=")
            found[key] = assigned
    return found


def example(name: str) -> dict[str, list[str]]:
    """The variables of ``NAME.env.example``, commented-out examples included: each
    variable's suggested values."""
    found: dict[str, list[str]] = {}
    for raw in (DEPLOY / f"{name}.env.example").read_text().splitlines():
        line = raw.strip().lstrip("#").strip()
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def specifiers(text: str, name: str) -> str:
    """systemd's specifiers used by the units, for the system manager."""
    table = {"%S": "/var/lib", "%C": "/var/cache", "%d": f"/run/credentials/{name}.service", "%%": "%"}
    return re.sub(r"%[SCd%]", lambda m: table[m.group(0)], text)


def expand(words: list[str], environment: dict[str, str]) -> list[str]:
    """systemd's variable expansion of a command line: ``${X}`` inside a word, ``$X`` as
    a whole word split at whitespace (none when unset or empty)."""
    argv: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += environment.get(whole.group(1), "").split()
        else:
            argv.append(
                re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: environment.get(m.group(1), ""), word)
            )
    return argv


def exec_start(name: str) -> list[str]:
    """ExecStart's words as written (specifiers and variables not expanded)."""
    values = unit(name).get("Service.ExecStart", [])
    assert len(values) == 1, f"{name}.service: one ExecStart, got {values}"
    return shlex.split(values[0])


def command_line(name: str, environment: dict[str, str] | None = None) -> list[str]:
    """ExecStart as the process gets it: specifiers, then the unit's defaults (and
    *environment* over them) expanded."""
    words = [specifiers(word, name) for word in exec_start(name)]
    return expand(words, defaults(unit(name)) | (environment or {}))


def parser(name: str) -> argparse.ArgumentParser:
    if name == "winserver":
        return winserver_cli.build_parser("serve")[0]
    if name == "wincenter":
        return wincenter_cli.build_parser("serve")
    return backup_cli.build_parser("serve")[0]


def parse(name: str, argv: list[str]) -> argparse.Namespace:
    """*argv* (ExecStart without the program) parsed by the command's own parser; a
    failure names the unit and the command line."""
    try:
        return parser(name).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{name}.service: `{name} {' '.join(argv)}` is refused by its parser (stderr above)")


def options(argv: list[str]) -> Iterator[tuple[str, str | None]]:
    """(flag, its value when the next word is not a flag) of a command line."""
    for position, word in enumerate(argv):
        if word.startswith("--"):
            flag, equals, value = word.partition("=")
            if equals:
                yield flag, value
            else:
                following = argv[position + 1] if position + 1 < len(argv) else None
                yield flag, following if following is not None and not following.startswith("-") else None


def loopback(address: str) -> bool:
    host = (
        address.rsplit(":", 1)[0] if re.fullmatch(r".*:\d+", address) and address.count(":") == 1 else address
    )
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- systemd-analyze


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian: systemd): the units cannot be verified here")
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} missing: systemd-analyze verify needs the system's own units")
    return path


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root for ``systemd-analyze --root``: the system's units (sysinit.target...), ours
    in /etc/systemd/system, and the ExecStart programs as stubs under /opt/agentless."""
    systemd_analyze()
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / PREFIX.strip("/")).mkdir(parents=True)
    for name in UNITS:
        shutil.copy(DEPLOY / f"{name}.service", root / "etc/systemd/system")
        program = root / exec_start(name)[0].lstrip("/")
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return root


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_finds_nothing(name: str, scratch_root: Path) -> None:
    """Every key known, every value parsed, the program there: verify prints nothing
    (it only warns, exit 0, about an unknown key or a value it cannot parse)."""
    done = subprocess.run(
        [
            systemd_analyze(),
            "verify",
            "--man=no",
            "--generators=no",
            f"--root={scratch_root}",
            f"{name}.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not said, f"systemd-analyze verify {name}.service:\n{said}"


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_security_exposure_is_low(name: str, scratch_root: Path) -> None:
    done = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={EXPOSURE * 10:.0f}",  # the scale of --threshold is 0-100
            f"--root={scratch_root}",
            f"{name}.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    overall = next((line for line in done.stdout.splitlines() if "Overall exposure" in line), done.stdout)
    assert done.returncode == 0, f"{name}.service over {EXPOSURE}: {overall}\n{done.stderr}"


# ---------------------------------------------------------------------- command lines


@pytest.mark.parametrize("name", UNITS)
def test_exec_start_is_the_console_script_serving(name: str) -> None:
    """The program is the project's console script of that name (pyproject's
    [project.scripts]) in the documented virtualenv, running ``serve``."""
    words = exec_start(name)
    assert words[0] == PREFIX + name
    assert f'{name} = "' in (ROOT / "pyproject.toml").read_text()
    assert words[1] == "serve"


@pytest.mark.parametrize("name", UNITS)
def test_exec_start_parses_with_the_commands_own_parser(name: str) -> None:
    """Every flag known to ``NAME serve`` and every value accepted (an unknown flag, a
    bad number, a missing value: the parser refuses the whole line)."""
    parse(name, command_line(name)[1:])


@pytest.mark.parametrize("name", UNITS)
def test_the_flags_the_environment_examples_suggest_parse(name: str) -> None:
    """Each suggested value of the example environment file, put in the command line:
    accepted by the parser."""
    suggested = example(name)
    assert suggested, f"{name}.env.example suggests nothing"
    for variable, values in suggested.items():
        for value in values:
            argv = command_line(name, {variable: value})[1:]
            try:
                _args, unknown = parser(name).parse_known_args(argv)
            except SystemExit:
                pytest.fail(f"{name}.env.example: {variable}={value}: refused by the parser (stderr above)")
            assert not unknown, f"{name}.env.example: {variable}={value}: unknown {unknown}"


def test_the_worker_flags_are_suggested() -> None:
    """The flags a worker of a fleet needs (docs/policies.md, "Several workers") are in
    the example, where an operator looks for them."""
    text = (DEPLOY / "vmbackup.env.example").read_text()
    for flag in ("--name", "--hosts", "--heartbeat", "VMBACKUP_DATABASE"):
        assert flag in text


@pytest.mark.parametrize("name", UNITS)
def test_no_secret_on_the_command_line_or_in_environment_settings(name: str) -> None:
    """A command line is every local user's to read (/proc/PID/cmdline), and so is
    ``Environment=`` (``systemctl show``): secrets come from credential files."""
    words = exec_start(name)
    for flag, value in options(words):
        assert flag not in SECRET_FLAGS, f"{name}.service: {flag} puts a secret on the command line"
        if flag in FILE_FLAGS:
            assert value is not None and value.startswith("%d/"), (
                f"{name}.service: {flag} {value}: give a file of the credentials directory (%d/NAME)"
            )
    for word in words:
        assert not URL_WITH_PASSWORD.search(word), f"{name}.service: a URL with a password: {word}"
    for key, value in defaults(unit(name)).items():
        assert not URL_WITH_PASSWORD.search(value), f"{name}.service: Environment={key}= holds a password"
        if SECRET_NAME.search(key):
            assert value.startswith("%d/"), f"{name}.service: Environment={key}= looks like a secret"
    for key, values in example(name).items():
        for value in values:
            assert not URL_WITH_PASSWORD.search(value), (
                f"{name}.env.example: {key} shows a URL with a password"
            )


@pytest.mark.parametrize("name", UNITS)
def test_credentials_loaded_are_used_and_used_ones_loaded(name: str) -> None:
    settings = unit(name)
    loaded = {}
    for value in settings.get("Service.LoadCredential", []):
        credential, _, source = value.partition(":")
        assert source.startswith(f"/etc/agentless/{name}/"), f"{name}.service: {value}: keep sources together"
        loaded[credential] = source
    text = " ".join(settings.get("Service.ExecStart", []) + settings.get("Service.Environment", []))
    used = set(re.findall(r"%d/([A-Za-z0-9_.-]+)", text))
    assert used == set(loaded), f"{name}.service: loaded {sorted(loaded)}, used {sorted(used)}"
    tmpfiles = (DEPLOY / "tmpfiles.d" / "agentless.conf").read_text()
    for source in loaded.values():  # a missing source fails the start: tmpfiles makes it empty
        assert re.search(rf"^f\s+{re.escape(source)}\s+0600\s+root\s+root\b", tmpfiles, re.MULTILINE), source


@pytest.mark.parametrize("name", UNITS)
def test_listening_addresses_default_to_loopback(name: str) -> None:
    """Each address the daemon listens on is given by a variable whose default is
    loopback and that the example environment file documents – or is left to the
    command's own default, loopback too."""
    raw = exec_start(name)
    given = {flag: value for flag, value in options(raw) if flag in BIND_FLAGS}
    documented = example(name)
    for flag, value in given.items():
        variable = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", value or "")
        assert variable, f"{name}.service: {flag} {value}: give it through a variable"
        assert variable.group(1) in documented, f"{variable.group(1)} is not in {name}.env.example"
    args = parse(name, command_line(name)[1:])
    for dest in ("bind", "listen", "nbd_listen"):
        if hasattr(args, dest):
            assert loopback(getattr(args, dest)), f"{name}.service: {dest} {getattr(args, dest)!r} by default"


@pytest.mark.parametrize("name", UNITS)
def test_hardening(name: str) -> None:
    settings = unit(name)
    wanted: dict[str, str | None] = {**HARDENING, **DEPARTURES[name]}
    wrong = {key: service(settings, key) for key, value in wanted.items() if service(settings, key) != value}
    expected = {key: wanted[key] for key in wrong}
    assert not wrong, f"{name}.service: {wrong}, wanted {expected}"
    for key, value in wanted.items():
        if value is None:
            assert re.search(rf"\b{key}=", comments(name)), f"{name}.service: say why {key}= is left out"
    assert service(settings, "User") == name and service(settings, "Group") == name
    assert service(settings, "StateDirectory") == name
    assert service(settings, "StateDirectoryMode") == "0700"
    assert settings.get("Service.SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    assert service(settings, "SystemCallErrorNumber") == "EPERM"


@pytest.mark.parametrize("name", UNITS)
def test_the_daemon_has_time_to_stop_cleanly(name: str) -> None:
    settings = unit(name)
    value = service(settings, "TimeoutStopSec") or ""
    match = re.fullmatch(r"(\d+)(min|s)?", value)
    assert match, f"{name}.service: TimeoutStopSec={value}"
    seconds = int(match.group(1)) * (60 if match.group(2) == "min" else 1)
    assert seconds >= STOP_SECONDS[name]
    assert service(settings, "RestartSec") and service(settings, "Restart") == "on-failure"


def test_wincenter_starts_after_network_and_postgresql() -> None:
    settings = unit("wincenter")
    assert "postgresql.service" in " ".join(settings["Unit.After"])
    assert "network-online.target" in " ".join(settings["Unit.After"])
    assert "network-online.target" in " ".join(settings["Unit.Wants"])


@pytest.mark.parametrize("name", UNITS)
def test_state_directory_is_the_one_the_command_uses(name: str) -> None:
    """``--dir`` (or the settings file) lies in the StateDirectory: the only place the
    daemon may write besides the cache and the paths listed."""
    argv = command_line(name)
    environment = {k: specifiers(v, name) for k, v in defaults(unit(name)).items()}
    where = dict(options(argv)).get("--dir") or environment.get("VMBACKUP_CONFIG")
    assert where and where.startswith(f"/var/lib/{name}/"), where
    if name == "vmbackup":
        assert dict(options(argv))["--cache-dir"] == "/var/cache/vmbackup"
        assert service(unit(name), "CacheDirectory") == "vmbackup"


# ---------------------------------------------------------------------- sysusers, tmpfiles


def test_sysusers_and_tmpfiles_make_users_directories_and_private_files(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers or systemd-tmpfiles not installed (Debian: systemd)")
    if os.geteuid() != 0:
        pytest.skip("not root: systemd-tmpfiles cannot give the scratch root's files their owners")
    (tmp_path / "etc").mkdir()
    for program, snippet in ((sysusers, "sysusers.d"), (tmpfiles, "tmpfiles.d")):
        args = [program, f"--root={tmp_path}"] + (["--create"] if snippet == "tmpfiles.d" else [])
        done = subprocess.run(
            [*args, str(DEPLOY / snippet / "agentless.conf")], capture_output=True, text=True, timeout=60
        )
        warnings = [line for line in done.stderr.splitlines() if not line.startswith("Creating ")]
        assert done.returncode == 0 and not warnings, f"{program}: {done.stderr}"
    users = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")[3] for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    assert "winserver" in groups["kvm"].split(",")
    for name in UNITS:
        assert name in users
        state = (tmp_path / "var/lib" / name).stat()
        assert (stat.S_IMODE(state.st_mode), state.st_uid) == (0o700, users[name])
        secrets = tmp_path / "etc/agentless" / name
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o700 and secrets.stat().st_uid == 0
        for value in unit(name).get("Service.LoadCredential", []):
            source = tmp_path / value.partition(":")[2].lstrip("/")
            assert (stat.S_IMODE(source.stat().st_mode), source.stat().st_uid) == (0o600, 0), source
    # existing content is kept, a loose mode tightened
    password = tmp_path / "etc/agentless/vmbackup/repo-password"
    password.write_text("secret\n")
    password.chmod(0o644)
    subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create", str(DEPLOY / "tmpfiles.d/agentless.conf")], check=True
    )
    assert password.read_text() == "secret\n" and stat.S_IMODE(password.stat().st_mode) == 0o600


# ---------------------------------------------------------------------- the documentation


def test_deployment_doc_names_the_real_ports_and_is_linked() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    vmbackup_listen = parse("vmbackup", ["serve"]).listen
    for port in (
        DEFAULT_API_PORT,
        DEFAULT_NBD_PORT,
        WINCENTER_PORT,
        VMBACKUP_NBD_PORT,
        vmbackup_listen.rsplit(":")[1],
    ):
        assert str(port) in doc, f"docs/deployment.md does not name port {port}"
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()
    assert "bench/fleet.py" in doc  # the sizing figures still to come


# ---------------------------------------------------------------------- MemoryDenyWriteExecute


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def mdwe() -> Callable[[], None]:
    """A preexec_fn that puts the child under ``PR_SET_MDWE`` (Linux 6.3): no mapping may
    become writable and executable, inherited across fork and exec – what systemd's
    ``MemoryDenyWriteExecute=`` enforces (with a seccomp filter on older kernels)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        pytest.skip(f"prctl(PR_GET_MDWE) unsupported (Linux < 6.3, this is {os.uname().release})")

    def restrict() -> None:
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            os._exit(97)

    return restrict


@contextlib.contextmanager
def daemon(args: list[str], env: dict[str, str], ready: str) -> Iterator[subprocess.Popen[str]]:
    """A daemon under MDWE, until the line *ready* on its stderr or stdout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=mdwe(),
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if ready in line:
                break
        else:
            pytest.fail(f"{args[0]} exited {proc.wait()} under MDWE:\n{''.join(lines)}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        rest = proc.stdout.read() if proc.stdout else ""
        assert code == 0, f"{args[0]} exited {code} under MDWE:\n{rest}"


def test_the_daemons_with_memory_deny_write_execute_serve_under_it(tmp_path: Path) -> None:
    """``wincenter serve`` (SQLite, then its API: tokens, audit, the inventory) and
    ``vmbackup serve`` (scheduler, state database, NBD server with TLS, /health)."""
    mdwe()  # skips on a kernel without it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINCENTER_", "VMBACKUP_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    center = str(tmp_path / "center")
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentless.wincenter.cli",
            "init",
            "--dir",
            center,
            "--address",
            "127.0.0.1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=mdwe(),
    )
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["token"]
    port = free_port()
    serve = ["agentless.wincenter.cli", "serve", "--dir", center, "--bind", "127.0.0.1", "--port", str(port)]
    with daemon(serve, env, "API https://"):
        ca = (Path(center) / "pki" / "ca-cert.pem").read_text()
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}/api/v1",
            verify=ssl.create_default_context(cadata=ca),
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            assert client.get("/whoami").status_code == 200
            assert client.post("/tokens", json={"role": "viewer", "name": "mdwe"}).status_code in (200, 201)
            assert client.get("/vms").status_code == 200
            assert client.get("/audit").status_code == 200

    env |= {
        "VMBACKUP_CONFIG": str(tmp_path / "vmbackup" / "config.json"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    http, nbd = free_port(), free_port()
    serve = [
        "agentless.backup.cli",
        "serve",
        "--listen",
        f"127.0.0.1:{http}",
        "--nbd-listen",
        f"127.0.0.1:{nbd}",
    ]
    with daemon(serve, env, "instant restores served"):
        deadline = time.monotonic() + 30
        while True:
            health = httpx.get(f"http://127.0.0.1:{http}/health")
            if health.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert health.status_code == 200, health.text
        assert httpx.get(f"http://127.0.0.1:{http}/metrics").status_code == 200
