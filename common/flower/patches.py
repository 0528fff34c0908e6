"""The table of every change leukfed makes to Flower's behaviour, and the one function that applies them."""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from leukfed.common.errors import LeukError

KNOWN_VERSIONS = ("1.41.0", "1.42.0")   # every row below was checked against these Flower releases
UNTESTED_ENV = "LEUK_FLOWER_UNTESTED"    # "1": run on a Flower release not listed (at your own risk)

# A Flower receiver learns of a message before its arrays have arrived, and pulls them with a
# backoff of 1, 2, 4, 8, 10 s: up to a second or more of idle time per hop while the sender is still
# uploading. A pull from a process on the same machine is a cheap local request, so those retry after
# 0.05 s, doubling to 0.2 s; a SuperNode pulling from a remote SuperLink starts at 0.1 s, caps at 0.25 s
# (two pulling threads: at most 8 small requests a second per site while the coordinator uploads).
LOCAL_PULL_BACKOFF_S = (0.05, 0.2)
REMOTE_PULL_BACKOFF_S = (0.1, 0.25)

# Flower's node loop asks the SuperLink for a message and, when there is none, sleeps 3 s: on average
# 1.5 s of idle time per message, twice a round. It waits for the ClientApp's reply, and for each reply
# object, in steps of 0.5 s. Asking every 0.5 s is one small authenticated request per node and poll.
NODE_POLL_S = 0.5
NODE_LOCAL_WAIT_S = 0.05


@dataclass(frozen=True)
class Patch:
    """One change to Flower: `target` ("module:attribute") is replaced in `process` by `apply`.

    `caller` ("module:function") is the Flower function that looks `target` up at call time, which is
    what makes the replacement take effect (tests/test_flower_adapter.py checks both on every release).
    `apply` is "module:function" taking the original attribute and returning its replacement; "" when
    the owner installs the replacement itself through `install(name, value)` (it needs arguments).
    kind "read": no change, a private Flower name leukfed reads because no public route exists.
    """

    name: str
    target: str
    caller: str
    process: str            # superlink | supernode | superexec | clientapp | serverapp | coordinator
    reason: str
    apply: str = ""
    kind: str = "patch"
    versions: tuple[str, ...] = KNOWN_VERSIONS


PATCHES: tuple[Patch, ...] = (
    Patch("objects-in-memory", "flwr.superlink.main:get_objectstore_linkstate_factories",
          "flwr.superlink.main:create_app", "superlink",
          "with --database, Flower writes every 5 MB model chunk to SQLite (0.5 GB of commits a round); "
          "message objects live for one exchange, so they stay in memory while nodes and runs persist",
          apply="leukfed.common.flower.patches:objects_in_memory"),
    Patch("control-plane-closed", "flwr.superlink.cli.flower_superlink:uvicorn",
          "flwr.superlink.cli.flower_superlink:_run_superlink_http_api", "superlink",
          "Flower serves Fleet, Control and Runtime on one port: the app is served on loopback (admin) and, "
          "behind a Fleet-only filter, on the public address (leukfed.common.flower.control_plane)",
          apply="leukfed.common.flower.control_plane:serve_public_socket"),
    Patch("node-poll", "flwr.supernode.start_client_internal:time",
          "flwr.supernode.start_client_internal:start_client_internal", "supernode",
          "the node loop sleeps 3 s between polls for a message; 0.5 s (local waits 0.05 s)",
          apply="leukfed.common.flower.patches:shorter_sleeps"),
    Patch("node-pulls", "flwr.supernode.start_client_internal:pull_objects",
          "flwr.supernode.start_client_internal:_pull_and_store_message", "supernode",
          "a message's arrays are pulled from the SuperLink with a 1 s first backoff; 0.1-0.25 s",
          apply="leukfed.common.flower.patches:remote_pulls"),
    Patch("serverapp-pulls", "flwr.superlink.grid.http_grid:pull_objects",
          "flwr.superlink.grid.http_grid:HttpGrid.pull_messages", "serverapp",
          "replies are visible before their arrays: pull them from the local SuperLink within 0.05-0.2 s",
          apply="leukfed.common.flower.patches:local_pulls"),
    Patch("clientapp-pulls", "flwr.supernode.runtime.run_clientapp:pull_and_inflate_object_from_tree",
          "flwr.supernode.runtime.run_clientapp:pull_task_input", "clientapp",
          "a task is handed out before its arrays arrived: pull them from the local SuperNode within 0.05-0.2 s",
          apply="leukfed.common.flower.patches:local_pulls"),
    Patch("forking-executor", "flwr.supercore.superexec.run_superexec:get_executor",
          "flwr.supercore.superexec.run_superexec:run_superexec", "superexec",
          "ClientApp tasks fork from a process that imported torch once, instead of a fresh process each "
          "(installed by leukfed.client.fork_exec.main)"),
    Patch("fab-approval-check", "flwr.supernode.runtime.run_clientapp:install_from_fab",
          "flwr.supernode.runtime.run_clientapp:run_clientapp", "clientapp",
          "a task's app bundle is checked against the site's approval before Flower installs or imports it "
          "(installed by leukfed.client.approval)"),
    Patch("run-status-in-process", "flwr.cli.utils:init_http_client_from_connection",
          "flwr.cli.ls:ls", "coordinator",
          "run status polls ask the Control API in-process (~20 ms) instead of a `flwr ls` process (~2 s CPU)",
          kind="read"),
    Patch("node-id-from-database", "flwr.supercore.state.schema.linkstate_models:Node",
          "flwr.server.superlink.linkstate.sql_linkstate:SqlLinkState", "coordinator",
          "no public route maps a registered key to its node id (`flwr supernode list` omits keys): read table "
          "`node` (node_id, public_key) of the SuperLink's SQLite file (leukfed.common.flower.cli.registered_node_id)",
          kind="read"),
    Patch("strategy-state", "flwr.serverapp.strategy.fedopt:FedOpt._compute_deltat_and_mt",
          "flwr.serverapp.strategy.fedavgm:FedAvgM.aggregate_train", "serverapp",
          "a resumed run must continue FedAdam/FedYogi's moments and FedAvgM's momentum, which Flower keeps only "
          "in the strategy's attributes m_t, v_t and momentum_vector: the checkpoint reads and restores them "
          "(leukfed.server.strategies.STATE_ATTRIBUTES)",
          kind="read"),
    Patch("supernode-log-lines", "flwr.supercore.exit.exit:flwr_exit",
          "flwr.supernode.start_client_internal:start_client_internal", "site",
          "a SuperNode's reason to exit (refused key 2004, missing key 2001, TLS) and its node id reach the "
          "supervisor only as log lines (leukfed.client.supernode.SuperNode.classify)",
          kind="read"),
)


def patch(name: str) -> Patch:
    """The row called `name` (LeukError if there is none)."""
    for row in PATCHES:
        if row.name == name:
            return row
    raise LeukError(f"no Flower patch named {name!r}")


def flower_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        raise LeukError("Flower (flwr) is not installed in this environment") from None


def check_flower_version() -> str:
    """The installed Flower version; LeukError unless leukfed was checked on it (or LEUK_FLOWER_UNTESTED=1)."""
    found = flower_version()
    if found not in KNOWN_VERSIONS and os.environ.get(UNTESTED_ENV) != "1":
        raise LeukError(f"Flower {found} is not a version leukfed was checked on ({', '.join(KNOWN_VERSIONS)}): "
                        f"install one of those, or set {UNTESTED_ENV}=1 to try it anyway")
    return found


def resolve(dotted: str) -> tuple[object, str, object]:
    """("module:attr.sub") -> (owner object, last attribute name, current value); LeukError if missing."""
    module_name, _, attr = dotted.partition(":")
    try:
        owner: object = importlib.import_module(module_name)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, last, getattr(owner, last)
    except (ImportError, AttributeError) as err:
        raise LeukError(f"Flower {flower_version()} has no {dotted} ({err}): leukfed's adapter must be updated "
                        "for this Flower release (leukfed.common.flower.patches)") from None


def install(name: str, make: Callable[[object], object]) -> None:
    """Replace row `name`'s target by `make(original)` (LeukError if Flower lacks it)."""
    row = patch(name)
    owner, attr, original = resolve(row.target)
    resolve(row.caller)
    setattr(owner, attr, make(original))


def apply_patches(process: str) -> str:
    """Every entry point calls this first: refuse an unchecked Flower release, then apply the rows of
    `process` that leukfed applies itself. Returns the Flower version."""
    found = check_flower_version()
    for row in PATCHES:
        if row.process == process and row.kind == "patch" and row.apply:
            module_name, _, func = row.apply.partition(":")
            install(row.name, getattr(importlib.import_module(module_name), func))
    return found



def run_flower_program(process: str, entry_point: str) -> NoReturn:
    """`flower-<process>` with `process`'s patches applied first; Flower's `entry_point` ("module:function")
    is imported only after them. A refused Flower release or patch is one `error:` line."""
    try:
        apply_patches(process)
        *_, flower_main = resolve(entry_point)
    except LeukError as err:
        sys.exit(f"error: {err}")
    sys.argv[0] = f"flower-{process}"
    sys.exit(flower_main())

# ----------------------------------------------------------------------------- the replacements

def _pulls(pull, backoff: tuple[float, float]):
    """Flower's pull_objects (or a function that passes its backoff arguments on) retrying unavailable
    objects after `backoff` = (first wait, longest wait) s. Flower bounds the wait by tries (500, over an
    hour at its 10 s cap); this keeps its time bound (max_time, 2 h) instead. Idempotent."""
    if isinstance(pull, functools.partial):
        return pull
    return functools.partial(pull, initial_backoff=backoff[0], backoff_cap=backoff[1], max_tries_per_object=None)


def local_pulls(pull):
    return _pulls(pull, LOCAL_PULL_BACKOFF_S)


def remote_pulls(pull):
    return _pulls(pull, REMOTE_PULL_BACKOFF_S)


def prompt_object_pulls(module: object, name: str, backoff: tuple[float, float]) -> None:
    """Make `module.name` pull with `backoff` (see `_pulls`); LeukError if Flower has no such name."""
    pull = getattr(module, name, None)
    if pull is None:
        raise LeukError(f"Flower {flower_version()} has no {getattr(module, '__name__', module)}.{name}: "
                        "leukfed's adapter must be updated for this Flower release")
    setattr(module, name, _pulls(pull, backoff))


class _ShorterSleeps:
    """The `time` module as the node loop sees it: polls of NODE_POLL_S, local waits of NODE_LOCAL_WAIT_S."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, NODE_POLL_S if seconds >= 1.0 else NODE_LOCAL_WAIT_S))


def shorter_sleeps(module_time):
    if module_time is not time and not isinstance(module_time, _ShorterSleeps):
        raise LeukError("Flower's node loop no longer uses the time module: update leukfed's adapter")
    return _ShorterSleeps()


def objects_in_memory(flower_factories):
    """Flower's LinkState takes any ObjectStore, which is what its in-memory mode pairs it with."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    if getattr(flower_factories, "leuk_objects_in_memory", False):
        return flower_factories

    def factories(database: str, federation_manager):
        if database == FLWR_IN_MEMORY_DB_NAME or ("://" in database and not database.startswith("sqlite")):
            return flower_factories(database, federation_manager)
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    factories.leuk_objects_in_memory = True  # type: ignore[attr-defined]
    return factories
