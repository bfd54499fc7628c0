"""``osteofy demo``: the whole chain on one machine, on embedded defaults.

    simulated digitizer --C-STORE--> bridge --inbox--> edge serve --outbox/MQTT--> dashboard
                                                            \\--> local screen

A private Mosquitto is started on a free localhost port when it is installed (else the demo runs
offline and says so: results stay queued on the device); the bridge, the edge runtime with its
local screen and the dashboard run in this process on free localhost ports. A few virtual-cohort
scans (hand and hip, synthetic) are rendered and sent through the DICOM C-STORE receiver as a
digitizer would. They are chosen from a seeded cohort by their planned T-score, so the default
four hold a clear osteoporosis and a normal case of each site (more scans add osteopenia and
then cases as they come).

Facts arrive as in a clinic: age, sex, weight and height in the DICOM header; the risk factors
(fracture history, smoking, ...) are then typed into the local screen's facts form, which screens
the study again. The demo waits for each result on the dashboard and prints, per scan, the
answer from the header alone and with the technician's facts, and whether it agreed with the
simulator's truth.

``--headless``: exit 0 only if every scan reached the dashboard. Otherwise the chain keeps
running, with its URLs printed, until Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from osteofy.config import Config
from osteofy.errors import Unavailable
from osteofy.mosquitto import Mosquitto, free_port

log = logging.getLogger(__name__)

SITES = ("hand", "hip")
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
WAIT_S = 120.0
POOL = 400  # the seeded cohort the demo's cases are chosen from (planned only, not rendered)
# The planned T-scores the demo looks for, in order: clear osteoporosis, normal, osteopenia.
TARGETS = (-3.3, 0.5, -1.8)


class _Mosquitto:
    """The demo's broker: started when Mosquitto is installed, else the demo runs offline."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.broker: Mosquitto | None = None
        self.workdir = workdir

    def start(self) -> bool:
        try:
            self.broker = Mosquitto(self.workdir, port=self.port)
            self.broker.start()
        except RuntimeError:  # not installed, or did not start
            self.broker = None
            return False
        return True

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()


def _config(out: Path, broker_url: str) -> Config:
    return Config(
        site_id="demo-clinic",
        device_id="demo-edge",
        data_dir=out / "device",
        models_dir=MODELS_DIR,
        mqtt={"url": broker_url, "heartbeat_s": 2.0},
        bridge={"dicom": {"host": "127.0.0.1", "port": free_port(), "ae_title": "OSTEOFY"}},
        screen={"host": "127.0.0.1", "port": free_port()},
        dashboard={
            "host": "127.0.0.1",
            "port": free_port(),
            "db_url": f"sqlite:///{out / 'dashboard.sqlite'}",
        },
    )


def choose_cases(site: str, n: int, seed: int) -> list[int]:
    """Indices of ``n`` cases of the seeded cohort: nearest each TARGETS T-score, then in order."""
    from cohort.plan import plan_cohort

    t = plan_cohort(site, POOL, seed).patients["tscore"]
    chosen: list[int] = []
    for target in TARGETS[:n]:
        order = sorted(range(POOL), key=lambda i: abs(float(t[i]) - target))
        chosen.append(next(i for i in order if i not in chosen))
    chosen += [i for i in range(POOL) if i not in chosen][: n - len(chosen)]
    return chosen


def _render(out: Path, scans: int, seed: int, quiet: bool) -> list[Path]:
    import csv

    from cohort.generate import SimulateOptions, simulate

    files: list[Path] = []
    per_site = {s: (scans + (i == 0)) // 2 for i, s in enumerate(SITES)}
    for site, n in per_site.items():
        if n == 0:
            continue
        opts = SimulateOptions(max_side=1024, workers=2, counterfactual=False)
        folder = out / "scans" / site
        shutil.rmtree(folder, ignore_errors=True)  # a run never sends an earlier run's scans
        cases = choose_cases(site, n, seed)
        simulate(folder, site, POOL, seed, options=opts, progress=not quiet, cases=cases)
        with (folder / "manifest.csv").open(newline="") as fh:
            by_case = {int(r["case_id"].rsplit("_", 1)[1]): r["file"] for r in csv.DictReader(fh)}
        files += [folder / by_case[i] for i in cases]  # in the order chosen
    return files


def _truth(files: list[Path], secret: bytes) -> dict[str, dict]:
    """study_key -> the simulator's truth for that scan (manifest class and T-score)."""
    import csv

    from pydicom import dcmread

    from edge.result import pseudonym

    truth: dict[str, dict] = {}
    for folder in {f.parent for f in files}:
        with (folder / "manifest.csv").open(newline="") as fh:
            rows = {r["file"]: r for r in csv.DictReader(fh)}
        for f in files:
            if f.parent == folder:
                uid = str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                key = pseudonym(secret, uid)
                if key is not None:
                    truth[key] = rows[f.name]
    return truth


def _send(files: list[Path], cfg: Config) -> dict[str, float]:
    """The simulated digitizer: one association, one C-STORE per scan, as a real CR reader."""
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title="DIGITIZER")
    contexts = {}
    sent: dict[str, float] = {}
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        key = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        if key not in contexts:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            contexts[key] = True
    d = cfg.bridge.dicom
    assoc = ae.associate("127.0.0.1", d.port, ae_title=d.ae_title)
    if not assoc.is_established:
        raise Unavailable("demo: the bridge refused the simulated digitizer's association")
    try:
        for f, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            ok = status is not None and getattr(status, "Status", None) == 0x0000
            if ok:
                sent[f.name] = time.monotonic()
            else:
                print(f"  {f.name}: the bridge did not store it ({status})")
    finally:
        assoc.release()
    return sent


def _type_risk_factors(
    cfg: Config,
    service,
    truth: dict[str, dict],  # noqa: ANN001
) -> dict[str, str]:
    """The technician's step: each result's risk factors into the local screen's facts form.

    Returns first result id -> the id of the result screened again with those facts.
    """
    from edge.clinical import RISK_FACTORS

    again: dict[str, str] = {}
    for r in service.store.results(limit=500):
        row = truth.get(r.get("study_key") or "")
        if row is None:
            continue
        facts = {n: row[n] == "1" for n in RISK_FACTORS if row.get(n) in ("0", "1")}
        url = f"http://127.0.0.1:{cfg.screen.port}/api/results/{r['result_id']}/rescreen"
        req = urllib.request.Request(
            url,
            data=json.dumps(facts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                again[r["result_id"]] = json.loads(resp.read())["result_id"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"  the facts form refused the risk factors of a scan: {exc}")
    return again


def _dashboard_results(cfg: Config) -> list[dict]:
    url = f"http://127.0.0.1:{cfg.dashboard.port}/api/results?limit=500"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return list(json.loads(resp.read()))
    except OSError:
        return []


def run_demo(
    out: Path, scans: int = 4, quiet: bool = False, seed: int = 2026, headless: bool = False
) -> int:
    from dashboard.service import Dashboard
    from edge.screen_web import attach
    from edge.serve import EdgeService, start_publisher
    from firmware_bridge.options import BridgeOptions
    from firmware_bridge.service import Bridge, quiet_libraries

    out = Path(out)
    if out.exists():
        shutil.rmtree(out / "device", ignore_errors=True)
        (out / "dashboard.sqlite").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # the table says what matters
        for name in ("edge", "dashboard", "firmware_bridge"):
            logging.getLogger(name).setLevel(logging.WARNING)
    print("Osteofy Edge demo - synthetic data only (virtual cohort); not for clinical use.")
    broker = _Mosquitto(Path(tempfile.mkdtemp(prefix="osteofy-demo-")))
    online = broker.start()
    cfg = _config(out, f"mqtt://127.0.0.1:{broker.port}" if online else "")
    print(
        f"  MQTT broker: private Mosquitto on 127.0.0.1:{broker.port}"
        if online
        else "  MQTT: Mosquitto is not installed - OFFLINE mode: results stay queued on the "
        "device and the dashboard stays empty (apt install mosquitto)"
    )
    files = _render(out, scans, seed, quiet)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())  # like Ctrl-C
    dashboard = Dashboard(cfg, open_pages=True)  # a demo on this machine: no staff accounts
    service = EdgeService(cfg)
    publisher = start_publisher(service)
    stop_screen = attach(service, publisher, cfg)
    bridge = Bridge(BridgeOptions.from_config(cfg))
    edge_thread = threading.Thread(target=service.serve, name="edge-serve", daemon=True)
    try:
        dashboard.start()
        edge_thread.start()
        bridge.start()
        print(f"  local screen:  http://127.0.0.1:{cfg.screen.port}/")
        print(f"  dashboard:     http://127.0.0.1:{cfg.dashboard.port}/")
        print(
            f"  bridge:        DICOM C-STORE {cfg.bridge.dicom.ae_title}@127.0.0.1:"
            f"{cfg.bridge.dicom.port}"
        )
        print(f"sending {len(files)} scans from a simulated digitizer (C-STORE) ...")
        sent = _send(files, cfg)
        truth = _truth(files, service.screener.secret)
        first = _wait(service, cfg, online, len(sent))
        print("typing each scan's risk factors into the local screen's facts form ...")
        again = _type_risk_factors(cfg, service, truth)
        _wait(service, cfg, online, first + len(again))
        ok = _report(files, sent, service, cfg, online, truth, again)
        if headless:
            return 0 if ok else 1
        print("running; open the URLs above. Ctrl-C stops everything.")
        while not stop.wait(1.0):
            pass
        return 0
    except KeyboardInterrupt:
        print("stopping ...")
        return 0
    finally:
        bridge.stop()
        service.stopping.set()
        edge_thread.join(10)
        stop_screen()
        if publisher is not None:
            publisher.stop(timeout=3)
        service.close()
        dashboard.close()
        broker.stop()


def _wait(service, cfg: Config, online: bool, want: int) -> int:  # noqa: ANN001
    """Wait until ``want`` results (or rejections) are on the device and, online, on the
    dashboard; returns how many results the device holds."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        local = service.store.results(limit=500)
        remote = _dashboard_results(cfg) if online else []
        rejected = len(service.store.rejections(limit=500))
        if len(local) + rejected >= want and (not online or len(remote) >= len(local)):
            break
        time.sleep(0.5)
    return len(service.store.results(limit=500))


def _answer(p: dict) -> str:
    from edge.answer import tscore_text

    t = tscore_text(p["tscore"]).replace("\u2212", "-")
    return f"{p['class']:<12} T {t:>5} P(op) {p['probs']['osteoporosis']:.2f} " + (
        "REFER" if p["refer"] else "-    "
    )


def _agreement(truth: dict, p: dict) -> str:
    """Whether the screen agreed with the truth: the class, and the referral an osteoporosis
    case needs (a normal case referred is a false alarm)."""
    if not truth:
        return "?"
    cls = truth.get("class")
    words = "class right" if p["class"] == cls else f"class wrong (truth {cls})"
    if cls == "osteoporosis":
        words += ", referred" if p["refer"] else ", NOT referred (missed)"
    elif cls == "normal" and p["refer"]:
        words += ", referred (false alarm)"
    return words


def _report(  # noqa: ANN001
    files: list[Path],
    sent: dict[str, float],
    service,
    cfg: Config,
    online: bool,
    truth: dict,
    again: dict[str, str],
) -> bool:
    """The summary table: per scan, the truth, the answer from the DICOM header's facts alone,
    the answer with the risk factors typed on the screen, and whether it agreed."""
    local = {r["result_id"]: r for r in service.store.results(limit=500)}
    remote_ids = {r["result_id"] for r in _dashboard_results(cfg)} if online else set()
    later = set(again.values())
    firsts = sorted(
        (r for r in local.values() if r["result_id"] not in later), key=lambda r: r["created_at"]
    )
    print()
    print("truth: the simulator's class and T-score (synthetic) | header: the answer from age,")
    print("sex, weight and height in the DICOM header | + facts: after the risk factors were")
    print("typed into the local screen's facts form (the answer the screen shows)")
    for i, r in enumerate(firsts, 1):
        t = truth.get(r.get("study_key") or "", {})
        final = local.get(again.get(r["result_id"], ""), r)
        facts = [n for n in t if n in _RISK_WORDS and t[n] == "1"]
        chain = [r["result_id"], final["result_id"]]
        arrived = all(x in remote_ids for x in chain)
        where = "arrived" if arrived else ("QUEUED (offline)" if not online else "MISSING")
        print(
            f"{i:>2} {r['body_part']:<5} truth {t.get('class', '?'):<12} "
            f"T {float(t.get('tscore', 'nan')):5.1f}  device {final['timings_ms']['total']:.0f} ms"
            f"  dashboard: {where}"
        )
        print(f"     header   {_answer(r['prediction'])}")
        typed = ", ".join(_RISK_WORDS[n] for n in facts) or "none of the risk factors"
        print(f"     + facts  {_answer(final['prediction'])}  ({typed})")
        print(f"     screen {_agreement(t, final['prediction'])}")
    for rej in service.store.rejections(limit=500):
        print(f"   rejected: {rej['reason']}")
    print()
    print("screening aid, not a diagnosis: confirm with DXA. All scans are synthetic.")
    reached = sum(1 for r in local.values() if r["result_id"] in remote_ids)
    print(
        f"{len(sent)}/{len(files)} scans stored by the bridge, {len(firsts)} screened, "
        f"{len(again)} screened again with the technician's facts, {reached} results on the "
        "dashboard."
    )
    return (
        online
        and len(sent) == len(files) == len(firsts)
        and len(again) == len(firsts)
        and reached == len(local)
    )


_RISK_WORDS = {
    "prior_fracture": "prior fracture",
    "parental_hip_fracture": "parent's hip fracture",
    "smoking": "smoking",
    "glucocorticoids": "glucocorticoids",
    "rheumatoid_arthritis": "rheumatoid arthritis",
    "alcohol": "alcohol",
    "secondary_osteoporosis": "secondary osteoporosis",
}
