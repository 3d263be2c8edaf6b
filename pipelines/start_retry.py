"""Retrying a background thread's start against a broker that is not ready yet.

A broker that has just created a topic can answer "not leader for partition" or time out a
metadata request for a moment (seen in CI). A service thread that died of that would run on
without ever working: the watcher would never alert, the portal never show a balance. Its
start is retried instead, with a doubling wait capped at `backoff_max_s`, until `stop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaException

log = logging.getLogger(__name__)
Started = TypeVar("Started")


def retry_start(stop: threading.Event, start: Callable[[], Started], what: str, *,
                on_error: Callable[[str], None] = lambda _msg: None,
                backoff_max_s: float = 5.0, give_up_after_s: float | None = None) -> Started | None:
    """`start()`'s result, or None if `stop` was set first. Each failure is logged and passed
    to `on_error` (so a readiness check can name it). With `give_up_after_s`, the failure that
    would wait past it is raised (a caller inside a rebalance callback must not wait forever)."""
    delay_s = min(0.25, backoff_max_s)
    deadline = None if give_up_after_s is None else time.monotonic() + give_up_after_s
    while not stop.is_set():
        try:
            return start()
        except KafkaException as exc:
            if deadline is not None and time.monotonic() + delay_s > deadline:
                raise
            on_error(str(exc))
            log.error("%s: start failed: %s; retrying in %.2f s", what, exc, delay_s)
            stop.wait(delay_s)
            delay_s = min(2 * delay_s, backoff_max_s)
    return None
