"""One driver per system, all with the same command line (see :mod:`bench.drivers.common`).

A driver runs under its system's own interpreter (the project's ``.venv`` for
``floor``, ``floor_batch`` and ``ours``; ``bench/.venvs/<name>`` for a peer)
and imports only the standard library, :mod:`bench.record` and its system.
"""
