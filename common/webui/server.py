"""A read-only HTTP server for leukfed's pages: GET/HEAD only, packaged assets, strict CSP, Host check."""
from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from leukfed.common.errors import LeukError

STATIC = Path(__file__).resolve().parent / "static"
ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\.(js|css|svg|html)")
CONTENT_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
                 "svg": "image/svg+xml", "html": "text/html; charset=utf-8", "json": "application/json"}
# Only this origin's own files and JSON; no inline script or style, no frames, no forms, no plugins.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class WebApp:
    """One page (a packaged HTML file) and the JSON documents it reads: `/api/<name>` -> producer()."""

    page: str
    api: Mapping[str, Callable[[], Any]] = field(default_factory=dict)


def parse_listen(text: str, option: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` -> (host, port); LeukError naming `option` otherwise."""
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise LeukError(f"{option} expects [HOST:]PORT with a port in 0-65535 (0: any free port), got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_host(header: str | None, bind_host: str, port: int) -> bool:
    """A DNS-rebinding page reaches us under ITS name: accept only loopback names, IP literals when bound
    to every interface, and the name we were told to listen on, each with our port."""
    if not header:
        return False
    parsed = urlsplit(f"//{header}")
    try:
        name, header_port = (parsed.hostname or "").lower(), parsed.port
    except ValueError:
        return False
    if header_port != port:
        return False
    if name in LOOPBACK_NAMES or name == bind_host.lower():
        return True
    if bind_host in ("0.0.0.0", "::"):
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def plain(value: Any) -> Any:
    """JSON a browser reads as written: NaN and infinities become null, integers beyond 2**53 (Flower's
    run and node ids) text, tuples lists, other objects text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):   # numpy scalars
        return plain(value.item())
    return str(value)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "leukfed"
    sys_version = ""
    timeout = 15          # a client that stops sending does not hold a thread for long
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:   # noqa: N802 - the stdlib's naming
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _answer(self, head: bool) -> None:
        if not allowed_host(self.headers.get("Host"), self.server.bind_host, self.server.server_port):
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unknown host\n", "text/plain; charset=utf-8", head=head)
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send_asset(self.server.app.page, head)
        elif path.startswith("/static/") and path[8:] in self.server.assets:
            self._send_asset(path[8:], head)
        elif path.startswith("/api/") and path[5:] in self.server.app.api:
            self._send_json(self.server.app.api[path[5:]], head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head=head)

    def _send_asset(self, name: str, head: bool) -> None:
        body = (STATIC / name).read_bytes()
        self._send(HTTPStatus.OK, body, CONTENT_TYPES[name.rsplit(".", 1)[1]], head=head)

    def _send_json(self, produce: Callable[[], Any], head: bool) -> None:
        try:
            status, document = HTTPStatus.OK, produce()
        except LeukError as exc:
            status, document = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one line for the page, never a traceback
            status, document = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"[:300]}
        body = json.dumps(plain(document), allow_nan=False).encode()
        self._send(status, body, CONTENT_TYPES["json"], head=head)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, head: bool = False,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: no line per request
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, app: WebApp) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.bind_host, self.app = host, app
        self.assets = frozenset(p.name for p in STATIC.iterdir() if ASSET_NAME.fullmatch(p.name))
        super().__init__((host, port), _Handler)


class ReadOnlyServer:
    """Serve `app` on host:port from a daemon thread until stop() (or the process ends)."""

    def __init__(self, app: WebApp, host: str, port: int) -> None:
        try:
            self._server = _Server(host, port, app)
        except OSError as exc:
            raise LeukError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="leukfed-web", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.bind_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.port}/"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
