"""Every row of the Flower patch table still matches the installed Flower: the target exists, Flower's
caller looks it up at call time, and after apply a real call reaches leukfed's replacement."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from leukfed.common.errors import LeukError
from leukfed.common.flower import control_plane, patches
from leukfed.common.flower.patches import PATCHES, check_flower_version, install, resolve

PROCESS_ROWS = [row for row in PATCHES if row.kind == "patch"]


def _looks_up(func: object, name: str) -> bool:
    """True if `func` (or a function nested in it) reads the global/attribute `name` when it runs."""
    todo = [func.__code__]  # type: ignore[attr-defined]
    while todo:
        code = todo.pop()
        if name in code.co_names:
            return True
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Patches change module state: each check runs in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_installed_flower_is_a_checked_version() -> None:
    assert check_flower_version() in patches.KNOWN_VERSIONS
    assert patches.KNOWN_VERSIONS == ("1.41.0", "1.42.0")


@pytest.mark.parametrize("row", PATCHES, ids=lambda r: r.name)
def test_row_target_exists_and_flowers_caller_resolves_it_at_call_time(row: patches.Patch) -> None:
    owner, attr, _ = resolve(row.target)
    _, _, caller = resolve(row.caller)
    assert row.reason and row.process and row.versions == patches.KNOWN_VERSIONS
    if row.kind == "read":
        return
    assert isinstance(owner, types.ModuleType)
    assert caller.__globals__ is vars(owner), f"{row.caller} does not read {row.target}'s module"
    assert _looks_up(caller, attr), f"{row.caller} no longer looks up {attr!r} when it runs"


def test_a_missing_target_is_loud() -> None:
    with pytest.raises(LeukError, match="has no flwr.superlink.main:no_such_name"):
        resolve("flwr.superlink.main:no_such_name")
    with pytest.raises(LeukError, match="no Flower patch named"):
        install("no-such-row", lambda original: original)


FAKE_VERSION = "import importlib.metadata as m; m.version = lambda name: '9.9.9'; "


@pytest.mark.parametrize("entry", [
    "from leukfed.common.flower.superlink_process import main; main()",
    "from leukfed.common.flower.supernode_process import main; main()",
    "from leukfed.client.fork_exec import main; main(['--runtime-api-address', '127.0.0.1:1', '--approvals', 'a', "
    "'--launcher', 'l', '--parent-pid', '1'])",
])
def test_unlisted_flower_version_is_refused_in_one_line(entry: str) -> None:
    refused = _run(FAKE_VERSION + entry)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert refused.stderr.startswith("error: Flower 9.9.9 is not a version leukfed was checked on")


def test_untested_flower_runs_when_asked() -> None:
    code = FAKE_VERSION + "from leukfed.common.flower.patches import apply_patches; print(apply_patches('supernode'))"
    forced = _run(code, {patches.UNTESTED_ENV: "1"})
    assert forced.returncode == 0 and forced.stdout.strip() == "9.9.9", forced.stderr


def test_library_entry_points_refuse_an_unlisted_flower(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from leukfed.client.supernode import SuperNode
    from leukfed.server.superlink import SuperLink

    monkeypatch.setattr(patches, "version", lambda name: "9.9.9")
    with pytest.raises(LeukError, match="^Flower 9.9.9 is not a version leukfed was checked on"):
        SuperLink().start(tmp_path / "link", insecure=True, supernode_auth=False)
    with pytest.raises(LeukError, match="^Flower 9.9.9 is not a version leukfed was checked on"):
        SuperNode("127.0.0.1:1", state_dir=tmp_path / "node", ca=None, private_key=None, insecure=True).start()


def test_superlink_rows_reach_the_replacements(tmp_path) -> None:
    code = f"""
import importlib, flwr.superlink.main as link_main
cli = importlib.import_module("flwr.superlink.cli.flower_superlink")   # the package re-exports a function by that name
from flwr.superlink.federation import NoOpFederationManager
from leukfed.common.flower.patches import apply_patches
from leukfed.common.flower.control_plane import DualSocketUvicorn
apply_patches("superlink")
objects, state = link_main.get_objectstore_linkstate_factories({str(tmp_path / 'state.db')!r}, NoOpFederationManager())
print(type(objects.store()).__name__, isinstance(cli.uvicorn, DualSocketUvicorn))
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["InMemoryObjectStore", "True"]


def test_node_rows_reach_the_replacements() -> None:
    code = """
import time
from leukfed.common.flower.patches import apply_patches
apply_patches("supernode")
from flwr.supernode import start_client_internal as node
t = time.monotonic(); node.time.sleep(3); poll = time.monotonic() - t
print(poll, node.pull_objects.keywords["initial_backoff"], node.pull_objects.keywords["backoff_cap"])
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    poll, first, cap = (float(x) for x in out.stdout.split())
    assert poll < 1.5 and (first, cap) == patches.REMOTE_PULL_BACKOFF_S


@pytest.mark.parametrize("process,module,name", [
    ("serverapp", "flwr.superlink.grid.http_grid", "pull_objects"),
    ("clientapp", "flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree"),
])
def test_local_pull_rows_reach_the_replacements(process: str, module: str, name: str) -> None:
    code = f"""
import importlib
from leukfed.common.flower.patches import apply_patches
apply_patches({process!r}); apply_patches({process!r})   # idempotent
pull = getattr(importlib.import_module({module!r}), {name!r})
try:
    pull(None, None, None)   # Flower's real function, called with leukfed's arguments bound
except Exception as err:
    pass
print(pull.keywords["initial_backoff"], pull.keywords["backoff_cap"], pull.func.__module__)
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    first, cap, where = out.stdout.split()
    assert (float(first), float(cap)) == patches.LOCAL_PULL_BACKOFF_S and where.startswith("flwr.")


def test_owner_installed_rows_reach_the_replacement() -> None:
    code = """
from leukfed.common.flower.patches import install
from flwr.supercore.superexec import run_superexec as superexec
marker = object()
install("forking-executor", lambda flower_get_executor: lambda *a, **k: marker)
print(superexec.get_executor("anything") is marker)
"""
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_read_rows_still_hold() -> None:
    from flwr.supercore.state.schema.linkstate_models import Node

    assert Node.__tablename__ == "node" and {"node_id", "public_key"} <= set(Node.__table__.columns.keys())
    flwr_root = os.path.dirname(inspect.getfile(__import__("flwr")))
    sources = ""
    for folder, _, files in os.walk(flwr_root):
        sources += "".join(open(os.path.join(folder, f), encoding="utf-8").read() for f in files if f.endswith(".py"))
    for line in ('"SuperNode ID: %s"', 'f"Exit Code: {code}\\n"', '"[code: {', "Failed to activate SuperNode."):
        assert line in sources, line


def test_strategy_state_rows_still_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attributes a checkpoint saves (leukfed.server.strategies.STATE_ATTRIBUTES) hold each strategy's
    state after Flower's own round loop: FedAdam's moments per array name, FedAvgM's momentum in order."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam, FedAvgM
    from flwr.supercore.task_identity import TaskIdentity

    from leukfed.common.flower.inprocess import InProcessGrid
    from leukfed.server.strategies import STATE_ATTRIBUTES

    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)

    def site(message: Message) -> Message:
        arrays = ArrayRecord({k: Array(v.numpy() + 1) for k, v in message.content["arrays"].items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}), reply_to=message)

    start = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)), "b": Array(np.zeros(2, dtype=np.float32))})
    adam, avgm = FedAdam(fraction_evaluate=0.0), FedAvgM(server_momentum=0.9, fraction_evaluate=0.0)
    for strategy in (adam, avgm):
        strategy.start(grid=InProcessGrid({1: site, 2: site}, run_id=1), initial_arrays=start, num_rounds=1)
    assert {"m_t", "v_t", "momentum_vector"} == set(STATE_ATTRIBUTES)
    assert {k: v.shape for k, v in adam.m_t.items()} == {k: v.shape for k, v in adam.v_t.items()} == \
        {"w": (3,), "b": (2,)}
    assert [v.shape for v in avgm.momentum_vector] == [(3,), (2,)]


# ----------------------------------------------------------------------------- the public-socket filter

def _ask(app, method: str, path: str, port: int, client: str = "203.0.113.9", kind: str = "http") -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": kind, "method": method, "path": path, "server": ("127.0.0.1", port), "client": (client, 5555)}
    asyncio.run(app(scope, receive, send))
    return sent[0].get("status", sent[0].get("code"))


async def _flower(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_public_socket_passes_fleet_and_health_only() -> None:
    app = control_plane.FleetOnlyOnPublicPort(_flower, public_port=9092, admin_allow=["198.51.100.7"])
    assert _ask(app, "POST", "/v1/fleet/pull-messages", 9092) == 200
    assert _ask(app, "GET", "/health", 9092) == 200
    for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                         ("POST", "/v1/runtime/pull-messages"), ("DELETE", "/v1/fleet/pull-messages"),
                         ("POST", "/v1/fleet/../control/stop-run"), ("GET", "/docs"), ("GET", "/openapi.json")]:
        assert _ask(app, method, path, 9092) == 403, (method, path)
    assert _ask(app, "GET", "/", 9092, kind="websocket") == 1008
    assert _ask(app, "POST", "/v1/control/list-runs", 9092, client="198.51.100.7") == 200   # --admin-allow
    assert _ask(app, "POST", "/v1/control/list-runs", 40000) == 200                       # the admin socket
    body = json.loads(control_plane.FORBIDDEN_BODY)
    assert "Fleet API" in body["detail"]


def test_entry_points_apply_the_table() -> None:
    from leukfed.client import fork_exec
    from leukfed.common.flower import superlink_process, supernode_process
    from leukfed.server import grids

    for func, process in [(superlink_process.main, "superlink"), (supernode_process.main, "supernode"),
                          (fork_exec.main, "superexec"), (fork_exec._run_task, "clientapp"),
                          (grids.PromptGrid.__init__, "serverapp")]:
        source = inspect.getsource(func)
        assert f'apply_patches("{process}")' in source or f'run_flower_program("{process}"' in source, func
    assert "apply_patches(process)" in inspect.getsource(patches.run_flower_program)
    assert {row.process for row in PROCESS_ROWS} == {"superlink", "supernode", "superexec", "clientapp", "serverapp"}


def test_flowers_helpers_come_from_this_environment(tmp_path) -> None:
    """The SuperLink starts flower-superexec through PATH; another Flower release found first refuses to pair."""
    from pathlib import Path

    from leukfed.common.flower.env import flower_env

    path = flower_env(tmp_path)["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).parent)
    assert flower_env(tmp_path, {"PATH": "/site/bin"})["PATH"] == "/site/bin"   # a caller's own PATH wins


def test_a_log_tail_is_the_last_lines_of_a_long_log_without_colours(tmp_path: Path) -> None:
    from leukfed.common.flower.processes import LOG_TAIL_BYTES, log_tail

    log_file = tmp_path / "superlink.log"
    with log_file.open("w") as handle:        # ~20 x the bytes read: months of a site's log
        for i in range(LOG_TAIL_BYTES // 2):
            handle.write(f"\x1b[32mINFO\x1b[0m line {i}\n" if i % 2 else f"line {i}\n")
    tail = log_tail(log_file, 2).splitlines()
    assert tail == [f"line {LOG_TAIL_BYTES // 2 - 2}", f"INFO line {LOG_TAIL_BYTES // 2 - 1}"]
    assert log_tail(tmp_path / "missing.log") == ""
