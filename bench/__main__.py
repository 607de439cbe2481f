"""``python -m bench``: the benchmark command line (see :mod:`bench.harness`)."""

from __future__ import annotations

from bench.harness import main

raise SystemExit(main())
