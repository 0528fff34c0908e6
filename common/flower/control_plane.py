"""Flower's SuperLink app served twice: whole on a loopback admin socket, Fleet-only on the public socket.

Flower serves Fleet (/v1/fleet/*), Control (/v1/control/*: start-run, register-node, stop-run, ...),
the Runtime API (the ServerApp's) and /health on ONE uvicorn port. leuk-server starts the SuperLink on
`--host 127.0.0.1 --port ADMIN` (Flower's own launcher and leuk-server's `flwr` CLI use that), and the
row "control-plane-closed" of patches.py replaces the `uvicorn.run` call so that the same app, in the
same event loop and lifespan, also listens on the public address, where only `/v1/fleet/*` (POST; a
GET gets Flower's 405) and `GET /health` pass; anything else gets 403 (client addresses in LEUK_SUPERLINK_ADMIN_ALLOW excepted).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

PUBLIC_ENV = "LEUK_SUPERLINK_PUBLIC_ADDRESS"   # "HOST:PORT" where sites connect
ALLOW_ENV = "LEUK_SUPERLINK_ADMIN_ALLOW"       # "IP,IP": clients that may use Control on the public socket

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
_FLEET_PATH = re.compile(r"/v1/fleet/[A-Za-z0-9_\-]+")
FORBIDDEN_BODY = json.dumps({"detail": "forbidden: this address serves only the Fleet API to sites"}).encode()


def public_request_allowed(method: str, path: str) -> bool:
    """What a site needs: Fleet calls (all POST) and the health probe. A GET of a Fleet route is let through
    too: Flower answers it 405 (POST only), which is how `leuk-client`'s preflight recognises a SuperLink."""
    if _FLEET_PATH.fullmatch(path) is not None:
        return method in ("POST", "GET", "HEAD")
    return method in ("GET", "HEAD") and path == "/health"


class FleetOnlyOnPublicPort:
    """Pure ASGI middleware: requests that arrived on `public_port` pass only if `public_request_allowed`
    or their client address is in `admin_allow`; the others get 403 (HTTP) or a closed websocket.
    The connection's local port (scope["server"]) tells the sockets apart; lifespan passes through."""

    def __init__(self, app: ASGIApp, public_port: int, admin_allow: Iterable[str] = ()) -> None:
        self.app = app
        self.public_port = int(public_port)
        self.admin_allow = frozenset(admin_allow)

    def _refused(self, scope: Scope) -> bool:
        server = scope.get("server") or (None, None)
        if server[1] != self.public_port:
            return False
        client = (scope.get("client") or ("",))[0]
        if client in self.admin_allow:
            return False
        if scope["type"] == "websocket":
            return True
        return not public_request_allowed(scope.get("method", ""), scope.get("path", ""))

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._refused(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(FORBIDDEN_BODY)).encode())]})
            await send({"type": "http.response.body", "body": FORBIDDEN_BODY})


def split_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket as uvicorn would open it (address reuse; IPv6 for a v6 host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class DualSocketUvicorn:
    """What Flower's SuperLink module sees as `uvicorn`: `run` also serves the public socket (when
    PUBLIC_ENV is set) through FleetOnlyOnPublicPort; everything else is the real uvicorn."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def run(self, app: Any, *, host: str, port: int, **kwargs: Any) -> None:
        public = os.environ.get(PUBLIC_ENV, "")
        if not public:
            return self._real.run(app, host=host, port=port, **kwargs)
        public_host, public_port = split_address(public)
        allow = [ip.strip() for ip in os.environ.get(ALLOW_ENV, "").split(",") if ip.strip()]
        guarded = FleetOnlyOnPublicPort(app, public_port, allow)
        # No X-Forwarded-For: the client address an allow-list decision reads is the TCP peer's.
        config = self._real.Config(guarded, host=host, port=port, proxy_headers=False, **kwargs)
        sockets = [listening_socket(host, port), listening_socket(public_host, public_port)]
        self._real.Server(config).run(sockets=sockets)
        return None


def serve_public_socket(flower_uvicorn: Any) -> Any:
    """Patch function of the row "control-plane-closed" (idempotent)."""
    if isinstance(flower_uvicorn, DualSocketUvicorn):
        return flower_uvicorn
    if not callable(getattr(flower_uvicorn, "run", None)) or not hasattr(flower_uvicorn, "Server"):
        raise TypeError("Flower's SuperLink module no longer holds the uvicorn module")
    return DualSocketUvicorn(flower_uvicorn)
