"""Issue 17: the coordinator's dashboard and the hospital's console are read-only pages on loopback. A
page elsewhere that rebinds its DNS name to 127.0.0.1 is refused by the Host check, any method but
GET/HEAD is refused, no path reaches Flower's Control API, and the console will not bind beyond loopback.
Played against real `leuk-server` and `leuk-client` processes; the honest requests still work."""
from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path

import pytest
from cli_errors import assert_one_line_error

from leukfed.common.flower.env import free_port
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.simulations.loopback import ENV, LoopbackFederation, cli, spawn, stop, wait_for

pytestmark = pytest.mark.slow   # a real leuk-server and leuk-client (~60 s in all on 2 busy cores)
CONTROL_PATHS = ("/v1/control/list-runs", "/v1/control/stop-run", "/v1/control/start-run",
                 "/v1/runtime/pull-messages", "/flwr.proto.Control/StopRun", "/flwr.proto.Control/ListRuns")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def ask(port: int, method: str, path: str, host: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.putheader("Content-Length", "2")
    conn.endheaders(b"{}")
    response = conn.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return result


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> int:
    """A real leuk-server with --dashboard, waiting for sites that never come (the run stays open)."""
    federation = LoopbackFederation(tmp_path_factory.mktemp("dashboard"), ["a", "b"])
    port = free_port()
    federation.server("--rounds", "1", "--dashboard", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: "dashboard: http://" in federation.log("server.log"), 60, "the dashboard")
        yield port
    finally:
        federation.close()


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> int:
    """A real leuk-client with --console, waiting for a coordinator that is not there."""
    root = tmp_path_factory.mktemp("console")
    make_synthetic_dataset(root / "data", per_class=3, size=16, seed=1)
    port = free_port()
    proc = spawn([*cli("client.cli"), "--server", f"127.0.0.1:{free_port()}", "--site", "a", "--data",
                  str(root / "data"), "--insecure", "--state", str(root / "site"), "--wait", "300",
                  "--console", str(port)], root / "client.log")
    try:
        wait_for(lambda: "console: http://" in (root / "client.log").read_text(), 60, "the console")
        yield port
    finally:
        stop(proc)


@pytest.mark.parametrize("page", ["dashboard", "console"])
def test_the_pages_answer_gets_with_a_strict_content_security_policy(page, served) -> None:
    port = served(page)
    status, headers, body = ask(port, "GET", "/", host=f"127.0.0.1:{port}")
    assert status == 200 and b"leukfed" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and "access-control-allow-origin" not in headers
    api = "/api/live" if page == "dashboard" else "/api/policy"
    status, headers, body = ask(port, "GET", api, host=f"localhost:{port}")
    assert status == 200 and headers["content-type"] == "application/json" and json.loads(body)


@pytest.mark.parametrize("page", ["dashboard", "console"])
@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1.nip.io:{port}", "localhost:{other}",
                                  "127.0.0.1", None])
def test_a_foreign_host_header_is_refused(page, host, served) -> None:
    """DNS rebinding: the browser sends the attacker's name as Host; the page is never served to it."""
    port = served(page)
    header = None if host is None else host.format(port=port, other=port + 1)
    for path in ("/", "/api/live", "/api/audit", "/static/common.js"):
        status, _, body = ask(port, "GET", path, host=header)
        assert status == 421 and b"leukfed" not in body and b"{" not in body, (path, status)


@pytest.mark.parametrize("page", ["dashboard", "console"])
def test_only_get_and_head_are_served(page, served) -> None:
    port = served(page)
    for method in WRITE_METHODS:
        for path in ("/", "/api/live", "/api/approvals"):
            status, headers, _ = ask(port, method, path, host=f"127.0.0.1:{port}")
            assert status == 405 and headers["allow"] == "GET, HEAD", (method, path, status)
    status, _, _ = ask(port, "PROPFIND", "/", host=f"127.0.0.1:{port}")
    assert status == 501
    status, headers, body = ask(port, "HEAD", "/", host=f"127.0.0.1:{port}")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize("page", ["dashboard", "console"])
def test_no_path_reaches_the_control_api(page, served) -> None:
    port = served(page)
    for path in CONTROL_PATHS + ("/static/../server/cli.py", "/static/%2e%2e/server/cli.py", "/api/../../etc/passwd"):
        for method in ("GET", "POST"):
            status, headers, body = ask(port, method, path, host=f"127.0.0.1:{port}")
            assert status in (404, 405) and "grpc-status" not in headers and b"run" not in body, (method, path)


def test_the_run_is_still_open_after_the_attacks(dashboard) -> None:
    """No request above stopped the run: its ServerApp comes up and waits for the sites."""
    def phase() -> str:
        status, _, body = ask(dashboard, "GET", "/api/live", host=f"127.0.0.1:{dashboard}")
        assert status == 200
        return json.loads(body)["status"].get("phase", "")
    wait_for(lambda: phase() == "waiting for sites", 180, "the run's ServerApp")


@pytest.mark.parametrize("address", ["0.0.0.0", "[::]", "10.20.30.40", "example.org"])
def test_only_loopback_addresses_are_console_addresses(address: str) -> None:
    from leukfed.client.console import console_address
    from leukfed.common.errors import LeukError

    with pytest.raises(LeukError, match="loopback only"):
        console_address(f"{address}:8080")
    assert console_address("8080") == ("127.0.0.1", 8080) and console_address("[::1]:8080") == ("::1", 8080)


@pytest.mark.parametrize("address", ["0.0.0.0:{port}", "example.org:{port}"])
def test_the_console_refuses_to_bind_beyond_loopback(tmp_path: Path, address: str) -> None:
    make_synthetic_dataset(tmp_path / "data", per_class=2, size=16, seed=2)
    port = free_port()
    result = subprocess.run([*cli("client.cli"), "--server", f"127.0.0.1:{free_port()}", "--site", "a", "--data",
                             str(tmp_path / "data"), "--insecure", "--state", str(tmp_path / "site"),
                             "--console", address.format(port=port)],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert_one_line_error(result, "--console serves on loopback only")
    assert not (tmp_path / "site").exists()      # refused before anything started


@pytest.fixture
def served(request):
    """The port of the page under test, by fixture name."""
    return lambda name: request.getfixturevalue(name)
