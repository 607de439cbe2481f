"""What test actors record in ``test_support.effects``, and the gates tests open for them."""

from __future__ import annotations

import os

from dramatiq.middleware import CurrentMessage

import tasks


def record(kind: str, value: str = "") -> None:
    """Note that the current message did ``kind`` (in this process)."""
    message = CurrentMessage.get_current_message()
    with tasks.connection() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO test_support.effects (message_id, kind, value, pid) VALUES (%s, %s, %s, %s)",
            (message.message_id if message else None, kind, value, os.getpid()),
        )


def gate_open(name: str) -> bool:
    """Whether a test has opened the gate ``name`` (a row in test_support.gates)."""
    with tasks.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM test_support.gates WHERE name = %s", (name,))
        return cur.fetchone() is not None
