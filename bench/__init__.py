"""Benchmark harness: this project's broker beside a hand-written floor and the peers.

Run ``.venv/bin/python -m bench run`` (see ``docs/performance.md``). The
package itself imports nothing beyond the standard library, so that the peer
virtualenvs (``bench/.venvs/<name>``) can import :mod:`bench.record` and their
own driver module without this project's dependencies.
"""
