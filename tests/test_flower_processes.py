"""Real SuperLink/SuperNode processes on loopback with TLS and site authentication (no mocks)."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leukfed.client.preflight import check_server
from leukfed.client.supernode import SuperNode
from leukfed.common.errors import LeukError
from leukfed.server.certs import CertsLayout, init_certs
from leukfed.common.flower.env import free_port, toml_pairs, write_flwr_config
from leukfed.server.superlink import CONNECTION, SuperLink
from leukfed.server.tls_certificates import certificate_fingerprint

ECHO_APP = Path(__file__).parent / "fixtures" / "echo_app"
TIMINGS: dict[str, float] = {}


def _our_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (our unique temp folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("flower")
    yield path
    strays = {pid: _cmdline(pid) for pid in _our_processes(str(path))}
    for pid in strays:  # safety net; each fixture below already cleans up after itself
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not strays, f"stray Flower processes left running: {strays}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def pki(root: Path) -> CertsLayout:
    return init_certs(root / "certs", ["localhost"], ["h1", "h2", "rogue"])


@pytest.fixture(scope="module")
def other_ca(root: Path) -> CertsLayout:
    return init_certs(root / "other-certs", ["localhost"], [])


@pytest.fixture(scope="module")
def link(root: Path, pki: CertsLayout) -> Iterator[SuperLink]:
    t0 = time.monotonic()
    sl = SuperLink()
    try:
        sl.start(
            root / "server",
            port=free_port(),
            certs=(pki.ca_cert, pki.server_cert, pki.server_key),
            supernode_auth=True,
            database=root / "server" / "state.db",
        )
        TIMINGS["superlink start -> healthy"] = time.monotonic() - t0
        yield sl
    finally:
        sl.terminate(timeout=5)


def _node(root: Path, link: SuperLink, name: str, key: Path | None, ca: Path) -> SuperNode:
    return SuperNode(
        f"127.0.0.1:{link.port}",
        state_dir=root / "nodes" / name,
        ca=ca,
        private_key=key,
        node_config={"site-name": name, "data-path": str(root / "data dir" / name)},
    )


@pytest.fixture
def nodes(root: Path, pki: CertsLayout, link: SuperLink) -> Iterator[dict[str, SuperNode]]:
    started = {n: _node(root, link, n, pki.site(n).private_key, pki.ca_cert) for n in ("h1", "h2")}
    try:
        yield started
    finally:
        for node in started.values():
            node.stop(timeout=10)


@pytest.mark.slow
def test_superlink_healthy_registration_idempotent(link: SuperLink, pki: CertsLayout) -> None:
    assert link.running() and link.healthy()
    t0 = time.monotonic()
    first = link.register_site(pki.site("h1").public_key, "h1")
    TIMINGS["register one site"] = time.monotonic() - t0
    again = link.register_site(pki.site("h1").public_key, "h1")  # known to sites.json: no register call
    link.sites_path.unlink()
    third = link.register_site(pki.site("h1").public_key, "h1")  # "public key already in use" -> same id
    assert first == again == third
    assert link.sites()["h1"]["node_id"] == first
    listed = {int(str(n["node-id"])): n["status"] for n in link.list_nodes()}
    assert listed[first] in ("registered", "online", "offline")
    record = link.sites_path.read_bytes()
    link.sites_path.write_text("{torn", encoding="utf-8")       # damaged by hand: a clear refusal, not a traceback
    with pytest.raises(LeukError, match="sites.json is unreadable"):
        link.register_site(pki.site("h1").public_key, "h1")
    link.sites_path.write_text('{"h1": {"node_id": "one"}}', encoding="utf-8")
    with pytest.raises(LeukError, match="sites.json is not a JSON object of sites"):
        link.register_site(pki.site("h1").public_key, "h1")
    link.sites_path.write_bytes(record)


@pytest.mark.slow
def test_preflight_accepts_the_superlink(link: SuperLink, pki: CertsLayout) -> None:
    info = check_server("127.0.0.1", link.port, pki.ca_cert)
    assert info.tls and info.fingerprint_sha256 == certificate_fingerprint(pki.server_cert.read_bytes())
    assert "CN=localhost" in info.subject


@pytest.mark.slow
def test_two_sites_join_and_echo_run_completes(link: SuperLink, pki: CertsLayout, nodes: dict[str, SuperNode]) -> None:
    link.register_sites({name: pki.site(name).public_key for name in nodes})
    t0 = time.monotonic()
    for node in nodes.values():
        node.start()
    ids = {name: node.wait_joined(timeout=60) for name, node in nodes.items()}
    TIMINGS["two nodes start -> joined"] = time.monotonic() - t0
    assert ids["h1"] == link.sites()["h1"]["node_id"]

    t0 = time.monotonic()
    run_id = link.submit(ECHO_APP, {"num-rounds": 2, "min-nodes": 2, "round-timeout": 60.0, "greeting": "it's me"})
    seen: list[str] = []
    status = link.wait(run_id, poll_s=3.0, on_poll=seen.append, timeout=150)
    TIMINGS["echo run submit -> finished"] = time.monotonic() - t0
    logs = link.logs(run_id)
    assert status == "finished:completed", (status, link.run_info(run_id), logs)
    assert "echo: it's me, waiting for 2 nodes" in logs  # run-config string with a quote survived
    assert "echo finished: 2 rounds, 2 sites" in logs and "sites=['h1', 'h2']" in logs
    assert link.online_node_ids() >= set(ids.values())
    # Status polls ask in this process (no `flwr` process each time) and see what the CLI prints.
    in_process = link.cli.run_record(CONNECTION, run_id)
    assert in_process is not None and in_process["status"] == status
    by_cli = link.cli.json("ls", "--run-id", str(run_id), CONNECTION)["runs"][0]
    assert {k: v for k, v in in_process.items() if k != "elapsed"} == {k: v for k, v in by_cli.items() if k != "elapsed"}


@pytest.mark.slow
def test_failing_serverapp_is_reported_as_failed(link: SuperLink) -> None:
    """A ServerApp exception ends the run as finished:failed with the exception in status-details."""
    with pytest.raises(LeukError, match=r"\['no-such-key'\] are not declared"):
        link.submit(ECHO_APP, {"no-such-key": 1})
    run_id = link.submit(ECHO_APP, {"min-nodes": 5, "round-timeout": 1.0})
    assert link.wait(run_id, poll_s=2.0, timeout=120) == "finished:failed"
    assert "only 0 of 5 nodes joined" in str(link.run_info(run_id)["status-details"])


@pytest.mark.slow
def test_unregistered_site_key_is_refused_quickly(root: Path, link: SuperLink, pki: CertsLayout) -> None:
    node = _node(root, link, "rogue", pki.site("rogue").private_key, pki.ca_cert)
    t0 = time.monotonic()
    try:
        with pytest.raises(LeukError, match=r"refused this site's key .*it is not registered .*code 2004"):
            node.supervise(max_restarts=3, backoff_s=(0.5,))
    finally:
        node.stop()
    TIMINGS["unregistered key -> LeukError"] = time.monotonic() - t0
    assert TIMINGS["unregistered key -> LeukError"] < 30


@pytest.mark.slow
def test_wrong_ca_fails_with_clear_message(
    root: Path, link: SuperLink, pki: CertsLayout, other_ca: CertsLayout
) -> None:
    t0 = time.monotonic()
    with pytest.raises(LeukError, match=r"not signed by the CA in .*other-certs/ca.crt \(wrong CA file\?\)"):
        check_server("127.0.0.1", link.port, other_ca.ca_cert)
    TIMINGS["preflight wrong CA"] = time.monotonic() - t0

    node = _node(root, link, "h2-wrong-ca", pki.site("h2").private_key, other_ca.ca_cert)
    t0 = time.monotonic()
    try:
        with pytest.raises(LeukError, match=r"presented a certificate not signed by the CA in .*\(wrong CA file\?\)"):
            node.supervise(max_restarts=3, backoff_s=(0.5,))
    finally:
        node.stop()
    TIMINGS["node wrong CA -> LeukError"] = time.monotonic() - t0
    assert TIMINGS["node wrong CA -> LeukError"] < 30


@pytest.mark.slow
def test_supervised_node_rejoins_after_sigkill(root: Path, link: SuperLink, pki: CertsLayout) -> None:
    """An unclean death is refused (2004) until the SuperLink marks the node offline; supervise retries."""
    link.register_site(pki.site("h1").public_key, "h1")
    node = _node(root, link, "h1", pki.site("h1").private_key, pki.ca_cert)
    events: list[tuple[float, str, str]] = []
    stop = threading.Event()
    outcome: list[object] = []

    def supervise() -> None:
        try:
            outcome.append(
                node.supervise(
                    backoff_s=(0.5,),
                    on_event=lambda k, m: events.append((time.monotonic(), k, m)),
                    should_stop=stop.is_set,
                )
            )
        except Exception as err:  # noqa: BLE001 - reported by the assertions below
            outcome.append(err)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: sum(k == "joined" for _, k, _ in events) == 1, 60, events)
        killed_at = time.monotonic()
        os.killpg(node.pid, signal.SIGKILL)  # type: ignore[arg-type]
        _wait_for(lambda: sum(k == "joined" for _, k, _ in events) == 2, 150, events)
        TIMINGS["SIGKILL -> supervised node rejoined"] = events[-1][0] - killed_at
        kinds = [m for _, k, m in events if k == "restarting"]
        assert kinds and "died" in kinds[0]
        assert any("still counts this site as online" in m for m in kinds)
    finally:
        stop.set()
        thread.join(timeout=30)
        node.stop()
    assert len(outcome) == 1 and getattr(outcome[0], "kind", None) == "stopped", outcome


@pytest.mark.slow
def test_orphaned_node_of_a_dead_client_is_replaced(root: Path, link: SuperLink, pki: CertsLayout) -> None:
    """leuk-client killed -9 leaves its SuperNode running; the next start stops it and joins at once."""
    link.register_site(pki.site("h2").public_key, "h2")
    script = f"""
from leukfed.client.supernode import SuperNode
n = SuperNode({f"127.0.0.1:{link.port}"!r}, state_dir={str(root / "nodes" / "h2")!r}, ca={str(pki.ca_cert)!r},
              private_key={str(pki.site("h2").private_key)!r}, node_config={{"site-name": "h2"}})
n.start(); n.wait_joined(60); print(n.pid, flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, check=True)
    orphan = int(out.stdout.split()[-1])
    assert Path(f"/proc/{orphan}").exists()  # its owner is gone, the node lives on
    node = _node(root, link, "h2", pki.site("h2").private_key, pki.ca_cert)
    try:
        t0 = time.monotonic()
        node.start()
        assert (
            not Path(f"/proc/{orphan}/cmdline").exists()
            or b"supernode" not in Path(f"/proc/{orphan}/cmdline").read_bytes()
        )
        node.wait_joined(timeout=60)
        TIMINGS["orphan replaced -> joined"] = time.monotonic() - t0
    finally:
        node.stop()


@pytest.mark.slow
def test_site_rejoins_a_restarted_coordinator_after_a_failed_task(root: Path, pki: CertsLayout) -> None:
    """A failed ClientApp task writes Flower's `Exit Code: 800` block into the node's log; when the coordinator
    then restarts (state in memory: the node gets 401 and exits), the site must rejoin, not give up."""
    port = free_port()
    certs = (pki.ca_cert, pki.server_cert, pki.server_key)
    first = SuperLink().start(root / "restart-server", port=port, certs=certs)
    events: list[tuple[str, str]] = []
    stop = threading.Event()
    outcome: list[object] = []
    node = _node(root, first, "h1-restart", pki.site("h1").private_key, pki.ca_cert)
    try:
        first.register_site(pki.site("h1").public_key, "h1")
        thread = threading.Thread(target=lambda: outcome.append(_supervise(node, events, stop)), daemon=True)
        thread.start()
        _wait_for(lambda: sum(k == "joined" for k, _ in events) == 1, 60, events)
        # A task process shares the node's log: here is the real block Flower's flwr_exit writes for a failed task.
        task = ("from flwr.supercore.exit import ExitCode, flwr_exit; "
                "flwr_exit(ExitCode.TASK_PROC_EXCEPTION, 'ClientApp raised an exception', emit_telemetry=False)")
        with node.log_path.open("ab") as log:
            failed = subprocess.run([sys.executable, "-c", task], stdout=log, stderr=subprocess.STDOUT, timeout=60)
        assert failed.returncode == 1 and "Exit Code: 800" in node.attempt_log()
        first.terminate(timeout=20)                                   # the coordinator restarts ...
        second = SuperLink().start(root / "restart-server", port=port, certs=certs)
        try:
            second.register_site(pki.site("h1").public_key, "h1")     # ... and registers its sites again
            _wait_for(lambda: sum(k == "joined" for k, _ in events) == 2 or outcome, 150, events)
            assert not outcome, outcome                               # supervise did not give up
            assert any(k == "restarting" for k, _ in events), events
        finally:
            stop.set()
            thread.join(timeout=30)
            second.terminate(timeout=10)
    finally:
        stop.set()
        node.stop()
        first.terminate(timeout=5)
    assert len(outcome) == 1 and getattr(outcome[0], "kind", None) == "stopped", outcome


def test_a_failed_tasks_exit_block_is_not_the_nodes(tmp_path: Path) -> None:
    """Tasks share the node's log: Flower's exit block of a failed task (800) must not read as the node's
    own fatal exit; the node's own block (303: auth without TLS) still does."""
    node = SuperNode("127.0.0.1:1", state_dir=tmp_path, ca=None, private_key=None, insecure=True)
    node.log_path.parent.mkdir(parents=True, exist_ok=True)

    def flower_exit(code: str) -> None:
        script = (f"from flwr.supercore.exit import ExitCode, flwr_exit; "
                  f"flwr_exit(ExitCode.{code}, 'real Flower exit block', emit_telemetry=False)")
        with node.log_path.open("ab") as log:
            subprocess.run([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, timeout=60)

    flower_exit("TASK_PROC_EXCEPTION")
    assert "Exit Code: 800" in node.attempt_log()
    assert node.classify(1).kind == "crashed" and node.classify(0).kind == "graceful"
    flower_exit("SUPERNODE_STARTED_WITHOUT_TLS_BUT_NODE_AUTH_ENABLED")
    fatal = node.classify(1)
    assert fatal.kind == "fatal" and "exit code 303" in fatal.message


def _supervise(node: SuperNode, events: list[tuple[str, str]], stop: threading.Event) -> object:
    try:
        return node.supervise(backoff_s=(0.5,), on_event=lambda k, m: events.append((k, m)), should_stop=stop.is_set)
    except Exception as err:  # noqa: BLE001 - reported by the assertions
        return err


def _wait_for(cond: Callable[[], bool], timeout: float, events: object) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out; events: {events}"
        time.sleep(0.2)


def test_supernode_runs_flowers_node_loop_with_shorter_waits() -> None:
    """The node notices messages within POLL_S instead of Flower's 3 s (patched in its own process)."""
    code = ("import time; from leukfed.common.flower.patches import apply_patches; apply_patches('supernode'); "
            "from flwr.supernode import start_client_internal as node; t = time.monotonic(); node.time.sleep(3); "
            "poll = time.monotonic() - t; t = time.monotonic(); node.time.sleep(0.5); "
            "print(poll, time.monotonic() - t, node.pull_objects.keywords['initial_backoff'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    poll, local_wait, backoff = (float(x) for x in out.split())
    assert poll < 1.5 and local_wait < 0.4 and backoff == 0.1
    node = SuperNode("127.0.0.1:1", state_dir=Path("unused"), ca=None, private_key=None, insecure=True)
    assert node.command(9999)[:3] == [sys.executable, "-m", "leukfed.common.flower.supernode_process"]


def test_clientapp_task_pulls_the_message_arrays_promptly() -> None:
    """A task starts before the SuperNode has the message's arrays; it retries after 0.05 s, not Flower's 1 s."""
    code = ("from leukfed.client.approval import prepared_flwr_clientapp; prepared_flwr_clientapp(lambda fab: None); "
            "from flwr.supernode.runtime import run_clientapp as r; "
            "k = r.pull_and_inflate_object_from_tree.keywords; print(k['initial_backoff'], k['backoff_cap'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert [float(x) for x in out.split()] == [0.05, 0.2]


def test_config_pairs_survive_flowers_own_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    values = {"data-path": r"C:\data dir\h1", "site-name": "h1", "quote": "it's", "n": 3, "lr": 1e-05, "on": False}
    assert parse_config_args([toml_pairs(values)]) == values
    with pytest.raises(LeukError, match="cannot contain both"):
        toml_pairs({"bad": 'it\'s "quoted"'})
    conf = write_flwr_config(tmp_path, {"leukfed": {"address": "127.0.0.1:9092", "root-certificates": "rel/ca.crt"}})
    text = conf.read_text()
    assert 'default = "leukfed"' in text and f'root-certificates = "{Path("rel/ca.crt").resolve()}"' in text


def test_preflight_closed_port() -> None:
    port = free_port()
    with pytest.raises(LeukError, match=rf"cannot reach the federation server at 127.0.0.1:{port}: connection refused"):
        check_server("127.0.0.1", port, None)


def test_preflight_plain_tcp_listener_is_not_a_superlink(pki: CertsLayout) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(LeukError, match=rf"127.0.0.1:{port} is not a Flower SuperLink \(.*wrong port\?\)"):
            check_server("127.0.0.1", port, pki.ca_cert, timeout=2)
        TIMINGS["preflight silent TCP port"] = time.monotonic() - t0


def test_preflight_other_https_server_is_not_a_superlink(pki: CertsLayout) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeukError, match="answers /health but is not a Flower SuperLink"):
            check_server("127.0.0.1", server.server_address[1], pki.ca_cert, timeout=3)
    finally:
        server.shutdown()
        server.server_close()


def test_superlink_port_in_use_is_reported(root: Path, pki: CertsLayout) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LeukError, match=f"port {port} on 127.0.0.1 is already in use"):
            SuperLink().start(root / "busy", port=port, certs=(pki.ca_cert, pki.server_cert, pki.server_key))


def test_superlink_bad_certs_are_reported(root: Path, pki: CertsLayout, other_ca: CertsLayout) -> None:
    with pytest.raises(LeukError, match="is not the private key"):
        SuperLink().start(root / "bad", port=free_port(), certs=(pki.ca_cert, pki.server_cert, other_ca.server_key))
    with pytest.raises(LeukError, match="site authentication needs TLS"):
        SuperLink().start(root / "bad", port=free_port(), insecure=True, supernode_auth=True)


def test_report_timings() -> None:
    """Not a check: prints what the process tests measured (pytest -s)."""
    for name, seconds in TIMINGS.items():
        print(f"timing: {name}: {seconds:.1f} s")
