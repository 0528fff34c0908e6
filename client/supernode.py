"""Run one hospital's `flower-supernode`: start, join detection, failure classification, supervised restarts."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from leukfed.common.errors import LeukError
from leukfed.common.flower import supernode_process
from leukfed.common.flower.env import ConfigValue, flower_env, free_port, toml_pairs
from leukfed.common.flower.patches import check_flower_version
from leukfed.common.flower.processes import claim_pidfile, kill_process_group, spawn_logged, strip_ansi

JOINED_RE = re.compile(r"SuperNode ID: (\d+)")
EXIT_CODE_RE = re.compile(r"Exit Code: (\d+)\n(.*)")
# A node that died without saying goodbye stays "online" at the SuperLink until two 30 s heartbeats are
# missed; until then a restarted node with the same key is refused with code 2004.
REFUSED_WINDOW_S = 90.0
STABLE_S = 120.0  # a node up this long resets the restart counter
EventFn = Callable[[str, str], None]


@dataclass(frozen=True)
class NodeExit:
    """How a SuperNode process ended.

    kind: "stopped" (we asked), "fatal" (retrying cannot help: message says why),
    "refused" (key still counted online after an unclean death: retry soon),
    "crashed" (restart with backoff), "graceful" (exited 0 unasked, e.g. the server answered 401).
    """

    returncode: int
    kind: str
    message: str


class SuperNode:
    """One `flower-supernode` child process for one hospital site."""

    def __init__(
        self,
        superlink: str,
        *,
        state_dir: str | Path,
        ca: str | Path | None,
        private_key: str | Path | None,
        node_config: Mapping[str, ConfigValue] | None = None,
        insecure: bool = False,
        runtime_port: int | None = None,
        env: Mapping[str, str] | None = None,
        approved_launcher: str | Path | None = None,
        approvals: str | Path | None = None,
    ) -> None:
        if ca is None and not insecure:
            raise LeukError("no CA certificate given (the ca.crt from this site's folder)")
        self.superlink = superlink
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.ca = Path(ca).expanduser().resolve() if ca else None
        self.private_key = Path(private_key).expanduser().resolve() if private_key else None
        self.node_config = dict(node_config or {})
        self.insecure = insecure
        self.runtime_port = runtime_port
        self.env = dict(env or {})
        # With the site's guarded launcher and approvals file, leuk's SuperExec forks each ClientApp task
        # from a process that imported torch once (client/fork_exec.py); else Flower starts each one cold.
        self.fork_tasks = approved_launcher is not None and approvals is not None
        self.approved_launcher = Path(approved_launcher).resolve() if approved_launcher else None
        self.approvals = Path(approvals).resolve() if approvals else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.executor: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started_at = 0.0
        self._stop_requested = False
        self._unclean_at = 0.0  # when a node with this key last died without deactivating
        self._joined_seen_at = 0.0  # when this object last saw its node joined
        self._node_id: int | None = None
        self._marker_read = False
        for p in (self.ca, self.private_key):
            if p is not None and not p.is_file():
                raise LeukError(f"{p} not found")

    # ------------------------------------------------------------------ paths

    @property
    def log_path(self) -> Path:
        return self.state_dir / "supernode.log"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "supernode.pid"

    @property
    def alive_path(self) -> Path:
        """Touched while the node is joined, removed after a clean end: if present, the last end was unclean."""
        return self.state_dir / "supernode.alive"

    # ------------------------------------------------------------------ lifecycle

    def command(self, port: int) -> list[str]:
        """The flower-supernode command line (never with runtime dependency installation), through
        common/flower/supernode_process.py (shorter waits)."""
        cmd = [*supernode_process.command(), "--superlink", self.superlink]
        cmd += ["--insecure"] if self.insecure else ["--root-certificates", str(self.ca)]
        if self.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.private_key)]
        if self.node_config:
            cmd += ["--node-config", toml_pairs(self.node_config)]
        if self.fork_tasks:
            cmd += ["--isolation", "process"]
        return cmd + ["--host", "127.0.0.1", "--port", str(port)]

    def executor_command(self, port: int, supernode_pid: int) -> list[str]:
        """leuk's SuperExec for `--isolation process`: ClientApp tasks forked from an imported process."""
        from leukfed.client.approval import SUPEREXEC_FLAG

        # Through the guarded launcher: it checks the installed code before importing any of it.
        return [str(self.approved_launcher), SUPEREXEC_FLAG, "--runtime-api-address", f"127.0.0.1:{port}",
                "--approvals", str(self.approvals), "--launcher", str(self.approved_launcher),
                "--parent-pid", str(supernode_pid)]

    def start(self) -> SuperNode:
        """Start the node process (returns at once; see wait_joined)."""
        if self.running():
            raise LeukError("this SuperNode is already running")
        check_flower_version()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        port = self.runtime_port or free_port()
        cmd = self.command(port)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = flower_env(self.flwr_home, self.env)
        # own group: stop() also reaches SuperExec/ClientApp children
        self.proc = spawn_logged(cmd, self.log_path, env, self.state_dir, self.pid_path)
        if self.fork_tasks:  # exits with the node (it watches the node's pid)
            self.executor = spawn_logged(self.executor_command(port, self.proc.pid), self.log_path, env,
                                         self.state_dir)
        self._started_at = time.monotonic()
        self._stop_requested = False
        self._node_id = None
        return self

    def _clear_stale(self) -> None:
        """Deal with a node left by an earlier leuk-client, and note an earlier unclean end."""
        if not self._marker_read and self.alive_path.exists():
            self._unclean_at = max(self._unclean_at, self.alive_path.stat().st_mtime)
        self._marker_read = True
        claim_pidfile(self.pid_path, supernode_process.MODULE, f"a SuperNode for {self.state_dir}")

    def running(self) -> bool:
        """True while the node process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def attempt_log(self) -> str:
        """Log text of the current (latest) start, colour codes removed."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return strip_ansi(f.read().decode("utf-8", errors="replace"))
        except FileNotFoundError:
            return ""

    def node_id(self) -> int | None:
        """The node id once the SuperLink accepted this node (parsed from the log), else None."""
        if self._node_id is None and (m := JOINED_RE.search(self.attempt_log())):
            self._node_id = int(m.group(1))
        return self._node_id

    def poll(self) -> NodeExit | None:
        """None while running (keeps the liveness marker fresh), else how it ended."""
        if self.proc is None:
            raise LeukError("the SuperNode is not started")
        code = self.proc.poll()
        if code is None:
            if self.node_id() is not None:
                self._joined_seen_at = time.time()
                self.alive_path.touch()  # "last seen alive while joined", for the next leuk-client
            return None
        kill_process_group(self.proc, 0)  # reap SuperExec/ClientApp leftovers of a dead node
        self._stop_executor()
        result = self.classify(code)
        if result.kind != "refused":
            self._mark_end(code)
        return result

    def _mark_end(self, code: int) -> None:
        """Remember an unclean end (joined, then died without leaving) for the 2004 grace window."""
        if code != 0 and self.node_id() is not None:
            self._unclean_at = time.time()
            self.alive_path.touch()
        else:
            self.alive_path.unlink(missing_ok=True)

    def wait_joined(self, timeout: float = 60.0) -> int:
        """Block until the SuperLink accepted the node; return its id. LeukError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while (node_id := self.node_id()) is None:
            ended = self.poll()
            if ended is not None:
                raise LeukError(ended.message)
            if time.monotonic() > deadline:
                raise LeukError(f"the SuperNode did not join within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)
        return node_id

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the node leaves the federation cleanly), SIGKILL after `timeout` s; return the exit code."""
        if self.proc is None:
            return None
        self._stop_requested = True
        was_running = self.proc.poll() is None
        code = kill_process_group(self.proc, timeout)
        self._stop_executor()
        if was_running:  # an already dead node was accounted for by poll()
            self._mark_end(code)
        self.pid_path.unlink(missing_ok=True)
        return code

    def _stop_executor(self) -> None:
        if self.executor is not None:
            kill_process_group(self.executor, 5.0)
            self.executor = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ classification

    def classify(self, returncode: int) -> NodeExit:
        """Turn an exit code plus this attempt's log into a NodeExit with a one-line message."""
        text = self.attempt_log()
        if self._stop_requested:
            return NodeExit(returncode, "stopped", "the SuperNode was stopped")
        if fatal := self._fatal_reason(text, returncode):
            return NodeExit(returncode, "fatal", fatal)
        if "[code: 2004]" in text or "Failed to activate SuperNode" in text:
            return self._refused(returncode)
        if returncode == 0:
            return NodeExit(0, "graceful", "the SuperNode left the federation (stopped by a signal or by the server)")
        return NodeExit(returncode, "crashed", f"the SuperNode died (exit code {returncode}); see {self.log_path}")

    def _fatal_reason(self, text: str, returncode: int) -> str | None:
        low = text.lower()
        if "certificate verify failed" in low:
            return self._certificate_reason(low)
        if "wrong version number" in low or "record layer failure" in low:
            return f"the server at {self.superlink} does not speak TLS (a SuperLink started without certificates?)"
        if "[code: 2001]" in text or "must be registered" in text:
            return (
                "the federation server requires site authentication but this node has no site key "
                "(code 2001): pass this site's site.key"
            )
        m = _node_exit_block(text, returncode)
        if m and m.group(1) != "305":  # 305 = connection error: the causes above, or 2004 below
            return f"the SuperNode stopped with Flower exit code {m.group(1)}: {m.group(2).strip()}"
        return None

    def _certificate_reason(self, low: str) -> str:
        host = self.superlink.rsplit(":", 1)[0]
        if "mismatch" in low:
            return (
                f"the federation server's certificate is not valid for the name {host!r}: connect with one of the "
                "names or IPs given to `leuk certs init --server-name`"
            )
        if "expired" in low or "not yet valid" in low:
            return "the federation server's certificate is expired or not yet valid: check both machines' clocks"
        return (
            f"the federation server at {self.superlink} presented a certificate not signed by the CA in "
            f"{self.ca} (wrong CA file?): certificate verify failed"
        )

    def _refused(self, returncode: int) -> NodeExit:
        key = self.private_key or "(none)"
        if time.time() - self._unclean_at < REFUSED_WINDOW_S:
            return NodeExit(
                returncode,
                "refused",
                "the federation server still counts this site as online after an unclean stop (code 2004)",
            )
        if time.time() - self._joined_seen_at < REFUSED_WINDOW_S:
            # Accepted moments ago: a restarted coordinator registers its sites again only once its
            # SuperLink answers, so the node may ask first.
            return NodeExit(
                returncode,
                "refused",
                "the federation server does not know this site yet (a restarted coordinator registers its "
                "sites again; code 2004)",
            )
        return NodeExit(
            returncode,
            "fatal",
            f"the federation server refused this site's key {key}: it is not registered "
            "(Failed to activate SuperNode, code 2004). Ask the coordinator to register this site's site.pub",
        )

    # ------------------------------------------------------------------ supervision

    def supervise(
        self,
        *,
        max_restarts: int = 8,
        backoff_s: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0),
        refused_retry_s: float = 10.0,
        poll_s: float = 1.0,
        on_event: EventFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> NodeExit:
        """Keep the node running: restart after unclean exits with backoff, raise LeukError on fatal causes.

        on_event(kind, message) gets "started", "joined", "restarting". Returns when should_stop() is true
        (the node is stopped cleanly) or the node was stopped from outside via stop().
        """
        emit: EventFn = on_event or (lambda kind, msg: None)
        failures, joined = 0, False
        if not self.running():
            self.start()
            emit("started", f"flower-supernode started (pid {self.pid}), log {self.log_path}")
        try:
            while True:
                ended = self.poll()
                if ended is None:
                    if should_stop is not None and should_stop():
                        self.stop()
                        return NodeExit(0, "stopped", "stopped on request")
                    if not joined and (node_id := self.node_id()) is not None:
                        joined = True
                        emit("joined", f"joined the federation as node {node_id}")
                    if joined and time.monotonic() - self._started_at > STABLE_S:
                        failures = 0
                    time.sleep(poll_s)
                    continue
                if ended.kind == "stopped":
                    return ended
                if ended.kind == "fatal":
                    raise LeukError(ended.message)
                failures += ended.kind != "refused"  # refusals are bounded by REFUSED_WINDOW_S instead
                if failures > max_restarts:
                    raise LeukError(f"the SuperNode failed {failures} times in a row: {ended.message}")
                delay = refused_retry_s if ended.kind == "refused" else backoff_s[min(failures, len(backoff_s)) - 1]
                emit("restarting", f"{ended.message}; restarting in {delay:.0f} s")
                if _sleep_unless(delay, should_stop):
                    return NodeExit(ended.returncode, "stopped", "stopped on request")
                joined = False
                self.start()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def _node_exit_block(text: str, returncode: int) -> re.Match[str] | None:
    """The last `Exit Code: N` block Flower's flwr_exit wrote for the node itself, if any. ClientApp tasks
    share this log, and a failed task writes the same block (codes 250-299, 607, 608, 800-899): that one
    must not make the site give up when the node later exits for another reason (e.g. the coordinator
    restarted). An error exit always ends the process with status 1, so a status-0 exit has none."""
    if returncode == 0:
        return None
    own = [m for m in EXIT_CODE_RE.finditer(text) if not _task_exit_code(int(m.group(1)))]
    return own[-1] if own else None


def _task_exit_code(code: int) -> bool:
    """Flower's exit codes of ClientApp task processes (flwr.supercore.exit.ExitCode)."""
    return 250 <= code < 300 or code in (607, 608) or 800 <= code < 900


def _sleep_unless(delay: float, should_stop: Callable[[], bool] | None) -> bool:
    """Sleep `delay` s in small steps; True if should_stop() became true."""
    end = time.monotonic() + delay
    while time.monotonic() < end:
        if should_stop is not None and should_stop():
            return True
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    return False
