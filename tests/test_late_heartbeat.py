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


@pytest.mark.parametrize(
    ("meanwhile", "said"),
    [
        # its own settler wrote the claim's ack (its row deleted) after the consumer listed its
        # claims for its heartbeat, before it forgot the claim: nothing took it
        ("settled", "kept its 1 claim(s)"),
        # its lease ran out, and another worker's reaper put it back
        ("reaped", "its 1 claim(s) may have been put back"),
    ],
)
def test_a_late_heartbeat_says_its_claims_were_kept_unless_the_reaper_took_one(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, meanwhile: str, said: str
) -> None:
    # Given a claim of a worker whose keeper ran
    sent = actors.noop.send(1)
    consumer, _ = claim_in_process()
    monkeypatch.setattr(tasks.broker, "lease_kept", lambda: True)
    if meanwhile == "settled":
        query(db_url, "DELETE FROM control_plane.messages WHERE id = %s", (sent.message_id,))
    else:
        query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 s'")
        reap_from_another_worker()
    # When its late heartbeat runs, then it says what happened to the claim
    line = _late_heartbeat(consumer, caplog)
    assert said in line, line
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
