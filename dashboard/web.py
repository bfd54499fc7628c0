"""The web side: pages for people, ``/api/*`` for machines (stdlib ``ThreadingHTTPServer``).

Pages: ``/`` clinics and devices, ``/results`` the live feed (filters: clinic, class, days;
CSV link), ``/results/{id}`` one result, ``/acceptance`` clinical acceptance. The API is
listed in :mod:`dashboard.api`.

Access (:mod:`dashboard.auth`): ``/api/*`` takes ``Authorization: Bearer <token>`` (token from
``dashboard.api_token_file``) or a page session; **with no token file it answers loopback
clients without one** (keep the default bind address 127.0.0.1). Pages need a login; with no
users file they refuse everyone with a page saying how to make an account, unless the
operator chose ``open_pages`` — then loopback clients see them without a login, under a
banner.

Every response carries a strict CSP (``default-src 'self'``, no inline script or style),
``nosniff``, no framing, no referrer to other sites, ``no-store``.
"""

from __future__ import annotations

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
from dashboard.api import Reply, acceptance, api_reply, json_reply
from dashboard.auth import SESSION_TTL_S, Access, Session, is_loopback
from dashboard.intake import UUID_RE
from dashboard.pages_acceptance import acceptance_page
from dashboard.pages_result import result_page
from dashboard.query import MAX_FIELDS, BadRequest, parse_filter
from dashboard.store import Store, StoreError
from edge.audit import audit_event

log = logging.getLogger(__name__)

COOKIE = "osteofy_session"
DEAD_LETTERS_SHOWN = 20  # on the devices page; /api/dead-letters has them all
MAX_FORM_BYTES = 4096
CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": under it browsers send "Origin: null" with every form POST, and the
    # login's same-origin check then refused every real login. "same-origin" still never
    # sends a URL (result ids) to another site.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC = {
    "/static/app.css": ("text/css; charset=utf-8", static.CSS.encode()),
    "/static/app.js": ("text/javascript; charset=utf-8", static.JS.encode()),
}
_RESULT_PAGE = re.compile(r"^/results/([^/]+)$")
_PAGES = ("/", "/results", "/acceptance")


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

    def _head(self, status: int, ctype: str, length: int | None, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        cache = (
            "private, max-age=300"
            if ctype.startswith(("text/css", "text/javascript"))
            else "no-store"
        )
        self.send_header("Cache-Control", cache)
        for k, v in {**SECURITY_HEADERS, **headers}.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self._head(status, ctype, len(body), headers or {})
        self.wfile.write(body)

    def _reply(self, reply: Reply) -> None:
        if isinstance(reply.body, bytes):
            self._send(reply.status, reply.body, reply.ctype, reply.headers)
            return
        # Streamed (HTTP/1.0: the end of the body is the end of the connection). The status
        # line is gone once the first chunk is out: a failure later can only cut it short.
        chunks = iter(reply.body)
        first = next(chunks, b"")  # errors before anything is sent still get a proper answer
        self._head(reply.status, reply.ctype, None, reply.headers)
        self.close_connection = True
        self.wfile.write(first)
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("web: a streamed answer failed midway; cut short")

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
            route(url.path, _parse_qs(url.query, MAX_FIELDS))
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
            self._reply(json_reply(status, {"error": message}))
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
            self._reply(
                json_reply(
                    HTTPStatus.UNAUTHORIZED,
                    {"error": "a bearer token is required"},
                    {"WWW-Authenticate": 'Bearer realm="osteofy"'},
                )
            )
            return
        self._reply(api_reply(self.app.store, self.app.stats, path, query))

    # --- pages ---------------------------------------------------------------------------------

    def _page_session(self, path: str) -> tuple[Session | None, dict[str, str]]:
        """The session for a page, making a local one in open mode; None when refused (sent)."""
        access = self.app.access
        sid = self._cookie_sid()
        session = access.session(sid)
        if session is not None:
            return session, {}
        if access.no_accounts:
            self._html(HTTPStatus.FORBIDDEN, "No staff accounts", pages.no_accounts_page())
            return None, {}
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
        if path not in _PAGES and rid is None:
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
            body, title, active = result_page(item), "Result", "results"
        elif path == "/results":
            filt = parse_filter(query)
            sites = sorted({d["site_id"] for d in store.devices()})
            body = pages.results_page(store.results(filt), filt, sites)
            title, active = "Results", "results"
        elif path == "/acceptance":
            filt = parse_filter(query)
            body = acceptance_page(acceptance(store, filt), filt)
            title, active = "Clinical acceptance", "acceptance"
        else:
            section = pages.dead_letter_section(
                store.dead_letters(limit=DEAD_LETTERS_SHOWN), store.dead_letter_count()
            )
            body, title, active = (
                pages.devices_page(store.devices(), section),
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
        access = self.app.access
        if access.no_accounts:
            self._html(HTTPStatus.FORBIDDEN, "No staff accounts", pages.no_accounts_page())
        elif access.pages_open:
            self._redirect("/")
        else:
            nxt = _local(query.get("next", ["/"])[0])
            self._html(HTTPStatus.OK, "Log in", pages.login_page(None, nxt))

    def _login(self, form: dict[str, str]) -> None:
        access = self.app.access
        nxt = _local(form.get("next", "/"))
        if access.no_accounts:
            self._html(HTTPStatus.FORBIDDEN, "No staff accounts", pages.no_accounts_page())
        elif access.pages_open:
            self._redirect("/")
        elif not self._same_origin():
            self._error(HTTPStatus.FORBIDDEN, "cross-site login refused", "/login")
        elif access.throttled(self.client):
            audit_event("authentication_throttled", client=self.client)
            body = pages.login_page("Too many failed attempts; wait a few minutes.", nxt)
            self._html(HTTPStatus.TOO_MANY_REQUESTS, "Log in", body)
        else:
            sid = access.login(self.client, form.get("user", ""), form.get("password", ""))
            if sid is None:
                log.warning("failed login from %s", self.client)
                audit_event("authentication_failed", client=self.client, method="password")
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
