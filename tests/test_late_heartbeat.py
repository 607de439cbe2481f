"""A late heartbeat's warning (``_say_if_late``): kept, or maybe run twice."""

from __future__ import annotations

import logging
import time

import pytest

import tasks
from tests import actors
from tests.support import claim_in_process, query, reap_from_another_worker


def _late_heartbeat(consumer: object, caplog: pytest.LogCaptureFixture) -> str:
    consumer._last_heartbeat = time.monotonic() - 100  # type: ignore[attr-defined]
    consumer._next_heartbeat = 0  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.broker"):
        consumer._housekeeping()  # type: ignore[attr-defined]
    return next(r.getMessage() for r in caplog.records if "last heartbeat was" in r.getMessage())


def test_a_claim_settled_while_the_late_heartbeat_ran_is_not_said_to_be_lost(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a claim of a worker whose keeper ran, and whose settler wrote the claim's ack (its row
    # deleted) after the consumer listed its claims for its heartbeat, before it forgot the claim
    sent = actors.noop.send(1)
    consumer, _ = claim_in_process()
    monkeypatch.setattr(tasks.broker, "lease_kept", lambda: True)
    query(db_url, "DELETE FROM control_plane.messages WHERE id = %s", (sent.message_id,))
    # When its late heartbeat runs
    line = _late_heartbeat(consumer, caplog)
    # Then it does not say the claim may have run twice (nothing took it)
    assert "kept its 1 claim(s)" in line, line
    consumer.close()


def test_a_claim_the_reaper_took_is_said_to_be_lost(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a claim whose lease ran out, and that another worker's reaper put back
    actors.noop.send(1)
    consumer, _ = claim_in_process()
    monkeypatch.setattr(tasks.broker, "lease_kept", lambda: True)
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 s'")
    reap_from_another_worker()
    # When its late heartbeat runs, then it says the claim may have been put back
    line = _late_heartbeat(consumer, caplog)
    assert "its 1 claim(s) may have been put back" in line, line
    consumer.close()


def test_the_lease_keepers_lines_go_through_the_worker_processs_logging(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # (Dramatiq's worker process points sys.stderr, not fd 2, at its log pipe: a keeper writing to
    # fd 2 missed `dramatiq --log-file` and the log's format)
    import dataclasses

    from tests.support import wait_for

    settings = dataclasses.replace(tasks.broker.settings, lease_seconds=3, heartbeat_interval=0.5,
                                   lease_keeper_seconds=1)  # fmt: skip
    monkeypatch.setattr(tasks.broker, "settings", settings)
    tasks.broker._keeper_wanted = True
    with caplog.at_level(logging.WARNING, logger="controlplane.lease_keeper"):
        tasks.broker._beat()  # (a heartbeat: the keeper starts; then none comes)
        try:
            wait_for(lambda: "its leases are no longer kept" in caplog.text, 30, "the keeper's line")
        finally:
            tasks.broker._stop_lease_keeper()
