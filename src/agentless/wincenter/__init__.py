"""WinCenter, the cloud management platform: the HTTPS REST API that backup systems talk
to, its database, tokens and roles, the audit log and tasks with progress.

Layers, top down (dependencies point down)::

    cli.py          the `wincenter` command
    daemon.py       uvicorn over HTTPS, periodic jobs (task expiry)
    api.py          FastAPI routes   ── auth.py (the one role dependency), problems.py
                                        (RFC 9457), audit.py (middleware + log)
    center.py       the state directory: identity, PKI, secret key, database, stores
    tokens.py  tasks.py  audit.py  secretbox.py        the domain stores
    database.py     SQLAlchemy 2 engine + Alembic migrations (migrations/)
    models.py       the tables

Published for other parties: :mod:`.schemas` (the wire) and :mod:`.client` (the typed
client). Nothing else here is an interface. See ``docs/wincenter.md``.
"""
