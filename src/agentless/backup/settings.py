"""vmbackup's own settings: which WinCenter to talk to, with which token and CA, and the
default repository, the policies' state database and the failed-run webhook.
``vmbackup config`` writes them to ``$VMBACKUP_CONFIG`` (default
``~/.config/vmbackup/config.json``, mode 0600: it holds a token). The token comes from
``--token-file FILE``, ``VMBACKUP_TOKEN`` or – discouraged, every local user sees a
process's arguments – ``--token``. The repository's password is never stored:
``VMBACKUP_PASSWORD``, ``--password-file`` or a prompt. What is printed of the settings
goes through :func:`agentless.redaction.redact` (the database URL's password, the
webhook's query) and never holds the token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from .errors import SettingsError

__all__ = [
    "DEFAULT_NBD_PORT",
    "Settings",
    "SettingsError",
    "given_password",
    "given_token",
    "settings_path",
    "state_url",
]

MAGIC = "agentless-vmbackup-settings"
DEFAULT_NBD_PORT = 10810  # `vmbackup serve`'s NBD server of instant restores (NBD's own 10809 is the hosts')


def settings_path() -> str:
    return os.environ.get("VMBACKUP_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "vmbackup", "config.json"
    )


@dataclasses.dataclass
class Settings:
    center: str | None = None
    token: str | None = None
    ca_pem: str | None = None
    repo: str | None = None
    database: str | None = None  # the policies' state (SQLAlchemy URL); None: SQLite beside this file
    webhook: str | None = None  # where `vmbackup serve` posts a failed run

    @classmethod
    def load(cls, path: str | None = None) -> Settings:
        path = path or settings_path()
        try:
            with open(path) as f:
                data: Any = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as error:
            raise SettingsError(f"{path}: unreadable ({error})") from None
        if not isinstance(data, dict) or data.get("magic") != MAGIC:
            raise SettingsError(f"{path}: not a vmbackup settings file")
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields and (v is None or isinstance(v, str))})

    def save(self, path: str | None = None) -> str:
        """Write atomically, 0600; the path."""
        path = path or settings_path()
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        staging = f"{path}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"magic": MAGIC, **dataclasses.asdict(self)}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
        return path

    def center_access(self) -> tuple[str, str, str]:
        """(URL, token, CA PEM) of WinCenter; SettingsError when not configured."""
        if not (self.center and self.token and self.ca_pem):
            raise SettingsError(
                "no WinCenter configured: run `vmbackup config --center URL --token-file FILE --ca FILE`"
            )
        return self.center, self.token, self.ca_pem


def state_url(settings: Settings | None = None) -> str:
    """Where the policies' state lives: ``VMBACKUP_DATABASE``, the settings' ``database``,
    else SQLite in ``vmbackup.db`` beside the settings file."""
    if os.environ.get("VMBACKUP_DATABASE"):
        return os.environ["VMBACKUP_DATABASE"]
    settings = settings or Settings.load()
    if settings.database:
        return settings.database
    return "sqlite:///" + os.path.join(os.path.dirname(settings_path()) or ".", "vmbackup.db")


def given_password(file: str | None, variable: str) -> str | None:
    """A password given to a command: the first line of *file* when one is named, else
    the environment *variable*; None when neither says one (never a prompt)."""
    if file:
        with open(file) as f:
            return f.read().rstrip("\n")
    return os.environ.get(variable) or None


def given_token(file: str | None, value: str | None) -> tuple[str | None, str]:
    """A WinCenter token given to a command, and where it came from (for the output):
    the first line of *file* (``-``: standard input) when one is named, else *value*
    (``--token``, discouraged: it shows in the process list), else ``VMBACKUP_TOKEN``;
    (None, "") when none is. SettingsError for a file without a token."""
    if file:
        try:
            if file == "-":
                text = sys.stdin.readline()
            else:
                with open(file) as f:
                    text = f.readline()
        except OSError as error:
            raise SettingsError(f"--token-file {file}: unreadable ({error.strerror or error})") from None
        if not text.strip():
            raise SettingsError(f"--token-file {file}: holds no token")
        return text.strip(), f"--token-file {file}"
    if value:
        return value, "--token"
    if os.environ.get("VMBACKUP_TOKEN"):
        return os.environ["VMBACKUP_TOKEN"], "$VMBACKUP_TOKEN"
    return None, ""
