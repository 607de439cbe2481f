"""The chaos soak (issue 6): ``.venv/bin/python -m bench.soak [--quick]``; see ``docs/reliability.md``.

Modules: :mod:`bench.soak.runner` (the command and the run), :mod:`bench.soak.actors` (what
the workers run), :mod:`bench.soak.producers`, :mod:`bench.soak.chaos`,
:mod:`bench.soak.proxy`, :mod:`bench.soak.server`, :mod:`bench.soak.workers` and
:mod:`bench.soak.checks` (the verdict).
"""
