"""Actors of the README's demo: work that succeeds, and work that fails twice first."""

from __future__ import annotations

import time

import dramatiq
from dramatiq.middleware import CurrentMessage

import tasks  # noqa: F401  (configures the broker before any actor is declared)


@dramatiq.actor(actor_name="demo.resize_image", queue_name="demo", max_attempts=3, store_results=True)
def resize_image(image_id: int, width: int) -> dict[str, int]:
    """Pretend to resize an image; long enough to be seen running."""
    time.sleep(0.6)
    return {"image_id": image_id, "width": width}


@dramatiq.actor(
    actor_name="demo.charge_card",
    queue_name="demo",
    max_attempts=4,
    min_backoff=1000,
    max_backoff=4000,
)
def charge_card(order_id: int) -> dict[str, object]:
    """Fails on its first two attempts (a flaky payment gateway), then succeeds."""
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message is not None else 0
    if retries < 2:
        raise ConnectionError(f"payment gateway timed out (attempt {retries + 1})")
    return {"order_id": order_id, "charged": True}
