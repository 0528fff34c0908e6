"""Attack: an outsider holding only ca.crt and the public address drives the SuperLink's control plane
with the real `flwr` CLI (list runs, list/register nodes, stop the run, submit a ServerApp) or joins with
an unregistered key. All of it must fail, while sites join and leuk-server drives runs over its admin address."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leukfed.client.supernode import SuperNode
from leukfed.common.errors import LeukError
from leukfed.common.flower.cli import FlwrCli, parse_json
from leukfed.common.flower.env import free_port, write_flwr_config
from leukfed.server.certs import CertsLayout, init_certs
from leukfed.server.superlink import SuperLink

ECHO_APP = Path(__file__).resolve().parents[1] / "fixtures" / "echo_app"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    return init_certs(tmp_path_factory.mktemp("pki"), ["localhost"], ["h1", "outsider"])


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory, pki: CertsLayout) -> Iterator[SuperLink]:
    sl = SuperLink()
    try:
        sl.start(tmp_path_factory.mktemp("coordinator"), host="127.0.0.1", port=free_port(),
                 certs=(pki.ca_cert, pki.server_cert, pki.server_key), supernode_auth=True)
        yield sl
    finally:
        sl.terminate(timeout=5)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, link: SuperLink, pki: CertsLayout) -> Iterator[int]:
    """The honest path: leuk-server registers h1 over the admin address, and h1 joins on the public one."""
    node_id = link.register_site(pki.site("h1").public_key, "h1")
    node = SuperNode(link.address, state_dir=tmp_path_factory.mktemp("h1"), ca=pki.ca_cert,
                     private_key=pki.site("h1").private_key, node_config={"site-name": "h1"})
    try:
        node.start()
        assert node.wait_joined(timeout=60) == node_id
        yield node_id
    finally:
        node.stop(timeout=10)


@pytest.fixture(scope="module")
def outsider(tmp_path_factory: pytest.TempPathFactory, link: SuperLink, pki: CertsLayout) -> FlwrCli:
    """The real `flwr` CLI of someone who holds ca.crt and knows the public address, nothing else."""
    home = tmp_path_factory.mktemp("outsider")
    write_flwr_config(home, {"target": {"address": link.address, "root-certificates": str(pki.ca_cert)}})
    return FlwrCli(home)


def _refused(cli: FlwrCli, *args: str) -> str:
    proc = cli.raw(*args, "--format", "json")
    data = parse_json(proc.stdout)
    assert data is not None and data.get("success") is False, (args, proc.stdout, proc.stderr)
    return str(data.get("error-message", ""))


def test_outsider_cannot_use_the_control_plane(link: SuperLink, site: int, outsider: FlwrCli, pki: CertsLayout) -> None:
    run_id = link.submit(ECHO_APP, {"num-rounds": 1, "min-nodes": 2, "round-timeout": 90.0})  # waits for a 2nd site
    link.wait_healthy(10)
    nodes_before = {str(n["node-id"]) for n in link.list_nodes()}

    for args in (["ls", "target"], ["ls", "--run-id", str(run_id), "target"], ["supernode", "list", "target"],
                 ["supernode", "register", str(pki.site("outsider").public_key), "target"],
                 ["supernode", "unregister", str(site), "target"], ["stop", str(run_id), "target"],
                 ["run", str(ECHO_APP), "target"]):
        message = _refused(outsider, *args)
        assert "forbidden: this address serves only the Fleet API" in message, (args, message)
        assert str(site) not in message and "h1" not in message, message   # nothing leaked in the refusal

    assert {str(n["node-id"]) for n in link.list_nodes()} == nodes_before        # nothing registered/removed
    assert not link.status(run_id).startswith("finished")                          # the run was not stopped
    assert len(link.cli.json("ls", "leukfed")["runs"]) == 1                        # and none was submitted
    link.stop_run(run_id)                                                          # the admin can
    assert link.wait(run_id, poll_s=1.0, timeout=60) == "finished:stopped"


def test_public_socket_answers_403_to_control_and_runtime(link: SuperLink, pki: CertsLayout) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/pull-messages"):
        conn = http.client.HTTPSConnection("127.0.0.1", link.port, context=ctx, timeout=10)
        conn.request("POST", path, body=b"{}", headers={"content-type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 403 and "Fleet API" in body["detail"], (path, resp.status, body)
    conn = http.client.HTTPSConnection("127.0.0.1", link.admin_port, context=ctx, timeout=10)
    conn.request("POST", "/v1/control/list-runs", body=b"{}", headers={"content-type": "application/json"})
    assert conn.getresponse().status != 403   # the admin socket serves Flower's whole API
    conn.close()


def test_unregistered_key_cannot_join(tmp_path: Path, link: SuperLink, pki: CertsLayout) -> None:
    node = SuperNode(link.address, state_dir=tmp_path / "outsider-node", ca=pki.ca_cert,
                     private_key=pki.site("outsider").private_key, node_config={"site-name": "outsider"})
    t0 = time.monotonic()
    try:
        with pytest.raises(LeukError, match=r"refused this site's key .*not registered"):
            node.supervise(max_restarts=2, backoff_s=(0.5,))
    finally:
        node.stop()
    assert time.monotonic() - t0 < 60
    assert all(n.get("owner-name") != "outsider" for n in link.list_nodes())


def test_admin_port_listens_on_loopback_only(link: SuperLink) -> None:
    assert link.admin_address.startswith("127.0.0.1:") and link.admin_port != link.port
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {row.split()[1] for row in listening if row.split()[3] == "0A"}   # state LISTEN
    assert f"0100007F:{link.admin_port:04X}" in local
    assert f"00000000:{link.admin_port:04X}" not in local
