"""systemd's readiness and watchdog protocol (``sd_notify``), in the standard library only.

Why here and not ``python-systemd``: the device runtime must not need a C extension (or
libsystemd headers on a Jetson) to tell systemd two things — "the models are loaded, I can
screen" (``READY=1``, so units ordered after ``osteofy-edge.service`` wait for a working
runtime rather than a started process) and "my main loop still turns" (``WATCHDOG=1``, so a
loop stuck on a dead NFS read or a wedged GPU call is killed and restarted by
``WatchdogSec=``). The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).

Every function is a no-op returning False when ``$NOTIFY_SOCKET`` is unset (a laptop, a test,
``osteofy edge serve`` run by hand) and never raises: a lost notification must not stop
screening — systemd notices a missing READY or WATCHDOG on its own, which is the point.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = [
    "Watchdog",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)


def _socket_address(environ: Mapping[str, str]) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address; ``@name`` is the abstract ``\\0name``."""
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock (systemd >= 253) and other forms are not used by a service manager here


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=…"``) as one datagram; True when sent."""
    env = os.environ if environ is None else environ
    address = _socket_address(env)
    if address is None or not fields:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE field: systemd would read our text as commands.
    return " ".join(text.split())


def ready(status_text: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (with an optional ``STATUS=``): start-up is complete, dependants may go."""
    fields = ["READY=1"]
    if status_text:
        fields.append(f"STATUS={_one_line(status_text)}")
    return notify(*fields, environ=environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """``WATCHDOG=1``: the keep-alive ping that resets ``WatchdogSec=``."""
    return notify("WATCHDOG=1", environ=environ)


def stopping(status_text: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: shutting down on request, so a slow stop is not mistaken for a hang."""
    fields = ["STOPPING=1"]
    if status_text:
        fields.append(f"STATUS={_one_line(status_text)}")
    return notify(*fields, environ=environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """``STATUS=…``: the one line ``systemctl status`` shows under the unit."""
    return notify(f"STATUS={_one_line(text)}", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd wants a ping, or None when it wants none.

    As ``sd_watchdog_enabled(3)``: ``$WATCHDOG_USEC`` gives the interval; when
    ``$WATCHDOG_PID`` is set and is another process (a child that inherited the environment),
    the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1e6


class Watchdog:
    """Pings from the caller's loop, at most every quarter of the interval.

    ``ping()`` is meant to be called on every turn of the main loop and after every unit of
    work, so pings stop exactly when the loop stops making progress; the rate limit keeps a
    busy loop from sending systemd hundreds of datagrams a second. Systemd's advice is to ping
    at half the interval at the latest; a quarter leaves room for a slow turn.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self.interval = watchdog_interval(environ)
        self.min_gap = self.interval / 4 if self.interval else 0.0
        self._last = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self) -> bool:
        """Send ``WATCHDOG=1`` unless one was sent less than ``min_gap`` ago; True when sent."""
        if self.interval is None:
            return False
        now = time.monotonic()
        if now - self._last < self.min_gap:
            return False
        self._last = now
        return watchdog(self._environ)
