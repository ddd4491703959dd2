"""Alembic's environment: migrate over the engine that :class:`Database` hands over in
``config.attributes["engine"]`` (or the ``sqlalchemy.url`` option, for the ``alembic``
command line). SQLite gets batch mode, so later ALTERs work there too."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine

from agentless.wincenter.models import Base

config = context.config


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if isinstance(engine, Engine):
        return engine
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no engine handed over and no sqlalchemy.url configured")
    return create_engine(url)


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise RuntimeError("WinCenter migrations run online only (Database.open)")
run_migrations_online()
