"""The web side: pages for people, ``/api/*`` for machines (stdlib ``ThreadingHTTPServer``).

API (JSON unless said otherwise):

- ``GET /api/results?limit=50&site=S`` — ``osteofy.result.v1`` objects exactly as published,
  newest ``created_at`` first (limit 1..500);
- ``GET /api/results/{id}`` — ``{"result": …, "received_at": …, "overlay": URL|null,
  "feedback": […]}``;
- ``GET /api/devices`` — one object per device: state (``online``/``offline``, the latter
  from its Last Will), last heartbeat (outbox depth and alarm, oldest queued age, disk free),
  model versions and backends from its status;
- ``GET /api/overlay/{id}`` — the result's PNG overlay;
- ``GET /api/stats`` — this instance's message counters and MQTT state.

Access (:mod:`dashboard.auth`): ``/api/*`` takes ``Authorization: Bearer <token>`` (token from
``dashboard.api_token_file``) or a page session. **When no token file is configured the API
is open to loopback clients only** — keep the default bind address 127.0.0.1. Pages need a
login when a users file is configured; without one they are open to loopback clients only
and say so in a banner.

Every response carries a strict CSP (``default-src 'self'``, no inline script or style),
``nosniff``, no framing, no referrer, ``no-store``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from dashboard import pages, static
from dashboard.auth import SESSION_TTL_S, Access, Session, is_loopback
from dashboard.intake import UUID_RE, level_ok
from dashboard.store import Store, StoreError

log = logging.getLogger(__name__)

COOKIE = "osteofy_session"
MAX_FORM_BYTES = 4096
MAX_LIMIT = 500
CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC = {
    "/static/app.css": ("text/css; charset=utf-8", static.CSS.encode()),
    "/static/app.js": ("text/javascript; charset=utf-8", static.JS.encode()),
}
_RESULT_PAGE = re.compile(r"^/results/([^/]+)$")
_API_ITEM = re.compile(r"^/api/(results|overlay)/([^/]+)$")


class BadRequest(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: App


class _Server6(_Server):
    address_family = socket.AF_INET6


class App:
    """What the handlers need: the store, the access rules and this instance's stats."""

    def __init__(self, store: Store, access: Access, stats: Callable[[], dict]) -> None:
        self.store = store
        self.access = access
        self.stats = stats


class Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "osteofy-dashboard"
    sys_version = ""
    timeout = 15  # seconds a client may take to send its request

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def app(self) -> App:
        return self.server.app

    @property
    def client(self) -> str:
        return str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.client, format % args)

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        cache = (
            "private, max-age=300"
            if ctype.startswith(("text/css", "text/javascript"))
            else "no-store"
        )
        self.send_header("Cache-Control", cache)
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _html(
        self,
        status: int,
        title: str,
        body: str,
        session: Session | None = None,
        active: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        html = pages.layout(
            title,
            body,
            active=active,
            user=session.user if session and not self.app.access.pages_open else None,
            csrf=session.csrf if session else None,
            open_banner=self.app.access.pages_open,
        )
        self._send(status, html.encode(), "text/html; charset=utf-8", headers)

    def _redirect(self, location: str, headers: dict[str, str] | None = None) -> None:
        self._send(
            HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": location, **(headers or {})}
        )

    def _cookie_sid(self) -> str | None:
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
        except CookieError:
            return None
        return morsel.value if morsel else None

    @staticmethod
    def _set_cookie(sid: str, max_age: int = int(SESSION_TTL_S)) -> dict[str, str]:
        return {
            "Set-Cookie": f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
        }

    # --- dispatch ----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch(self._post)

    def _dispatch(self, route: Callable[[str, dict[str, list[str]]], None]) -> None:
        url = urlsplit(self.path)
        try:
            route(url.path, _parse_qs(url.query, 20))
        except BadRequest as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc), url.path)
        except StoreError as exc:
            log.error("store unavailable: %s", exc)
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the database is unavailable", url.path)
        except (ConnectionError, TimeoutError):
            pass  # the client went away
        except Exception:
            log.exception("web: %s failed", url.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", url.path)

    def _error(self, status: int, message: str, path: str) -> None:
        if path.startswith("/api/"):
            self._json(status, {"error": message})
        else:
            self._html(status, str(status), pages.error_page(status, message))

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        if path in STATIC:
            ctype, body = STATIC[path]
            self._send(HTTPStatus.OK, body, ctype)
        elif path.startswith("/api/"):
            self._api(path, query)
        elif path == "/login":
            self._login_form(query)
        else:
            self._page(path, query)

    def _post(self, path: str, query: dict[str, list[str]]) -> None:
        if path == "/login":
            self._login(self._form())
        elif path == "/logout":
            self._logout(self._form())
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found", path)

    # --- API -----------------------------------------------------------------------------------

    def _api(self, path: str, query: dict[str, list[str]]) -> None:
        session = self.app.access.session(self._cookie_sid())
        if not self.app.access.api_allowed(self.client, self.headers.get("Authorization"), session):
            self._json(
                HTTPStatus.UNAUTHORIZED,
                {"error": "a bearer token is required"},
                {"WWW-Authenticate": 'Bearer realm="osteofy"'},
            )
            return
        store = self.app.store
        if path == "/api/results":
            self._json(HTTPStatus.OK, store.results(_limit(query), _site(query)))
        elif path == "/api/devices":
            self._json(HTTPStatus.OK, store.devices())
        elif path == "/api/stats":
            self._json(HTTPStatus.OK, self.app.stats())
        elif (m := _API_ITEM.match(path)) and UUID_RE.match(m.group(2)):
            kind, rid = m.groups()
            if kind == "overlay":
                png = store.overlay(rid)
                if png is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no overlay for this result"})
                else:
                    self._send(HTTPStatus.OK, png, "image/png")
                return
            item = store.result(rid)
            if item is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such result"})
                return
            self._json(
                HTTPStatus.OK,
                {
                    "result": item.payload,
                    "received_at": item.received_at,
                    "overlay": f"/api/overlay/{rid}" if item.has_overlay else None,
                    "feedback": item.feedback,
                },
            )
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    # --- pages ---------------------------------------------------------------------------------

    def _page_session(self, path: str) -> tuple[Session | None, dict[str, str]]:
        """The session for a page, making a local one in open mode; None when refused (sent)."""
        access = self.app.access
        sid = self._cookie_sid()
        session = access.session(sid)
        if session is not None:
            return session, {}
        if not access.pages_open:
            self._redirect("/login?" + urlencode({"next": _local(path)}))
            return None, {}
        if not is_loopback(self.client):
            self._error(
                HTTPStatus.FORBIDDEN, "without a users file only this machine may look", path
            )
            return None, {}
        # Open mode: a session anyway, so the pages' scripts may poll a token-protected API.
        sid = access.new_session("local")
        return access.session(sid), self._set_cookie(sid)

    def _page(self, path: str, query: dict[str, list[str]]) -> None:
        m = _RESULT_PAGE.match(path)
        rid = m.group(1) if m and UUID_RE.match(m.group(1)) else None
        if path not in ("/", "/results") and rid is None:
            self._error(HTTPStatus.NOT_FOUND, "no such page", path)
            return
        session, headers = self._page_session(path)
        if session is None:
            return
        store = self.app.store
        if rid is not None:
            item = store.result(rid)
            if item is None:
                self._error(HTTPStatus.NOT_FOUND, "no such result", path)
                return
            body, title, active = pages.result_page(item), "Result", "results"
        elif path == "/results":
            limit, site = _limit(query), _site(query)
            body = pages.results_page(store.results(limit, site), site, limit)
            title, active = "Results", "results"
        else:
            body, title, active = (
                pages.devices_page(store.devices()),
                "Clinics and devices",
                "devices",
            )
        self._html(HTTPStatus.OK, title, body, session, active, headers)

    # --- login ---------------------------------------------------------------------------------

    def _form(self) -> dict[str, str]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if not 0 <= length <= MAX_FORM_BYTES:
            raise BadRequest("form too large")
        raw = self.rfile.read(length).decode("utf-8", "replace")
        return {k: v[0] for k, v in _parse_qs(raw, 10).items()}

    def _same_origin(self) -> bool:
        """Browsers send Origin on POST: refuse forms posted from another site."""
        origin = self.headers.get("Origin")
        return origin is None or urlsplit(origin).netloc == self.headers.get("Host", "")

    def _login_form(self, query: dict[str, list[str]]) -> None:
        if self.app.access.pages_open:
            self._redirect("/")
            return
        nxt = _local(query.get("next", ["/"])[0])
        self._html(HTTPStatus.OK, "Log in", pages.login_page(None, nxt))

    def _login(self, form: dict[str, str]) -> None:
        access = self.app.access
        nxt = _local(form.get("next", "/"))
        if access.pages_open:
            self._redirect("/")
        elif not self._same_origin():
            self._error(HTTPStatus.FORBIDDEN, "cross-site login refused", "/login")
        elif access.throttled(self.client):
            body = pages.login_page("Too many failed attempts; wait a few minutes.", nxt)
            self._html(HTTPStatus.TOO_MANY_REQUESTS, "Log in", body)
        else:
            sid = access.login(self.client, form.get("user", ""), form.get("password", ""))
            if sid is None:
                log.warning("failed login from %s", self.client)
                body = pages.login_page("Wrong name or password.", nxt)
                self._html(HTTPStatus.UNAUTHORIZED, "Log in", body)
            else:
                self._redirect(nxt, self._set_cookie(sid))

    def _logout(self, form: dict[str, str]) -> None:
        access = self.app.access
        sid = self._cookie_sid()
        session = access.session(sid)
        if session is None or not self._same_origin() or form.get("csrf") != session.csrf:
            self._error(HTTPStatus.FORBIDDEN, "logout refused", "/logout")
            return
        access.end_session(sid)
        self._redirect("/login" if not access.pages_open else "/", self._set_cookie("", 0))


def _parse_qs(text: str, max_fields: int) -> dict[str, list[str]]:
    try:
        return parse_qs(text, max_num_fields=max_fields)
    except ValueError:
        raise BadRequest("too many parameters") from None


def _limit(query: dict[str, list[str]]) -> int:
    text = query.get("limit", ["50"])[0]
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def _site(query: dict[str, list[str]]) -> str | None:
    site = query.get("site", [None])[0]
    if site is not None and not level_ok(site):
        raise BadRequest("site is not a valid site id")
    return site


def _local(path: str) -> str:
    """A redirect target on this server only (no ``//host`` or scheme)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


class WebServer:
    """The HTTP server on its own thread; ``port=0`` picks a free port (tests)."""

    def __init__(self, host: str, port: int, app: App) -> None:
        server_cls = _Server6 if ":" in host else _Server
        self.httpd = server_cls((host, port), Handler)
        self.httpd.app = app
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard-web"
        )
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
