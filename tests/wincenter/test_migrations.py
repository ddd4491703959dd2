"""The Alembic migrations: they make exactly the schema the models describe (on both
engines), go down and up again, and ship inside the package."""

from __future__ import annotations

import os

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

import agentless
from agentless.wincenter.database import MIGRATIONS, Database, alembic_config
from agentless.wincenter.models import Base

TABLES = {
    "tokens",
    "audit",
    "tasks",
    "hosts",
    "pools",
    "vms",
    "vm_disks",
    "vm_nics",
    "backups",
    "restores",
    "alembic_version",
}


def _diff(db: Database) -> list[object]:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_models_and_migrations_agree(database: Database) -> None:
    """Autogenerate against a database at head finds nothing to do: a model change
    without its migration (or the reverse) fails here."""
    assert set(inspect(database.engine).get_table_names()) == TABLES
    assert _diff(database) == []


def test_downgrade_to_base_and_up_again(database: Database) -> None:
    config = alembic_config(database.engine)
    command.downgrade(config, "base")
    assert database.revision() is None
    assert set(inspect(database.engine).get_table_names()) <= {"alembic_version"}
    database.upgrade()
    assert database.revision() == Database.head()
    assert _diff(database) == []


def test_one_head_and_scripts_in_the_package() -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    assert len(scripts.get_heads()) == 1
    assert os.path.isfile(os.path.join(MIGRATIONS, "env.py"))
    assert os.path.isfile(os.path.join(MIGRATIONS, "script.py.mako"))
    assert MIGRATIONS.startswith(os.path.dirname(os.path.abspath(agentless.__file__)))
