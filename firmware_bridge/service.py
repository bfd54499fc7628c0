"""``osteofy bridge serve``: run the adapters the configuration enables, until told to stop.

Every adapter ends in the same place - a complete study written atomically into
``data_dir/inbox`` - so this module only wires: build the inbox, remove temp files a killed
run left there, start each enabled adapter, wait, stop them in reverse order. If an adapter's
thread dies, the whole bridge stops with exit code 4, so systemd restarts it cleanly rather
than leaving a half-working bridge that looks alive.

``python -m firmware_bridge.service --config FILE`` runs it without the ``osteofy`` CLI (the
crash tests start it so, to kill it with SIGKILL).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from firmware_bridge.adapters import Adapter, make_adapter
from firmware_bridge.errors import BridgeUnavailable
from firmware_bridge.options import BridgeOptions
from firmware_bridge.spool import Inbox
from osteofy.config import Config, load_config
from osteofy.errors import OsteofyError, UsageError

__all__ = ["Bridge", "main", "quiet_libraries", "serve"]

log = logging.getLogger("firmware_bridge.service")  # also when run with -m

HEALTH_CHECK_S = 1.0


class Bridge:
    """The running adapters of one bridge process (separate from signals: testable)."""

    def __init__(self, options: BridgeOptions) -> None:
        self.options = options
        self.inbox = Inbox(options.inbox, options.reserve_bytes)
        self.adapters: list[Adapter] = []

    def start(self) -> None:
        try:
            self.inbox.create()
            self.inbox.remove_stale_temps()
        except OSError as exc:
            raise BridgeUnavailable(f"bridge: inbox {self.inbox.directory}: {exc}") from None
        enabled: list[tuple[str, Any]] = [
            (name, opts)
            for name, opts in (
                ("dicom", self.options.dicom),
                ("hot_folder", self.options.hot_folder),
                ("serial", self.options.serial),
            )
            if opts is not None
        ]
        if not enabled:
            raise UsageError("bridge: no adapter is enabled (bridge.dicom, hot_folder, serial)")
        try:
            for name, opts in enabled:
                adapter = make_adapter(name, opts, self.inbox)
                try:
                    adapter.start()
                except OSError as exc:  # e.g. the hot folder cannot be created
                    raise BridgeUnavailable(f"bridge {name}: {exc}") from None
                self.adapters.append(adapter)
        except BaseException:
            self.stop()
            raise

    def dead(self) -> list[str]:
        return [a.name for a in self.adapters if not a.healthy()]

    def stop(self) -> None:
        while self.adapters:
            adapter = self.adapters.pop()
            try:
                adapter.stop()
            except Exception:
                log.exception("adapter %s did not stop cleanly", adapter.name)

    def adapter(self, name: str) -> Adapter:
        return next(a for a in self.adapters if a.name == name)


def serve(
    cfg: Config, stop: threading.Event | None = None, *, options: BridgeOptions | None = None
) -> int:
    """Run the bridge until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    Returns 0 after a requested stop. Raises BridgeUnavailable (exit code 4) when an adapter
    cannot start (port in use, library missing) or dies while running, UsageError (2) when
    nothing is enabled.
    """
    options = options or BridgeOptions.from_config(cfg)
    own_signals = stop is None and threading.current_thread() is threading.main_thread()
    stop = stop or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if own_signals:

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping the bridge", signum)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    bridge = Bridge(options)
    try:
        bridge.start()
        log.info(
            "bridge running: %s -> %s", ", ".join(a.name for a in bridge.adapters), options.inbox
        )
        while not stop.wait(HEALTH_CHECK_S):
            dead = bridge.dead()
            if dead:
                raise BridgeUnavailable(f"bridge adapter(s) stopped unexpectedly: {dead}")
    finally:
        bridge.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("bridge stopped")
    return 0


def quiet_libraries(verbose: bool = False) -> None:
    """For entry points: pynetdicom logs every probe or garbage connection with a traceback;
    the bridge logs what an operator needs (refusals, drops, each stored study) itself."""
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_bridge.service")
    parser.add_argument("--config", type=Path, help="configuration YAML")
    parser.add_argument("--host", help="listen address of the DICOM receiver (default: config)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_libraries(args.verbose)
    try:
        cfg = load_config(args.config)
        options = BridgeOptions.from_config(cfg)
        if args.host and options.dicom is not None:
            from dataclasses import replace

            options = replace(options, dicom=replace(options.dicom, host=args.host))
        return serve(cfg, options=options)
    except OsteofyError as exc:
        print(f"osteofy: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
