"""The review page's guard: every request passes here before any route sees it.

* Host header: only the names this server was started under (DNS rebinding: a page on another site
  whose name is pointed at 127.0.0.1 sends its own name as Host, and is refused).
* Access token: a random token is in the URL that ``lorakit review`` prints; the first visit turns it
  into an HttpOnly, SameSite=Strict cookie. Without it nothing is served (other users and programs
  on the machine, and anyone on the network when binding elsewhere was allowed).
* Writes (POST): same-origin only (``Origin`` and ``Sec-Fetch-Site``), a CSRF token header that only
  the page itself knows, a JSON body, at most ``MAX_BODY`` bytes.
* Every answer carries a strict Content-Security-Policy, no framing, no sniffing.
"""
from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

TOKEN_COOKIE = "lorakit_review"
CSRF_HEADER = "x-csrf-token"
MAX_BODY = 1 << 20
SAFE_METHODS = {"GET", "HEAD"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host header values this server answers to; None means any (a wildcard bind: the token guards)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = set(LOOPBACK_NAMES) if host in ("127.0.0.1", "localhost", "::1") else set()
    names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return {f"{n}:{port}".lower() for n in names} | ({n.lower() for n in names} if port == 80 else set())


class Guard:
    """ASGI middleware enforcing the rules in this module's docstring."""

    def __init__(self, app, token: str, csrf_token: str, hosts: set[str] | None):
        self.app = app
        self.token = token
        self.csrf_token = csrf_token
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                return await self.app(scope, receive, send)
            return  # no websockets
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        problem = self._check(scope, headers)
        if problem is not None:
            status, message = problem
            return await _send_error(send, status, message)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "").strip().lower()
        if not host:
            return 400, "missing Host header"
        if self.hosts is not None and host not in self.hosts:
            return 403, (f"Host {host!r} is not this server (it answers to {', '.join(sorted(self.hosts))}); "
                         "refused to protect against DNS rebinding")
        if not self._has_token(scope, headers):
            return 401, ("access token missing or wrong: open the URL that `lorakit review` printed "
                         "(it ends in ?token=...)")
        method = scope["method"]
        if method in SAFE_METHODS:
            return None
        if method != "POST":
            return 405, f"method {method} is not allowed"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return 403, f"cross-site request refused (Sec-Fetch-Site: {site})"
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or parts.netloc.lower() != host or parts.scheme not in ("http", "https"):
                return 403, f"cross-origin request refused (Origin {origin!r} is not http://{host})"
        if not hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(), self.csrf_token.encode()):
            return 403, "missing or wrong CSRF token (reload the page)"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "the body must be JSON (Content-Type: application/json)"
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "bad Content-Length"
            if int(length) > MAX_BODY:
                return 413, f"request body over {MAX_BODY} bytes"
        return None

    def _has_token(self, scope, headers: dict[str, str]) -> bool:
        expected = self.token.encode()
        candidates = []
        if "x-review-token" in headers:
            candidates.append(headers["x-review-token"])
        if "cookie" in headers:
            cookie = SimpleCookie()
            try:
                cookie.load(headers["cookie"])
            except Exception:
                pass
            if TOKEN_COOKIE in cookie:
                candidates.append(cookie[TOKEN_COOKIE].value)
        query = scope.get("query_string", b"").decode("latin-1")
        if "token=" in query:
            candidates.extend(parse_qs(query).get("token", []))
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")] + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": body})
