"""``osteofy edge serve``: the inbox daemon — every study processed exactly once, crash or not.

Folders under ``data_dir`` (one file system, so every move is an atomic rename):

    inbox/       complete studies, written atomically by the bridge (temp name, then rename)
    work/        studies claimed by this process (``rename`` from inbox: atomic, so a study is
                 never claimed twice and a claim survives a crash)
    done/        studies whose result is committed (kept: nothing is deleted)
    quarantine/  rejected files with ``<name>.reason.json``
    overlays/    explanation images named by result id

Per study: claim -> sha256 of the file -> if the store already has that input (a crash after
the commit), just move it to ``done/``; else screen -> write overlays (atomic) -> commit the
result row (one transaction) -> move to ``done/``. A crash at any point leaves the study in
``inbox/`` or ``work/``, and a restart resumes from ``work/`` first: no lost study, no second
result. SIGTERM/SIGINT finish the current study and stop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edge import sdnotify
from edge.facts import merge_facts, sidecar_path
from edge.messages import Feedback, ModelStatus
from edge.outbox import Outbox
from edge.overlay import encode_jpeg, encode_png
from edge.publisher import Publisher
from edge.quarantine import quarantine
from edge.result import CLASSES, utc_now
from edge.runtime import Outcome, Screener
from edge.store import ResultStore
from osteofy.config import Config
from osteofy.errors import InputRejected, Unavailable
from osteofy.fsutil import atomic_write_bytes, fsync_dir, sha256_file

log = logging.getLogger(__name__)

SKIP_SUFFIXES = (".json", ".tmp", ".partial")
POLL_S = 0.2
RETRY_S = 5.0


def _move(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    os.replace(src, dst)
    return dst


class Folders:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.inbox = self.root / "inbox"
        self.work = self.root / "work"
        self.done = self.root / "done"
        self.quarantine = self.root / "quarantine"
        self.overlays = self.root / "overlays"

    def create(self) -> None:
        for d in (self.inbox, self.work, self.done, self.quarantine, self.overlays):
            d.mkdir(parents=True, exist_ok=True)


def _remove_stale_temp(folder: Path) -> None:
    """Delete our own half-written files (``.NAME.XXXX.tmp``) left by a killed process.

    Only temporary files of ``atomic_write`` are removed: they were never renamed into place,
    so nothing refers to them. Studies are never deleted.
    """
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            try:
                p.unlink()
            except OSError as exc:
                log.warning("cannot remove a stale temporary file %s: %s", p.name, exc)


def _regular_study(path: Path) -> bool:
    """A study file: not hidden or temporary, and a regular file (a FIFO or a device node
    dropped into the inbox would block the hash read forever; such entries are left alone)."""
    if not is_study(path.name):
        return False
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def is_study(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(SKIP_SUFFIXES)


class EdgeService:
    """The daemon's work, separate from signals and the command line (testable)."""

    def __init__(
        self,
        cfg: Config,
        screener: Screener | None = None,
        on_result: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.folders = Folders(cfg.data_dir)
        self.folders.create()
        _remove_stale_temp(self.folders.overlays)
        self._owns_screener = screener is None  # a screener passed in is its owner's to close
        self.screener = screener or Screener(cfg)
        self.store = ResultStore(self.folders.root / "results.sqlite")
        m = cfg.mqtt
        self.outbox = Outbox(
            self.store, cfg.site_id, cfg.device_id, m.outbox_limit, m.outbox_alarm_fraction
        )
        self.on_result = on_result
        self.stopping = threading.Event()
        self.processed = 0

    # --- claiming ----------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Studies to do: first those already claimed (a previous run's), then the inbox's."""
        claimed = sorted(p for p in self.folders.work.iterdir() if _regular_study(p))
        waiting = sorted(p for p in self.folders.inbox.iterdir() if _regular_study(p))
        return claimed + waiting

    def claim(self, path: Path) -> Path | None:
        if path.parent == self.folders.work:
            return path
        side = sidecar_path(path)
        try:
            if side.exists():
                _move(side, self.folders.work)
            claimed = _move(path, self.folders.work)
        except FileNotFoundError:
            return None  # another process took it
        fsync_dir(self.folders.work)
        fsync_dir(self.folders.inbox)
        return claimed

    # --- one study ---------------------------------------------------------------------------

    def process(self, path: Path) -> str:
        """Handle one claimed study; returns 'result', 'rejected' or 'duplicate'."""
        digest = sha256_file(path)
        if self.store.seen(digest):
            self._finish(path)
            return "duplicate"
        try:
            outcome = self.screener.screen(path)
        except InputRejected as exc:
            return self._reject(path, digest, getattr(exc, "rule", "input"), str(exc))
        except OSError:
            raise  # the machine's trouble (disk, memory), not the study's: retried later
        except Exception:
            log.exception("internal error while screening a study; it is quarantined")
            return self._reject(path, digest, "internal_error", "internal error while screening")
        return self._store(path, digest, outcome)

    def _reject(self, path: Path, digest: str, rule: str, reason: str) -> str:
        dest = quarantine(path, reason, self.folders.quarantine, rule=rule)
        side = sidecar_path(path)
        if side.exists():
            quarantine(side, "sidecar of a rejected study", self.folders.quarantine, rule=rule)
        self.store.add_rejection(digest, utc_now(), rule, reason, dest.name)
        log.info("rejected (%s): %s", rule, reason)
        return "rejected"

    def _store(self, path: Path, digest: str, outcome: Outcome) -> str:
        self._persist(outcome, digest, source=path.name)
        self._finish(path)
        if self.on_result is not None:
            self.on_result(outcome)
        return "result"

    def _persist(
        self,
        outcome: Outcome,
        key: str,
        source: str,
        supersedes: str | None = None,
        given_facts: dict | None = None,
    ) -> None:
        """Overlay files first (atomic), then the result and its outbox rows in one commit."""
        result = outcome.result
        rid = result.result_id
        t0 = time.perf_counter()
        o = self.folders.overlays
        local = o / f"{rid}.jpg"
        atomic_write_bytes(local, encode_jpeg(outcome.overlay(include_image=True)))
        public = o / f"{rid}.png"
        atomic_write_bytes(
            public, encode_png(outcome.overlay(include_image=outcome.publishable_pixels))
        )
        # For the local screen: the radiograph and each class's heat map, blended in the browser.
        atomic_write_bytes(o / f"{rid}.base.jpg", encode_jpeg(outcome.display8))
        for cls in CLASSES:
            heat = (outcome.heat(cls) * 255.0 + 0.5).astype(np.uint8)
            atomic_write_bytes(o / f"{rid}.heat-{cls}.png", encode_png(heat))
        result.timings_ms["render"] = round((time.perf_counter() - t0) * 1000.0, 2)
        with self.store.transaction() as db:
            payload = result.payload()
            self.store.add_result(
                db,
                key,
                payload,
                local.name,
                public.name,
                source=source,
                supersedes=supersedes,
                given_facts=given_facts,
            )
            if not self.outbox.enqueue_result(db, payload, public.name):
                log.error(
                    "outbox full (%d messages): result kept locally, queued when space frees",
                    self.outbox.limit,
                )
        p = result.prediction
        log.info(
            "result %s: %s %s P(osteoporosis)=%.2f in %.0f ms",
            rid,
            result.body_part,
            p.class_,
            p.probs.osteoporosis,
            result.timings_ms["total"],
        )

    # --- the technician's actions ------------------------------------------------------------

    def rescreen(self, result_id: str, facts: Mapping[str, object]) -> Outcome:
        """Screen a done study again with completed clinical facts; the new result supersedes.

        Raises KeyError for an unknown result, InputRejected for bad facts.
        """
        found = self.store.source_of(result_id)
        if found is None:
            raise KeyError(result_id)
        digest, source = found
        merge_facts({}, None, facts)  # refuse unknown names or bad values before any work
        facts = {**self.store.given_facts(result_id), **facts}  # earlier answers still count
        outcome = self.screener.screen(self.folders.done / source, clinical=facts)
        facts_key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
        self._persist(
            outcome,
            f"{digest.split(':')[0]}:{facts_key}:{outcome.result.result_id}",
            source,
            supersedes=result_id,
            given_facts=facts,
        )
        return outcome

    def feedback(self, result_id: str, agree: bool | None, dxa_tscore: float | None = None) -> dict:
        """Store a clinician's feedback and queue it for the ``feedback`` topic, in one commit."""
        if self.store.result(result_id) is None:
            raise KeyError(result_id)
        fb = Feedback(
            feedback_id=str(uuid.uuid4()),
            result_id=result_id,
            device_id=self.cfg.device_id,
            site_id=self.cfg.site_id,
            at=utc_now(),
            agree=agree,
            dxa_tscore=dxa_tscore,
        )
        payload = fb.model_dump(mode="json", by_alias=True)
        with self.store.transaction() as db:
            self.store.add_feedback(db, payload)
            self.outbox.enqueue_feedback(db, payload)
        return payload

    def _finish(self, path: Path) -> None:
        side = sidecar_path(path)
        if side.exists():
            _move(side, self.folders.done)
        _move(path, self.folders.done)
        fsync_dir(self.folders.done)
        fsync_dir(self.folders.work)

    # --- loop --------------------------------------------------------------------------------

    def run_once(self, alive: Callable[[], object] = lambda: None) -> int:
        """Process everything pending now; returns how many studies were handled.

        ``alive`` is called after each study: a backlog of hundreds of studies is progress too,
        and must keep the systemd watchdog fed (see :meth:`serve`).
        """
        n = 0
        for path in self.pending():
            if self.stopping.is_set():
                break
            claimed = self.claim(path)
            if claimed is None:
                continue
            try:
                self.process(claimed)
            except (OSError, sqlite3.OperationalError) as exc:
                log.error("cannot finish a study now (%s); it stays in work/ and is retried", exc)
                self.stopping.wait(RETRY_S)
                break
            n += 1
            self.processed += 1
            alive()
        return n

    def serve(self, once: bool = False, alive: Callable[[], object] = lambda: None) -> None:
        """Loop until stopped; ``alive`` is called on every turn and after every study.

        ``alive`` is the systemd watchdog ping (``run_service``). It is called from this loop
        and nowhere else - not from a timer thread - so that a loop stuck inside one study (a
        read that never returns, a wedged inference call) stops the pings and systemd kills
        and restarts the service after ``WatchdogSec=``.
        """
        log.info("watching %s", self.folders.inbox)
        while not self.stopping.is_set():
            alive()
            n = self.run_once(alive)
            if once:
                return
            if n == 0:
                self.stopping.wait(POLL_S)
        log.info("stopped after %d studies", self.processed)

    def last_result_at(self) -> str | None:
        with self.store._lock:
            row = self.store.db.execute(
                "SELECT created_at FROM results ORDER BY rowid DESC LIMIT 1"
            ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.store.close()
        if self._owns_screener:
            self.screener.close()


def start_publisher(service: EdgeService) -> Publisher | None:
    """The MQTT side, unless the configuration says offline (``mqtt.url`` empty)."""
    cfg = service.cfg
    if not cfg.mqtt.url:
        log.info("MQTT offline (mqtt.url is empty): results stay queued in the outbox")
        return None
    models = [
        ModelStatus(
            site=site,
            name=m.pkg.name,
            version=str(m.pkg.card.get("version", "0")),
            backend=m.choice.backend.name,
            precision=m.choice.backend.precision,
        )
        for site, m in sorted(service.screener.models.items())
    ]
    problems = [f"{site}: {why}" for site, why in sorted(service.screener.problems.items())]
    pub = Publisher(
        cfg,
        service.outbox,
        service.folders.overlays,
        models=models,
        problems=problems,
        last_result_at=service.last_result_at,
    )
    pub.start()
    return pub


def run_service(cfg: Config, once: bool = False) -> int:
    from edge.screen_web import attach

    service = EdgeService(cfg)
    publisher = start_publisher(service)
    if publisher is not None:  # publish a new result now, not at the publisher's next poll
        service.on_result = lambda _outcome: publisher.wake.set()
    stop_screen: Callable[[], None] = lambda: None  # noqa: E731
    if not once:
        try:
            stop_screen = attach(service, publisher, cfg)
        except Unavailable as exc:  # screening matters more than the screen
            log.error("local screen not available: %s; screening continues", exc)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current study, then stopping", signum)
        service.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # READY only now: the models are loaded, the publisher and the screen are up, so systemd
    # (Type=notify) reports the unit started only when this device can actually screen.
    sites = ", ".join(sorted(service.screener.sites))
    sdnotify.ready(f"screening {sites}; watching {service.folders.inbox}")
    watchdog = sdnotify.Watchdog()
    try:
        service.serve(once=once, alive=watchdog.ping)
    finally:
        sdnotify.stopping(f"stopping after {service.processed} studies")
        stop_screen()
        if publisher is not None:
            publisher.stop()
        service.close()
    return 0
