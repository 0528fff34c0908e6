"""Check, before starting a SuperNode, that HOST:PORT is reachable, trusted and really a Flower SuperLink."""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from leukfed.common.errors import LeukError
from leukfed.common.flower.env import http_get

# X509_V_ERR_* codes from OpenSSL's verify step
_EXPIRED, _NOT_YET_VALID, _HOST_MISMATCH, _IP_MISMATCH = 10, 9, 62, 64


@dataclass(frozen=True)
class ServerInfo:
    """What the client learned about the federation server (goes to the site's audit log)."""

    fingerprint_sha256: str  # of the server certificate's DER bytes; "" without TLS
    subject: str  # certificate subject, RFC 4514; "" without TLS
    address: str  # HOST:PORT as checked
    tls: bool


def check_server(host: str, port: int, ca_path: str | Path | None, timeout: float = 5.0) -> ServerInfo:
    """TCP connect, TLS handshake verified against `ca_path` for `host`, then GET /health; LeukError on failure.

    `ca_path=None` checks an insecure (plain HTTP) SuperLink.
    """
    where = f"{host}:{port}"
    ctx = _tls_context(ca_path) if ca_path is not None else None
    sock = _connect(host, port, timeout)
    der = b""
    try:
        if ctx is not None:
            sock = _handshake(ctx, sock, host, where, Path(str(ca_path)))
            der = sock.getpeercert(binary_form=True) or b""
        _check_health(sock, host, port, where, plain=ctx is None)
    finally:
        sock.close()
    _check_is_flower(host, port, ctx, where, timeout)
    if ctx is None:
        return ServerInfo("", "", where, tls=False)
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return ServerInfo(hashlib.sha256(der).hexdigest(), subject, where, tls=True)


def _tls_context(ca_path: str | Path) -> ssl.SSLContext:
    ca = Path(ca_path).expanduser()
    if not ca.is_file():
        raise LeukError(f"CA certificate {ca} not found (the ca.crt from this site's folder)")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError:
        raise LeukError(f"{ca} is not a PEM CA certificate (use the ca.crt from this site's folder)") from None


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    where = f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise LeukError(
            f"cannot reach the federation server at {where}: connection refused — "
            "is the address/port right and leuk-server running?"
        ) from None
    except socket.gaierror:
        raise LeukError(f"cannot resolve the federation server name {host!r}: check the address (DNS/hosts)") from None
    except TimeoutError:
        raise LeukError(
            f"cannot reach the federation server at {where}: no answer within {timeout:.0f} s — "
            "a firewall may block the port, or the address is wrong"
        ) from None
    except OSError as err:
        raise LeukError(f"cannot reach the federation server at {where}: {err.strerror or err}") from None


def _handshake(ctx: ssl.SSLContext, sock: socket.socket, host: str, where: str, ca: Path) -> ssl.SSLSocket:
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as err:
        raise LeukError(_verify_message(err, host, where, ca)) from None
    except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
        pass
    if _answers_plain_http(host, int(where.rsplit(":", 1)[1])):
        raise LeukError(f"the server at {where} does not use TLS (a SuperLink started insecure?)")
    raise LeukError(f"the server at {where} is not a Flower SuperLink (no TLS handshake: wrong port?)")


def _answers_plain_http(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (http.client.HTTPException, OSError):
        return False
    finally:
        conn.close()


def _verify_message(err: ssl.SSLCertVerificationError, host: str, where: str, ca: Path) -> str:
    if err.verify_code in (_HOST_MISMATCH, _IP_MISMATCH):
        return (
            f"the server at {where} has a certificate that is not valid for the name {host!r}: use one of the "
            "names/IPs given to `leuk certs init --server-name`"
        )
    if err.verify_code in (_EXPIRED, _NOT_YET_VALID):
        return f"the server at {where} has an expired or not yet valid certificate: check both machines' clocks"
    return f"the server at {where} presented a certificate not signed by the CA in {ca} (wrong CA file?)"


def _check_health(sock: socket.socket, host: str, port: int, where: str, *, plain: bool) -> None:
    conn = http.client.HTTPConnection(host, port)
    conn.sock = sock  # reuse the verified connection
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        status = resp.status
    except (http.client.HTTPException, OSError):
        hint = " or it uses TLS: give the CA certificate" if plain else ""
        raise LeukError(
            f"the server at {where} is not a Flower SuperLink (no HTTP answer: wrong port?{hint})"
        ) from None
    if status != 200:
        raise LeukError(f"the server at {where} is not a Flower SuperLink (GET /health answered {status}: wrong port?)")


def _check_is_flower(host: str, port: int, ctx: ssl.SSLContext | None, where: str, timeout: float) -> None:
    """A SuperLink's Fleet API answers GET on a POST-only route with 405: a generic web server does not."""
    try:
        status, _, allow = http_get(host, port, "/v1/fleet/get-run", ctx, timeout)
        ok = status == 405 and "POST" in allow
    except (http.client.HTTPException, OSError):
        ok = False
    if not ok:
        raise LeukError(f"the server at {where} answers /health but is not a Flower SuperLink (wrong port?)")
