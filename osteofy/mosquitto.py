"""A private Mosquitto on a free loopback port, for ``osteofy demo``, benchmarks and tests.

One place knows how to find the binary, write a configuration, wait until the broker listens
and stop it (SIGTERM first, so a persistent broker writes its sessions and queues to disk).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, timeout: float = 10.0, alive: subprocess.Popen | None = None) -> bool:
    """Whether 127.0.0.1:``port`` accepts a connection within ``timeout`` (bounded polling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            if alive is not None and alive.poll() is not None:
                return False
            time.sleep(0.05)
    return False


class Mosquitto:
    """Mosquitto on a free loopback port.

    ``persistence`` keeps sessions across a restart; ``max_queued`` is raised from Mosquitto's
    default of 1000, past which a broker silently drops QoS 1 messages queued for a subscriber
    that is behind or offline; ``extra`` adds configuration lines (TLS, ACL).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        persistence: bool = False,
        max_queued: int = 1_000_000,
        extra: Sequence[str] = (),
    ) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed (apt install mosquitto)")
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / f"mosquitto-{self.port}.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"max_queued_messages {max_queued}",
            f"persistence {'true' if persistence else 'false'}",
            *extra,
        ]
        if persistence:
            lines.append(f"persistence_location {self.workdir}/")
        if os.geteuid() == 0:
            # As root Mosquitto drops to its own user, which cannot read 0700 temp folders.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        with (self.workdir / f"mosquitto-{self.port}.log").open("ab") as logf:
            self.proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.conf)], stdout=logf, stderr=logf
            )
        if not listening(self.port, timeout, self.proc):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        """SIGTERM: a persistent broker writes its sessions and queues to disk first."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
