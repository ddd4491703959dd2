"""Alembic migrations of WinCenter's database (run by :meth:`..database.Database.open`).

A new revision: change :mod:`..models`, then, from the top of the tree, write
``versions/NNNN_<what>.py`` by hand or with ``alembic revision --autogenerate`` against a
database at head (``-x`` is not needed: ``env.py`` reads ``sqlalchemy.url`` from the
Alembic config when no engine is handed over). ``tests/wincenter/test_migrations.py``
fails while models and migrations disagree.
"""
