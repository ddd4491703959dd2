"""The fault campaign: the real system under counted faults, with figures for
``docs/reliability.md``. Run ``make campaign`` (all rows, full counts) or
``.venv/bin/python -m bench.campaign --help``; :mod:`.harness` says how rows work,
:mod:`.rows` lists them."""
