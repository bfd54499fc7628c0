"""Who may see the dashboard: an API token for machines, a login for people.

- ``/api/*``: ``Authorization: Bearer <token>`` with the token from ``dashboard.api_token_file``
  (or a logged-in page session, so the pages' own scripts can poll the API).
- Pages: users from a file of ``name:pbkdf2_sha256$iterations$salt$hash`` lines — the format
  Django writes (hash = base64 of PBKDF2-HMAC-SHA256 over the UTF-8 salt), so existing tools
  can make them; ``python -m dashboard.auth NAME`` prints one. Sessions live in memory
  (a restart logs everyone out; instances behind one load balancer need sticky sessions).

The rule when something is not configured:

- no token file: ``/api/*`` answers loopback clients without a token (scripts on the same
  machine, the demo) and nobody else — a page session still works from anywhere;
- no users file: the pages refuse everyone, with a page saying how to make an account
  (``python -m dashboard.auth NAME >> users``) — staff log in, there is no anonymous access;
  unless the operator explicitly asks for ``open_pages`` (the one-machine demo): then
  loopback clients see the pages without a login, under a banner saying so.

A reverse proxy on the same host makes every client look like loopback: configure the token
and users file before putting one in front, and never ``open_pages``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from osteofy.errors import UsageError

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000  # beyond this the oldest are dropped (memory stays bounded)
MAX_FAILURES = 10  # login failures per client address within FAILURE_WINDOW_S
FAILURE_WINDOW_S = 600.0


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _pbkdf2(password: str, salt: str, iterations: int) -> str:
    raw = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return base64.b64encode(raw).decode("ascii")


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    salt = secrets.token_urlsafe(16)
    return f"{ALGORITHM}${iterations}${salt}${_pbkdf2(password, salt, iterations)}"


@dataclass(frozen=True)
class _Hash:
    iterations: int
    salt: str
    digest: str

    def verify(self, password: str) -> bool:
        return hmac.compare_digest(_pbkdf2(password, self.salt, self.iterations), self.digest)


def _parse_hash(text: str) -> _Hash:
    algorithm, iterations, salt, digest = text.split("$")
    if algorithm != ALGORITHM or not salt or not digest or "$" in salt:
        raise ValueError(algorithm)
    n = int(iterations)
    if not 1 <= n <= 10_000_000:
        raise ValueError(iterations)
    return _Hash(n, salt, digest)


def load_users(path: Path) -> dict[str, _Hash]:
    """The users file; errors name the line, never its content (it holds hashes)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"users file: {exc.strerror}: {path}") from None
    users: dict[str, _Hash] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        try:
            if not sep or not name:
                raise ValueError(name)
            users[name] = _parse_hash(rest)
        except ValueError:
            raise UsageError(
                f"users file {path}, line {number}: expected name:{ALGORITHM}$N$SALT$HASH"
            ) from None
    if not users:
        raise UsageError(f"users file {path} names no user")
    return users


def load_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"dashboard.api_token_file: {exc.strerror}: {path}") from None
    if len(token) < 16:
        raise UsageError(f"dashboard.api_token_file {path}: the token needs >= 16 characters")
    return token


def _same(a: str, b: str) -> bool:
    """Constant-time comparison that does not leak the length either."""
    return hmac.compare_digest(
        hashlib.sha256(a.encode()).digest(), hashlib.sha256(b.encode()).digest()
    )


@dataclass(frozen=True)
class Session:
    user: str  # "local" for the open loopback mode
    csrf: str
    expires: float


class Access:
    """The decisions; the web handler asks, this answers. Thread-safe."""

    def __init__(
        self, token: str | None, users: dict[str, _Hash] | None, open_pages: bool = False
    ) -> None:
        self.token = token
        self.users = users
        self.open_pages = open_pages
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        # An unknown name costs as much as a known one: no user enumeration by timing.
        cost = max((h.iterations for h in (users or {}).values()), default=1)
        self._dummy = _Hash(cost, "dummy", "")

    @property
    def pages_open(self) -> bool:
        """No login for loopback clients: only without users, and only when asked for."""
        return self.users is None and self.open_pages

    @property
    def no_accounts(self) -> bool:
        """Nobody can log in and the pages are not open: every page says how to fix it."""
        return self.users is None and not self.open_pages

    def bearer_ok(self, header: str | None) -> bool:
        if self.token is None or not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and _same(value.strip(), self.token)

    def api_allowed(self, client: str, header: str | None, session: Session | None) -> bool:
        if session is not None or self.bearer_ok(header):
            return True
        return self.token is None and is_loopback(client)

    # --- sessions ----------------------------------------------------------------------------

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and s.expires < time.time():
                del self._sessions[sid]
                s = None
            return s

    def new_session(self, user: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            live = sorted(
                ((k, v) for k, v in self._sessions.items() if v.expires >= now),
                key=lambda kv: kv[1].expires,
            )
            self._sessions = dict(live[-(MAX_SESSIONS - 1) :])
            self._sessions[sid] = Session(user, secrets.token_urlsafe(24), now + SESSION_TTL_S)
        return sid

    def end_session(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    # --- login -------------------------------------------------------------------------------

    def throttled(self, client: str) -> bool:
        now = time.time()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW_S]
            self._failures[client] = recent
            return len(recent) >= MAX_FAILURES

    def login(self, client: str, user: str, password: str) -> str | None:
        """A new session id, or None (wrong name or password: the same time either way)."""
        if self.users is None:
            return None
        known = self.users.get(user)
        ok = (known or self._dummy).verify(password) and known is not None
        if not ok:
            with self._lock:
                self._failures.setdefault(client, []).append(time.time())
            return None
        return self.new_session(user)


if __name__ == "__main__":
    import getpass

    if len(sys.argv) != 2 or ":" in sys.argv[1]:
        sys.exit("usage: python -m dashboard.auth NAME >> users   (prints a users-file line)")
    pw = getpass.getpass(f"password for {sys.argv[1]}: ")
    if len(pw) < 8 or pw != getpass.getpass("again: "):
        sys.exit("passwords differ or are shorter than 8 characters")
    print(f"{sys.argv[1]}:{hash_password(pw)}")
