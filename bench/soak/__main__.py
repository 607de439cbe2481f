"""``python -m bench.soak``: the chaos soak (see :mod:`bench.soak.runner`)."""

from __future__ import annotations

import os

# The producers are 4 threads sending through the soak process's broker: give its pool room
# (read when ``tasks`` is imported, so before the runner is).
os.environ.setdefault("CONTROLPLANE_POOL_SIZE", "8")
# The soak tests the Postgres broker on its own private server, whatever this shell points at.
os.environ.pop("BROKER_URL", None)

from bench.soak.runner import main

raise SystemExit(main())
