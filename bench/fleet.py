"""Fleet load on the dashboard: many devices publish results through Mosquitto into SQLite.

    python -m bench.fleet [--devices 200 --results 50] [--json] [--docs docs/dashboard.md]

What it measures, each on a fresh private Mosquitto (free 127.0.0.1 port) and a fresh
SQLite file, with the dashboard service in this process and the devices in a child process
(so they do not share its interpreter lock):

* **ingest rate, backlog**: the dashboard's session exists, it is stopped, the whole fleet
  publishes (every message acknowledged by the broker and queued for the dashboard), then the
  dashboard starts and drains the queue into SQLite: results stored / seconds from start to
  the last one. This is the dashboard's own capacity (the devices are not running).
* **ingest rate, live**: the dashboard runs while every device publishes as fast as the
  broker acknowledges (results/s from the first publish to the last stored; the devices,
  the broker and the dashboard share this machine's cores).
* both **with one commit per message** (``max_batch=1``, the behaviour before batching) and
  **batched** (the default), in the same run, on the same fleet: the ratio is the gain;
* **end-to-end latency**: the device side (``edge.outbox.Outbox`` drained by
  ``edge.publisher.Publisher``) to ``/api/results``, one result at a time.

Every count is checked exactly: each result stored once, none missing. Devices are
``paho-mqtt`` clients with the device's client id and topics; their payloads are valid
``osteofy.result.v1`` objects (no overlay PNGs: those are bytes to the dashboard, not rows
to index). ``--docs`` rewrites the figures section of ``docs/dashboard.md`` (between the
``fleet-figures`` markers) and leaves the rest of the page alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from osteofy.mosquitto import MOSQUITTO, Mosquitto, free_port  # noqa: F401 - re-used by tests

log = logging.getLogger(__name__)

SITES_PER_DEVICE = 5  # devices per clinic in the simulated fleet
MARK_START = "<!-- fleet-figures:start -->"
MARK_END = "<!-- fleet-figures:end -->"

# --- the fleet ----------------------------------------------------------------------------------


def _template() -> dict:
    """One valid result (validated once); copies differ in ids, times and prediction."""
    from edge.result import Result

    return Result.model_validate(
        {
            "result_id": str(uuid.UUID(int=0, version=4)),
            "device_id": "edge-0000",
            "site_id": "clinic-000",
            "created_at": "2026-01-01T00:00:00.000Z",
            "patient_key": "0" * 64,
            "study_key": "0" * 64,
            "age_years": 70.0,
            "sex": "F",
            "body_part": "hand",
            "model": {
                "name": "hand-v1",
                "version": "1.0.0",
                "sha256": "ab" * 32,
                "backend": "onnxruntime",
                "precision": "int8",
            },
            "prediction": {
                "class": "normal",
                "probs": {"normal": 0.6, "osteopenia": 0.3, "osteoporosis": 0.1},
                "tscore": -0.5,
                "refer": False,
            },
            "explanation": {
                "heatmap_class": "normal",
                "peaks": [{"x": 0.41, "y": 0.62, "weight": 1.0}],
                "clinical": [
                    {"factor": "age_years", "known": True, "log_odds": 0.42},
                    {"factor": "prior_fracture", "known": True, "log_odds": 0.18},
                    {"factor": "bmi", "known": False, "log_odds": -0.05},
                ],
            },
            "quality": {
                "ood_score": 1.1,
                "ood_threshold": 3.0,
                "flags": [],
                "missing_facts": ["bmi"],
            },
            "timings_ms": {"decode": 30.1, "inference": 41.2, "total": 120.4},
        }
    ).payload()


_TEMPLATE: dict | None = None


def result_payload(
    site_id: str, device_id: str, rng: random.Random, created_at: str | None = None
) -> dict:
    """A valid ``osteofy.result.v1`` for a simulated device (pseudonymous keys are random)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _template()
    t = json.loads(json.dumps(_TEMPLATE))
    tscore = round(rng.gauss(-1.6, 1.1), 2)
    p_op = round(min(0.98, max(0.01, 1 / (1 + 2.718 ** (3.0 * (tscore + 2.5))))), 4)
    p_norm = round((1 - p_op) * (0.7 if tscore > -1 else 0.3), 4)
    probs = {"normal": p_norm, "osteopenia": round(1 - p_op - p_norm, 4), "osteoporosis": p_op}
    cls = max(probs, key=lambda k: probs[k])
    t.update(
        result_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        site_id=site_id,
        device_id=device_id,
        created_at=created_at
        or datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        patient_key=f"{rng.getrandbits(256):064x}",
        study_key=f"{rng.getrandbits(256):064x}",
        age_years=float(rng.randint(50, 90)),
        sex=rng.choice(["F", "F", "M"]),
        body_part=rng.choice(["hand", "hip"]),
    )
    t["prediction"] = {"class": cls, "probs": probs, "tscore": tscore, "refer": p_op >= 0.35}
    t["model"]["name"] = f"{t['body_part']}-v1"
    t["explanation"]["heatmap_class"] = cls
    return t


def fleet_ids(devices: int) -> list[tuple[str, str]]:
    """(site_id, device_id) of every simulated device: clinics of five devices."""
    return [(f"clinic-{d // SITES_PER_DEVICE:03d}", f"edge-{d:04d}") for d in range(devices)]


def _fleet(port: int, devices: int, per_device: int, seed: int, out: Connection) -> None:
    """Child process: connect every device, publish everything (QoS 1), wait for PUBACKs."""
    import paho.mqtt.client as mqtt

    from edge.messages import topic

    rng = random.Random(seed)
    fleet = fleet_ids(devices)
    payloads = [[result_payload(site, dev, rng) for _ in range(per_device)] for site, dev in fleet]
    clients = []
    for _, dev in fleet:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(20)  # the device publisher's setting
        c.connect("127.0.0.1", port, keepalive=60)
        c.loop_start()
        clients.append(c)
    deadline = time.monotonic() + 60
    while not all(c.is_connected() for c in clients) and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    infos = []
    for i in range(per_device):  # interleaved: every device has one in flight at once
        for (site, dev), c, mine in zip(fleet, clients, payloads, strict=True):
            body = json.dumps(mine[i], separators=(",", ":")).encode()
            infos.append(c.publish(topic(site, dev, "result"), body, qos=1))
    deadline = time.monotonic() + 600  # bounded: the parent gives up before this anyway
    for info in infos:
        info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
    t1 = time.monotonic()
    acked = sum(info.is_published() for info in infos)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    ids = [p["result_id"] for mine in payloads for p in mine]
    out.send({"publish_s": t1 - t0, "acked": acked, "ids": ids, "start": t0})
    out.close()


class Fleet:
    """The device fleet in a child process (``spawn``: a clean interpreter of its own)."""

    def __init__(self, port: int, devices: int, per_device: int, seed: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_fleet, args=(port, devices, per_device, seed, send), daemon=True
        )
        self.started = time.monotonic()
        self.proc.start()
        send.close()

    def result(self, timeout: float) -> dict:
        if not self._recv.poll(timeout):
            self.proc.kill()
            raise RuntimeError("the device fleet did not finish publishing in time")
        out: dict = self._recv.recv()
        self.proc.join(10)
        return out


# --- the dashboard side -------------------------------------------------------------------------


@contextmanager
def dashboard(broker: Mosquitto, db: Path, max_batch: int, client_id: str) -> Iterator[Any]:
    """The real service (subscriber, store, web on a free port), API open on loopback."""
    from dashboard.mqtt import BrokerSettings
    from dashboard.service import Dashboard
    from osteofy.config import Config

    cfg = Config(
        mqtt={"url": broker.url},
        dashboard={"host": "127.0.0.1", "port": 0, "db_url": f"sqlite:///{db}"},
    )
    settings = BrokerSettings(
        host="127.0.0.1",
        port=broker.port,
        client_id=client_id,
        min_backoff_s=0.1,
        max_backoff_s=0.5,
    )
    d = Dashboard(cfg, broker=settings, max_batch=max_batch)
    d.start()
    try:
        assert d.subscriber is not None
        if not d.subscriber.subscribed.wait(20):
            raise RuntimeError("the dashboard did not subscribe")
        yield d
    finally:
        d.close()


def stored_ids(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT result_id FROM results")]


def _wait_stored(d: Any, n: int, timeout: float) -> tuple[float | None, float]:
    """(time of the first stored result, time of the n-th); bounded by ``timeout``."""
    first = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = d.counters.get("result_stored")
        now = time.monotonic()
        if got and first is None:
            first = now
        if got >= n:
            return first, now
        time.sleep(0.005)
    raise RuntimeError(f"only {d.counters.get('result_stored')} of {n} results stored in time")


def measure_ingest(
    devices: int,
    per_device: int,
    max_batch: int,
    scenario: str,
    workdir: Path,
    timeout: float = 300.0,
) -> dict:
    """One fleet run (``scenario`` ``live`` or ``backlog``); counts checked, figures returned."""
    n = devices * per_device
    run = Path(tempfile.mkdtemp(prefix=f"{scenario}-{max_batch}-", dir=workdir))
    db = run / "dashboard.sqlite"
    broker = Mosquitto(run)
    broker.start()
    try:
        client_id = f"fleet-dashboard-{scenario}-{max_batch}"
        if scenario == "backlog":
            with dashboard(broker, db, max_batch, client_id):
                pass  # the persistent session now exists: the broker queues for it
            fleet = Fleet(broker.port, devices, per_device)
            sent = fleet.result(timeout)
            t0 = time.monotonic()
            with dashboard(broker, db, max_batch, client_id) as d:
                _, done = _wait_stored(d, n, timeout)
                counts = d.counters.snapshot()
            seconds = done - t0
        elif scenario == "live":
            with dashboard(broker, db, max_batch, client_id) as d:
                fleet = Fleet(broker.port, devices, per_device)
                _, done = _wait_stored(d, n, timeout)
                sent = fleet.result(timeout)
                counts = d.counters.snapshot()
            seconds = done - fleet.started
        else:
            raise ValueError(scenario)
    finally:
        broker.stop()
    ids = stored_ids(db)
    shutil.rmtree(run, ignore_errors=True)
    return {
        "scenario": scenario,
        "max_batch": max_batch,
        "devices": devices,
        "results_per_device": per_device,
        "sent": len(sent["ids"]),
        "acked_by_broker": sent["acked"],
        "stored": len(ids),
        "stored_distinct": len(set(ids)),
        "missing": len(set(sent["ids"]) - set(ids)),
        "unexpected": len(set(ids) - set(sent["ids"])),
        "duplicates_received": counts.get("result_duplicate", 0),
        "commits": counts.get("commits", 0),
        "seconds": round(seconds, 3),
        "results_per_s": round(n / seconds, 1),
        "fleet_publish_s": round(sent["publish_s"], 3),
    }


# --- end-to-end latency -------------------------------------------------------------------------


def measure_latency(samples: int, workdir: Path, seed: int = 7) -> dict:
    """Device outbox -> Publisher -> Mosquitto -> dashboard -> ``/api/results``, per result.

    The publisher runs as on a device: it looks at its outbox when woken by a PUBACK or every
    0.5 s, so a result waits up to that long before it leaves; results are queued at random
    moments so that wait is sampled fairly.
    """
    from edge.outbox import Outbox
    from edge.publisher import Publisher
    from edge.store import ResultStore
    from osteofy.config import Config

    rng = random.Random(seed)
    run = Path(tempfile.mkdtemp(prefix="latency-", dir=workdir))
    broker = Mosquitto(run)
    broker.start()
    latencies = []
    try:
        with dashboard(broker, run / "dashboard.sqlite", 100, "latency-dashboard") as d:
            cfg = Config(
                site_id="clinic-lat",
                device_id="edge-lat",
                data_dir=run / "device",
                mqtt={"url": broker.url, "heartbeat_s": 60},
            )
            store = ResultStore(run / "device" / "results.sqlite")
            outbox = Outbox(store, cfg.site_id, cfg.device_id, limit=10_000)
            (run / "device" / "overlays").mkdir(parents=True, exist_ok=True)
            pub = Publisher(cfg, outbox, run / "device" / "overlays")
            pub.start()
            try:
                if not pub.connected.wait(20):
                    raise RuntimeError("the device publisher did not connect")
                url = f"http://127.0.0.1:{d.web.port}/api/results?limit=5"
                for _ in range(samples):
                    time.sleep(rng.uniform(0.05, 0.6))
                    payload = result_payload(cfg.site_id, cfg.device_id, rng)
                    t0 = time.perf_counter()
                    with store.transaction() as db:
                        store.add_result(db, uuid.uuid4().hex, payload, None, None)
                        outbox.enqueue_result(db, payload, None)
                    while True:
                        with urllib.request.urlopen(url, timeout=5) as resp:
                            got = {r["result_id"] for r in json.loads(resp.read())}
                        if payload["result_id"] in got:
                            latencies.append(time.perf_counter() - t0)
                            break
                        if time.perf_counter() - t0 > 10:
                            raise RuntimeError("a result did not reach the dashboard in 10 s")
                        time.sleep(0.005)
            finally:
                pub.stop(timeout=2)
                store.close()
    finally:
        broker.stop()
        shutil.rmtree(run, ignore_errors=True)
    ms = sorted(1000 * x for x in latencies)
    return {
        "samples": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
        "max_ms": round(ms[-1], 1),
    }


# --- the whole benchmark ------------------------------------------------------------------------


def commit_ms(runs: int = 200) -> float:
    """What one durable SQLite commit costs on this disk (WAL, ``synchronous=FULL``): the
    cost batching shares. About 0.3 ms on a server SSD with a write cache, several ms on an
    SD card or a disk without one — where batching matters far more than here."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(str(Path(tmp) / "t.sqlite"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        t0 = time.perf_counter()
        for i in range(runs):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 2000))
            db.execute("COMMIT")
        db.close()
        return round((time.perf_counter() - t0) / runs * 1000, 3)


def machine() -> dict:
    from edge.latency import cpu_name

    cpu = cpu_name()
    version = subprocess.run([str(MOSQUITTO), "-h"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": (version.splitlines() or ["?"])[0].replace("mosquitto version ", ""),
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "sqlite_commit_ms": commit_ms(),
    }


def run_bench(devices: int, per_device: int, latency_samples: int = 30) -> dict:
    """Per-message then batched commits, backlog then live, and the latency; one run."""
    from dashboard.mqtt import DEFAULT_BATCH

    work = Path(tempfile.mkdtemp(prefix="osteofy-fleet-"))
    try:
        res: dict = {"machine": machine(), "runs": []}
        for scenario in ("backlog", "live"):
            for batch in (1, DEFAULT_BATCH):
                log.info("%s, max_batch=%d: %d x %d results", scenario, batch, devices, per_device)
                r = measure_ingest(devices, per_device, batch, scenario, work)
                log.info("  %.0f results/s, %d stored", r["results_per_s"], r["stored"])
                res["runs"].append(r)
        for scenario in ("backlog", "live"):
            one, many = (r for r in res["runs"] if r["scenario"] == scenario)
            res[f"{scenario}_speedup"] = round(many["results_per_s"] / one["results_per_s"], 2)
        log.info("end-to-end latency, %d samples", latency_samples)
        res["latency"] = measure_latency(latency_samples, work)
        res["exact"] = all(
            r["stored"] == r["stored_distinct"] == r["sent"] and not r["missing"]
            for r in res["runs"]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        MARK_START,
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, load average "
        f"{m['load_average_start'][0]} at the start), Python {m['python']}, SQLite "
        f"{m['sqlite']} (one durable commit: {m['sqlite_commit_ms']} ms), Mosquitto "
        f"{m['mosquitto']}, by `python -m bench.fleet --devices "
        f"{res['runs'][0]['devices']} --results {res['runs'][0]['results_per_device']}`:",
        "",
        "| scenario | commits | stored / sent | results/s | commits made | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["runs"]:
        how = "one per message" if r["max_batch"] == 1 else f"batched (<= {r['max_batch']})"
        lines.append(
            f"| {r['scenario']} | {how} | {r['stored_distinct']:,} / {r['sent']:,} | "
            f"**{r['results_per_s']:,.0f}** | {r['commits']:,} | {r['seconds']} |"
        )
    lat = res["latency"]
    lines += [
        "",
        f"Batching: x{res['backlog_speedup']} on the backlog (the dashboard's own capacity), "
        f"x{res['live_speedup']} live (devices, broker and dashboard sharing the cores). Every "
        f"run stored each result exactly once: {'yes' if res['exact'] else 'NO'}.",
        "",
        f"End-to-end latency, device outbox to `/api/results` ({lat['samples']} results): "
        f"p50 {lat['p50_ms']:.0f} ms, p95 {lat['p95_ms']:.0f} ms, max {lat['max_ms']:.0f} ms "
        "(mostly the device publisher's 0.5 s outbox poll).",
        MARK_END,
    ]
    return "\n".join(lines)


def write_docs(path: Path, res: dict) -> None:
    """Replace the figures section of ``path`` (between the markers); the rest stays."""
    text = path.read_text() if path.exists() else f"{MARK_START}\n{MARK_END}\n"
    pattern = re.compile(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        text = text.rstrip() + f"\n\n{MARK_START}\n{MARK_END}\n"
    path.write_text(pattern.sub(lambda _: markdown(res), text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--results", type=int, default=50, help="results per device")
    ap.add_argument("--latency-samples", type=int, default=30)
    ap.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    ap.add_argument("--docs", type=Path, default=Path("docs/dashboard.md"))
    ap.add_argument("--no-docs", action="store_true", help="do not touch the markdown page")
    args = ap.parse_args(argv)
    if args.devices < 1 or args.results < 1:
        ap.error("--devices and --results must be >= 1")
    if MOSQUITTO is None:
        print("bench.fleet: mosquitto is not installed (apt install mosquitto)", file=sys.stderr)
        return 4
    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)7.0f ms  %(message)s", stream=sys.stderr
    )
    for name in ("dashboard", "edge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    res = run_bench(args.devices, args.results, args.latency_samples)
    if not args.no_docs:
        write_docs(args.docs, res)
    print(json.dumps(res) if args.json else markdown(res))
    return 0 if res["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
