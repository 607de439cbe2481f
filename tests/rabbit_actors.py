"""Actors for the RabbitMQ tests: ``BROKER_URL=amqp://... dramatiq tasks tests.rabbit_actors``.

Their queue is named by ``CONTROLPLANE_TEST_QUEUE`` (a fresh name per test run,
so that runs sharing one RabbitMQ server never see each other's messages).
Like ``tests.actors``, each records what it did in ``test_support.effects``.
"""

from __future__ import annotations

import os
import time

import dramatiq

from tests.effects import gate_open, record

QUEUE = os.environ.get("CONTROLPLANE_TEST_QUEUE", "controlplane_test")


@dramatiq.actor(actor_name="tests.rabbit.wait_for_gate", queue_name=QUEUE, max_attempts=3)
def wait_for_gate(name: str) -> str:
    """Runs until a test opens the gate, then returns its name."""
    record("started", name)
    while not gate_open(name):
        time.sleep(0.05)
    return name


@dramatiq.actor(
    actor_name="tests.rabbit.fails_until_gate", queue_name=QUEUE, max_attempts=50, min_backoff=300, max_backoff=600
)
def fails_until_gate(name: str) -> str:
    """Fails (and is retried) until a test opens the gate."""
    record("attempt", name)
    if not gate_open(name):
        raise ConnectionError(f"gate {name} is closed")
    return "through"


@dramatiq.actor(
    actor_name="tests.rabbit.always_fails", queue_name=QUEUE, max_attempts=2, min_backoff=100, max_backoff=200
)
def always_fails(reason: str) -> None:
    record("attempt", reason)
    raise RuntimeError(f"failed on purpose: {reason}")
