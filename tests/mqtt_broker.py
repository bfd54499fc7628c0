"""A private Mosquitto for tests (``osteofy.mosquitto``), and a bounded wait."""

from __future__ import annotations

import time

from osteofy.mosquitto import MOSQUITTO, free_port
from osteofy.mosquitto import Mosquitto as Broker

__all__ = ["MOSQUITTO", "Broker", "free_port", "wait_for"]


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
