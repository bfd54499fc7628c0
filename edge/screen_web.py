"""The technician's local screen: a kiosk web page served by ``edge serve`` on localhost.

A single page (``edge/static/``: HTML, one script, one style sheet, no external asset) polls
this small JSON API and draws the worklist, a result (radiograph + heat map blended in a
canvas) and the clinical-facts form. The API returns *view models*: the plain words a
technician reads are made here, in Python, where they are tested; the script only places
text (``textContent``, never HTML), so nothing the server sends is ever markup.

Safety on a shared device: bound to 127.0.0.1 by default; the ``Host`` header must name this
server (DNS rebinding); a POST must be ``application/json`` (a cross-site form cannot send
that without a CORS preflight, which is never answered) and same-origin when the browser
says where it comes from; CSP ``default-src 'self'`` with no inline script. Studies are
named "Study N" (numbered in the order this process first saw them), never by a file name or
a DICOM value; the result payload holds no identifier anyway.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import socket
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edge.answer import tscore_text
from edge.clinical import RISK_FACTORS
from edge.quarantine import reason_path
from edge.result import CLASSES
from osteofy import __version__
from osteofy.compat import UTC
from osteofy.errors import InputRejected, Unavailable

if TYPE_CHECKING:
    from edge.publisher import Publisher
    from edge.serve import EdgeService
    from osteofy.config import Config

log = logging.getLogger(__name__)

NOTICE = "Screening aid — confirm with DXA"
DISK_LOW_MB = 1024.0
MAX_BODY = 16 * 1024
WORKLIST_LIMIT = 60
FORM_FACTS = (*RISK_FACTORS, "weight_kg", "height_m")

LABELS = {
    "age_years": "Age",
    "sex_male": "Sex",
    "weight_kg": "Body weight",
    "height_m": "Height",
    "bmi": "Body mass index (BMI)",
    "prior_fracture": "Earlier broken bone",
    "parental_hip_fracture": "Parent broke a hip",
    "smoking": "Smoking",
    "glucocorticoids": "Steroid tablets",
    "rheumatoid_arthritis": "Rheumatoid arthritis",
    "alcohol": "Alcohol 3+ units a day",
    "secondary_osteoporosis": "Illness that weakens bone",
}
HELP = {
    "prior_fracture": "A bone broken after age 50 in a minor fall",
    "parental_hip_fracture": "Mother or father broke a hip",
    "smoking": "Smokes tobacco now",
    "glucocorticoids": "Prednisolone or similar for 3 months or more",
    "rheumatoid_arthritis": "Diagnosed by a doctor",
    "alcohol": "3 or more units (drinks) of alcohol every day",
    "secondary_osteoporosis": "e.g. type 1 diabetes, early menopause, liver disease",
}
CLASS_LABEL = {"normal": "Normal", "osteopenia": "Osteopenia", "osteoporosis": "Osteoporosis"}
VERDICT = {
    "normal": "Normal bone density likely",
    "osteopenia": "Osteopenia (low bone density) likely",
    "osteoporosis": "Osteoporosis likely",
}
# What each class's heat map shows. A map is evidence that moved the answer, not a finding: for a
# normal answer it marks the bone that looked dense, so a technician sees the model read the bone.
HEAT_TEXT = {
    "normal": "Heat map for normal: where the bone looked dense enough to move the answer "
    "toward normal (evidence of healthy bone, not a finding).",
    "osteopenia": "Heat map for osteopenia: where the image moved the answer toward the "
    "osteopenia range.",
    "osteoporosis": "Heat map for osteoporosis: where the bone looked thin or porous enough to "
    "move the answer toward osteoporosis.",
}
FLAG_TEXT = {
    "ood_borderline": "The image is close to the limit of what the screening knows "
    "(unusual position, exposure or body part). Check the image.",
    "low_confidence": "The screening is not sure between the classes. Treat this result "
    "with extra care.",
    "missing_clinical_facts": "Some clinical facts are missing. Add them for a better result.",
}
REJECTED = {  # rule -> headline; the stored one-line reason is shown under it
    "ood": "This image does not look like an X-ray the screening knows.",
    "body_part": "This body part cannot be screened on this device.",
    "site_available": "This body part cannot be screened on this device.",
    "modality": "This file is not an X-ray image.",
    "sop_class": "This file is not an X-ray image.",
    "photometric": "This is not a grey X-ray image.",
    "samples_per_pixel": "This is not a grey X-ray image.",
    "frames": "This file holds more than one image.",
    "dimensions": "The image size is not accepted.",
    "clinical": "The clinical facts sent with the image are not valid.",
    "internal_error": "Something went wrong on this device. Send the image again; "
    "if it happens again, call support.",
}
REJECTED_OTHER = "The file is damaged or in a form this device cannot read."
BACKEND = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def age_band(age: float | None) -> str | None:
    if age is None:
        return None
    if age >= 90:
        return "90+"
    lo = int(age // 10) * 10
    return f"{lo}–{lo + 9}"


def answer_text(class_: str, t: float, p_osteoporosis: float, refer: bool) -> str:
    """The answer in one line: T-score estimate, its class, the chance of osteoporosis, referral."""
    band = tscore_band(t)
    head = f"Estimated T-score {tscore_text(t)} \u2192 {CLASS_LABEL[band].lower()}"
    if band != class_:  # only older model packages, whose class and T-score are separate outputs
        head += f" (the model's class is {CLASS_LABEL[class_].lower()}: they disagree)"
    chance = f"chance of osteoporosis {round(100 * p_osteoporosis)} %"
    return f"{head}; {chance}; {'refer for DXA' if refer else 'no referral suggested'}"


def tscore_band(t: float) -> str:
    """WHO bands: normal >= -1, osteopenia between, osteoporosis <= -2.5."""
    return "normal" if t >= -1.0 else ("osteopenia" if t > -2.5 else "osteoporosis")


def _minus(x: float) -> str:
    return f"{x:.1f}".replace("-", "−")


def plain_fact_error(exc: InputRejected) -> str:
    """``clinical fact weight_kg in the --clinical is ...`` -> ``Body weight (kg) is ...``."""
    text = str(exc).replace(" in the --clinical", "").replace("the --clinical", "the form")
    for name, label in LABELS.items():
        unit = {"weight_kg": " (kg)", "height_m": " (m)"}.get(name, "")
        text = re.sub(rf"\bclinical fact {name}\b", label + unit, text)
    return text[:1].upper() + text[1:]


class ScreenApp:
    """The page's data: worklist, result views, status, and the technician's two actions."""

    def __init__(self, service: EdgeService, publisher: Publisher | None) -> None:
        self.service = service
        self.publisher = publisher
        self._numbers: dict[str, int] = {}
        self._origin: dict[str, str | None] = {}  # quarantined file -> original name
        self._lock = threading.Lock()

    def _number(self, name: str) -> int:
        with self._lock:
            return self._numbers.setdefault(name, len(self._numbers) + 1)

    def _original(self, quarantined_as: str) -> str | None:
        if quarantined_as not in self._origin:
            try:
                record = json.loads(
                    reason_path(self.service.folders.quarantine / quarantined_as).read_text()
                )
                self._origin[quarantined_as] = str(record.get("original_name") or "") or None
            except (OSError, ValueError):
                self._origin[quarantined_as] = None
        return self._origin[quarantined_as]

    def _rows(self, where: str = "", args: tuple = (), limit: int = WORKLIST_LIMIT) -> list[dict]:
        store = self.service.store
        with store._lock:
            rows = store.db.execute(
                "SELECT result_id, source, supersedes, payload FROM results "
                f"{where} ORDER BY created_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [
            {"id": r[0], "source": r[1], "supersedes": r[2], "payload": json.loads(r[3])}
            for r in rows
        ]

    # --- worklist ----------------------------------------------------------------------------

    def worklist(self) -> dict:
        rows = self._rows()
        replaced = {r["supersedes"] for r in rows if r["supersedes"]}
        finished: list[tuple[str, str, dict]] = []  # (time, name for the number, item)
        for r in rows:
            p = r["payload"]
            pred = p["prediction"]
            finished.append(
                (
                    p["created_at"],
                    r["source"] or r["id"],
                    {
                        "state": "done",
                        "state_text": f"Done: {CLASS_LABEL[pred['class']]}",
                        "at": p["created_at"],
                        "result_id": r["id"],
                        "supersedes": r["supersedes"],
                        "class": pred["class"],
                        "refer": pred["refer"],
                        "details": self._who(p),
                    },
                )
            )
        for q in self.service.store.rejections(WORKLIST_LIMIT):
            name = self._original(q["quarantined_as"]) or q["quarantined_as"]
            finished.append(
                (
                    q["created_at"],
                    name,
                    {
                        "state": "rejected",
                        "state_text": "Rejected",
                        "at": q["created_at"],
                        "reason": REJECTED.get(q["rule"], REJECTED_OTHER),
                        "reason_detail": q["reason"],
                    },
                )
            )
        finished.sort(key=lambda t: t[0])
        for _, name, item in finished:  # oldest first, so study numbers follow arrival
            item["study"] = self._number(name)
        done = [i for _, _, i in reversed(finished) if i.get("result_id") not in replaced]
        active = []
        work = self.service.folders.work
        for path in self.service.pending():
            screening = path.parent == work
            try:
                received = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            except OSError:
                continue  # screened and moved on while we looked
            active.append(
                {
                    "study": self._number(path.name),
                    "state": "screening" if screening else "waiting",
                    "state_text": "Screening…" if screening else "Waiting",
                    "at": received.isoformat(timespec="seconds").replace("+00:00", "Z"),
                }
            )
        for item in active + done:
            item["label"] = f"Study {item['study']}"
        return {"items": active + done}

    @staticmethod
    def _who(p: Mapping[str, Any]) -> str:
        parts = [str(p["body_part"]).capitalize()]
        sex = {"F": "Female", "M": "Male"}.get(p.get("sex") or "")
        if sex:
            parts.append(sex)
        band = age_band(p.get("age_years"))
        if band:
            parts.append(f"age {band}")
        return " · ".join(parts)

    # --- one result --------------------------------------------------------------------------

    def result(self, rid: str) -> dict | None:
        found = self._rows("WHERE result_id = ?", (rid,), 1)
        if not found:
            return None
        row = found[0]
        p = row["payload"]
        newer = self._rows("WHERE supersedes = ?", (rid,), 1)
        pred, quality, expl = p["prediction"], p["quality"], p["explanation"]
        t = float(pred["tscore"])
        band = tscore_band(t)
        known = {c["factor"]: c["known"] for c in expl["clinical"]}
        missing = list(quality["missing_facts"])
        given = self.service.store.given_facts(rid)
        base = f"/api/results/{rid}"
        return {
            "result_id": rid,
            "study": self._number(row["source"] or rid),
            "label": f"Study {self._number(row['source'] or rid)}",
            "created_at": p["created_at"],
            "details": self._who(p),
            "notice": NOTICE,
            "class": pred["class"],
            "verdict": VERDICT[pred["class"]],
            "refer": pred["refer"],
            "refer_text": "Refer for a DXA scan" if pred["refer"] else "No referral suggested",
            "probs": [
                {"class": c, "label": CLASS_LABEL[c], "p": pred["probs"][c]} for c in CLASSES
            ],
            "tscore": t,
            "tscore_band": band,
            "tscore_text": f"Estimated T-score {tscore_text(t)}: {CLASS_LABEL[band].lower()} range",
            "answer_text": answer_text(
                pred["class"], t, float(pred["probs"]["osteoporosis"]), bool(pred["refer"])
            ),
            "coherent": band == pred["class"],
            "heatmap_class": expl["heatmap_class"],
            "heatmap_text": HEAT_TEXT,
            "peaks": expl["peaks"],
            "factors": self._factors(expl["clinical"]),
            "flags": [{"flag": f, "text": FLAG_TEXT[f]} for f in quality["flags"]],
            "missing": [LABELS.get(n, n) for n in missing],
            "form": [
                {
                    "name": n,
                    "label": LABELS[n],
                    "help": HELP.get(n, ""),
                    "kind": "number" if n in ("weight_kg", "height_m") else "yesno",
                    "missing": n in missing,
                    "known": bool(known.get(n)) and n not in missing,
                    "value": given.get(n),
                }
                for n in FORM_FACTS
            ],
            "feedback": self.service.store.feedback_for(rid),
            "model": f"{p['model']['name']} {p['model']['version']} · "
            f"{BACKEND.get(p['model']['backend'], p['model']['backend'])} · "
            f"{p['model']['precision'].upper()}",
            "images": {
                "base": f"{base}/base.jpg",
                "heat": {c: f"{base}/heat-{c}.png" for c in CLASSES},
            },
            "supersedes": row["supersedes"],
            "superseded_by": newer[0]["id"] if newer else None,
            "payload": p,
        }

    @staticmethod
    def _factors(clinical: list[dict]) -> dict[str, list[dict]]:
        """Known facts that pushed P(osteoporosis) up or down (BMI and its hinge as one)."""
        sums: dict[str, float] = {}
        for c in clinical:
            if c["known"]:
                name = "bmi" if c["factor"] == "bmi_below_27" else c["factor"]
                sums[name] = sums.get(name, 0.0) + float(c["log_odds"])
        out: dict[str, list[dict]] = {"up": [], "down": []}
        for name, v in sorted(sums.items(), key=lambda kv: -abs(kv[1])):
            if abs(v) < 0.05:
                continue
            strength = "a lot" if abs(v) >= 0.5 else "a little" if abs(v) < 0.15 else "somewhat"
            out["up" if v > 0 else "down"].append(
                {"factor": name, "label": LABELS.get(name, name), "strength": strength}
            )
        return out

    def image(self, rid: str, name: str) -> Path | None:
        if self.service.store.result(rid) is None:
            return None
        path = self.service.folders.overlays / f"{rid}.{name}"
        return path if path.is_file() else None

    # --- the technician's actions ------------------------------------------------------------

    def rescreen(self, rid: str, body: object) -> tuple[int, dict]:
        if not isinstance(body, dict):
            return 400, {"error": "The facts must be sent as a form."}
        if self.service.store.result(rid) is None:
            return 404, {"error": "This result is not on this device."}
        if self._rows("WHERE supersedes = ?", (rid,), 1):
            return 409, {"error": "A newer result exists for this study. Open it first."}
        new = {k: v for k, v in body.items() if v is not None}
        if not new:
            return 400, {"error": "Enter at least one fact."}
        try:
            outcome = self.service.rescreen(rid, new)  # merges facts given before (stored)
        except InputRejected as exc:
            return 400, {"error": plain_fact_error(exc)}
        except KeyError:
            return 404, {"error": "This result is not on this device."}
        new_id = outcome.result.result_id
        return 200, {"result_id": new_id, "supersedes": rid}

    def feedback(self, rid: str, body: object) -> tuple[int, dict]:
        if not isinstance(body, dict) or set(body) - {"agree", "dxa_tscore"}:
            return 400, {"error": "Feedback is agree and/or a DXA T-score."}
        agree, dxa = body.get("agree"), body.get("dxa_tscore")
        if agree is not None and not isinstance(agree, bool):
            return 400, {"error": "Agree must be yes or no."}
        if dxa is not None and (
            isinstance(dxa, bool)
            or not isinstance(dxa, int | float)
            or not math.isfinite(dxa)
            or not -8.0 <= dxa <= 6.0
        ):
            return 400, {"error": "The DXA T-score must be a number between −8 and 6."}
        if agree is None and dxa is None:
            return 400, {"error": "Choose agree or disagree, or enter the DXA T-score."}
        try:
            payload = self.service.feedback(rid, agree, None if dxa is None else float(dxa))
        except KeyError:
            return 404, {"error": "This result is not on this device."}
        return 200, {"feedback": payload}

    # --- device status -----------------------------------------------------------------------

    def status(self) -> dict:
        svc, pub = self.service, self.publisher
        models = [
            {
                "site": site,
                "name": m.pkg.name,
                "version": str(m.pkg.card.get("version", "0")),
                "backend": BACKEND.get(m.choice.backend.name, m.choice.backend.name),
                "precision": m.choice.backend.precision.upper(),
                "reason": m.choice.reason,
                "fallback": m.choice.fallback,  # why the CPU runs what the GPU would
            }
            for site, m in sorted(svc.screener.models.items())
        ]
        problems = sorted(svc.screener.problems.items())
        outbox = svc.outbox.stats()
        mqtt: dict[str, str | None]
        if pub is None:
            mqtt = {"state": "offline", "text": "Network: off"}
        elif pub.connected.is_set():
            mqtt = {"state": "connected", "text": "Network: connected"}
        else:
            mqtt = {
                "state": "disconnected",
                "text": "Network: NOT connected",
                "error": pub.last_error,
            }
        free_mb = shutil.disk_usage(svc.folders.root).free / 1e6
        alarms = [
            f"The {site} model cannot be used ({why}). {site.capitalize()} X-rays cannot be "
            "screened: call support."
            for site, why in problems
        ]
        if outbox["alarm"]:
            alarms.append(
                f"The outbox is nearly full ({outbox['depth']} of {outbox['limit']} messages): "
                "results are not reaching the dashboard. Check the network link."
            )
        if free_mb < DISK_LOW_MB:
            alarms.append(f"The disk is nearly full ({free_mb:.0f} MB free). Call support.")
        return {
            "software": __version__,
            "models": models,
            "mqtt": mqtt,
            "outbox": outbox,
            "disk_free_mb": round(free_mb, 1),
            "alarms": alarms,
        }


# --- HTTP ------------------------------------------------------------------------------------

_ID = r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
_IMAGE = re.compile(rf"^/api/results/{_ID}/(base\.jpg|heat-(?:{'|'.join(CLASSES)})\.png)$")
_RESULT = re.compile(rf"^/api/results/{_ID}$")
_ACTION = re.compile(rf"^/api/results/{_ID}/(rescreen|feedback)$")
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/screen.js": ("screen.js", "text/javascript; charset=utf-8"),
    "/static/screen.css": ("screen.css", "text/css; charset=utf-8"),
}
_CSP = (
    "default-src 'self'; img-src 'self' blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _load_static() -> dict[str, bytes]:
    folder = resources.files("edge").joinpath("static")
    try:
        return {name: folder.joinpath(name).read_bytes() for name, _ in _STATIC.values()}
    except OSError as exc:
        raise Unavailable(f"the local screen's files are missing ({exc})") from None


class ScreenServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ScreenApp, host: str, port: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        self.static = _load_static()
        super().__init__((host, port), _Handler)
        self.port = int(self.server_address[1])
        wildcard = host in ("", "0.0.0.0", "::")
        names = {host, "127.0.0.1", "localhost", "[::1]"}
        self.allowed_hosts = None if wildcard else {f"{n}:{self.port}" for n in names}


class _Handler(BaseHTTPRequestHandler):
    server: ScreenServer
    protocol_version = "HTTP/1.1"
    server_version = "OsteofyScreen"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("screen: " + format, *args)

    def _send(self, code: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
        self.send_response(code)
        for k, v in (
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Cache-Control", cache),
            ("Content-Security-Policy", _CSP),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            ("Cross-Origin-Resource-Policy", "same-origin"),
        ):
            self.send_header(k, v)
        if self.command == "POST":  # a refused body may be unread: never reuse the connection
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: object) -> None:
        body = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
        self._send(code, body, "application/json")

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts
        return allowed is None or self.headers.get("Host", "") in allowed

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return self._json(421, {"error": "unknown host"})
        try:
            self._get(urlsplit(self.path).path)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the browser went away mid-answer
        except Exception:  # noqa: BLE001 - one bad request must not take the screen down
            log.exception("local screen: GET failed")
            self.close_connection = True
            self._json(500, {"error": "Something went wrong on this device."})

    do_HEAD = do_GET

    def _get(self, path: str) -> None:
        app = self.server.app
        if path in _STATIC:
            name, ctype = _STATIC[path]
            return self._send(200, self.server.static[name], ctype)
        if path == "/api/worklist":
            return self._json(200, app.worklist())
        if path == "/api/status":
            return self._json(200, app.status())
        if m := _RESULT.match(path):
            view = app.result(m[1])
            return self._json(200, view) if view else self._json(404, {"error": "no such result"})
        if m := _IMAGE.match(path):
            file = app.image(m[1], m[2])
            if file is None:
                return self._json(404, {"error": "no such image"})
            ctype = "image/jpeg" if m[2].endswith(".jpg") else "image/png"
            return self._send(200, file.read_bytes(), ctype, "private, max-age=3600")
        return self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return self._json(421, {"error": "unknown host"})
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            return self._json(403, {"error": "cross-origin request refused"})
        if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return self._json(403, {"error": "cross-site request refused"})
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._json(415, {"error": "send application/json"})
        m = _ACTION.match(urlsplit(self.path).path)
        if m is None:
            return self._json(404, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(411, {"error": "Content-Length required"})
        if not 0 <= length <= MAX_BODY:
            return self._json(413, {"error": "request too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, RecursionError):
            return self._json(400, {"error": "The request is not valid JSON."})
        app = self.server.app
        try:
            code, out = (app.rescreen if m[2] == "rescreen" else app.feedback)(m[1], body)
        except Exception:  # noqa: BLE001 - one bad request must not take the screen down
            log.exception("local screen: %s failed", m[2])
            code, out = 500, {"error": "Something went wrong on this device. Try again."}
        self._json(code, out)


def start_screen_server(
    service: EdgeService, publisher: Publisher | None, host: str = "127.0.0.1", port: int = 8080
) -> tuple[ScreenServer, threading.Thread]:
    """Serve the screen from a daemon thread; port 0 picks a free one (``server.port``)."""
    try:
        server = ScreenServer(ScreenApp(service, publisher), host, port)
    except OSError as exc:
        raise Unavailable(
            f"the local screen cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None
    thread = threading.Thread(
        target=server.serve_forever, args=(0.2,), name="screen-web", daemon=True
    )
    thread.start()
    log.info("local screen on http://%s:%d/", host, server.port)
    return server, thread


def attach(service: EdgeService, publisher: Publisher | None, cfg: Config) -> Callable[[], None]:
    """Start the screen on ``cfg.screen.host/port``; returns the function that stops it."""
    server, thread = start_screen_server(service, publisher, cfg.screen.host, cfg.screen.port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    return stop
