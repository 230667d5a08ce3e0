"""Who may call the endpoint: one shared key, checked in front of every route, and no exposure without it.

Why one key, not accounts: the endpoint is a run's models put in front of other people by the person who
trained them; a single secret in an environment variable (`serve.api_key_env`, a Kubernetes Secret in the
cluster manifests) is what the `openai` client already sends (`Authorization: Bearer <key>`) and what an
operator can rotate by restarting. It is read by the ingress replica at start, so it never passes through a
config file, a log line or the app's build arguments.

Why a cookie for the demo: a browser cannot add a Bearer header to the requests Gradio's page makes (its
config, queue, event stream and uploads). `GET /login` is a one-field form; a right key there sets a cookie
and redirects to the demo. The form posts the key rather than taking `?key=` in a link, so the key never
sits in a URL (browser history, proxy access logs, Referer headers). The cookie is
- not the key but an HMAC of it: it opens the demo pages and nothing else (API routes take only the Bearer
  header), so a cookie that leaks from a browser profile is not an API key, and rotating the key voids it;
- HttpOnly (the page's scripts cannot read it) and SameSite=Strict (a page on another site cannot make the
  browser send it, so no cross-site request rides on a logged-in demo; the API does not read cookies at all,
  so it has no CSRF surface either).

`/healthz` stays open (liveness probes carry no key and it says only "ok"); `/login` must be reachable to
log in. Keys are compared with `hmac.compare_digest` (time independent of where they differ).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import os
import warnings
from collections.abc import Iterable
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.api import error_body, route_path, send_body

COOKIE = "inbol_demo"
LOGIN_PATH = "/login"
OPEN_PATHS = frozenset({"/healthz", LOGIN_PATH})
"""Routes answered without a key: the liveness probe and the demo's login form."""
COOKIE_MAX_AGE_S = 7 * 24 * 3600
MAX_FORM_BYTES = 4096
"""The login form's body: one key, URL-encoded."""
_COOKIE_CONTEXT = b"inbol-ray demo cookie v1"


def api_key(env_name: str) -> str | None:
    """The key in `$env_name`, or None when unset or empty (an empty Secret is no key, never "any key")."""
    return os.environ.get(env_name) or None


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address literal (127.0.0.0/8, ::1, IPv4-mapped 127.x). Other names are not
    resolved: what they point to can change after this check."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def check_exposure(host: str, key_env: str, *, insecure: bool) -> None:
    """Refuse to bind a host other machines can reach when no key is set (`SystemExit`, naming the
    variable); with `insecure`, only warn. Loopback needs no key: only this machine's users reach it."""
    if is_loopback(host) or api_key(key_env):
        return
    message = (
        f"--host {host or '(all interfaces)'} lets other machines call every model and the demo without a key: "
        f"set {key_env} to a secret (clients send it as 'Authorization: Bearer <key>')"
    )
    if not insecure:
        raise SystemExit(f"refusing to start: {message}, or pass --insecure to serve without one")
    warnings.warn(f"--insecure: {message}", UserWarning, stacklevel=2)


def cookie_token(key: str) -> str:
    """The demo cookie's value: an HMAC of the key (a leaked cookie is not the API key)."""
    return hmac.new(key.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


def bearer_matches(authorization: str | None, key: str) -> bool:
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), key.encode())


def cookie_matches(cookie_header: str | None, key: str) -> bool:
    for item in (cookie_header or "").split(";"):
        name, _, value = item.strip().partition("=")
        if name == COOKIE and hmac.compare_digest(value.encode(), cookie_token(key).encode()):
            return True
    return False


def login_page(demo_path: str, wrong: bool = False) -> str:
    note = '<p class="wrong">That key is not right.</p>' if wrong else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>inbol-ray: key needed</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28em;margin:4em auto}}
input{{font-size:1em;padding:.4em;width:100%;box-sizing:border-box}}button{{margin-top:.8em;font-size:1em}}
.wrong{{color:#b91c1c}}</style></head><body><h1>Key needed</h1>
<p>This endpoint needs its key (the server's API key) to open the demo at <code>{html.escape(demo_path)}/</code>.</p>
{note}<form method="post" action="{LOGIN_PATH}"><input type="password" name="key" autocomplete="current-password"
autofocus aria-label="key"><button type="submit">Open the demo</button></form></body></html>"""


class KeyAuth:
    """ASGI middleware: every route but `OPEN_PATHS` needs the Bearer key; the demo's pages (`browser_paths`:
    `/` and everything under the demo's path) also take the login cookie, and a browser asking for a page
    without either gets the login form (status 401) instead of JSON."""

    def __init__(
        self, app: ASGIApp, *, key: str, demo_path: str, browser_paths: Iterable[str] = ("/",)
    ) -> None:
        if not key:
            raise ValueError("KeyAuth needs a non-empty key (install it only when a key is set)")
        self.app, self.key, self.demo_path = app, key, demo_path.rstrip("/")
        self.browser_paths = frozenset(browser_paths)

    def _browser_path(self, path: str) -> bool:
        return path in self.browser_paths or path == self.demo_path or path.startswith(self.demo_path + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        headers = Headers(scope=scope)
        if path in OPEN_PATHS and scope["type"] == "http":
            if path == LOGIN_PATH:
                await self._login(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        browser = self._browser_path(path)
        if bearer_matches(headers.get("authorization"), self.key) or (
            browser and cookie_matches(headers.get("cookie"), self.key)
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif browser and scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
            await send_body(send, 401, login_page(self.demo_path).encode(), "text/html; charset=utf-8")
        else:
            body = error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              kind="authentication_error")  # fmt: skip
            await send_body(
                send, 401, json.dumps(body).encode(), "application/json", [(b"www-authenticate", b"Bearer")]
            )

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await send_body(send, 200, login_page(self.demo_path).encode(), "text/html; charset=utf-8")
            return
        form = await _read_form(receive)
        key = (form or {}).get("key", [""])[0]
        if form is None or not hmac.compare_digest(key.encode(), self.key.encode()):
            await send_body(
                send, 401, login_page(self.demo_path, wrong=True).encode(), "text/html; charset=utf-8"
            )
            return
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{COOKIE}={cookie_token(self.key)}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Strict"
        headers = [
            (b"location", (self.demo_path + "/").encode()),
            (b"set-cookie", (cookie + secure).encode()),
        ]
        await send_body(send, 303, b"", "text/plain", headers)


async def _read_form(receive: Receive) -> dict[str, list[str]] | None:
    """The login form's fields, or None when the body is larger than a key can be."""
    body = b""
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > MAX_FORM_BYTES:
            return None
        if not message.get("more_body", False):
            return parse_qs(body.decode("utf-8", "replace"))
