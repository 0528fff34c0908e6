"""Offline environment, executables and config files shared by every Flower process we start."""

from __future__ import annotations

import functools
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from leukfed.common.errors import LeukError

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}
ConfigValue = bool | int | float | str

# A Flower receiver learns of a message before its arrays have arrived, and pulls them with a
# backoff of 1, 2, 4, 8, 10 s: up to a second or more of idle time per hop while the sender is still
# uploading. A pull from a process on the same machine is a cheap local request, so those retry after
# 0.05 s, doubling to 0.2 s; a SuperNode pulling from a remote SuperLink starts at 0.1 s, caps at 0.25 s
# (two pulling threads: at most 8 small requests a second per site while the coordinator uploads).
LOCAL_PULL_BACKOFF_S = (0.05, 0.2)
REMOTE_PULL_BACKOFF_S = (0.1, 0.25)


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus a private FLWR_HOME and every switch that keeps Flower offline."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env.update(extra or {})
    return env


def prompt_object_pulls(module: object, name: str, backoff: tuple[float, float]) -> None:
    """Make `module.name` (Flower's pull_objects, or a function that passes on its backoff arguments)
    retry unavailable objects after `backoff` = (first wait, longest wait) seconds. Flower bounds the
    wait by tries (500, over an hour at its 10 s cap); this keeps its time bound (max_time, 2 h)
    instead. A Flower layout without that name keeps Flower's waits."""
    pull = getattr(module, name, None)
    if pull is not None and not isinstance(pull, functools.partial):
        setattr(module, name, functools.partial(pull, initial_backoff=backoff[0], backoff_cap=backoff[1],
                                                max_tries_per_object=None))


def flower_executable(name: str) -> str:
    """Path of a Flower console script (`flower-superlink`, `flwr`, ...) of this Python environment."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LeukError(f"cannot find the Flower program {name!r}: is flwr==1.41 installed in this environment?")
    return found


def toml_value(value: ConfigValue) -> str:
    """One value as TOML that survives Flower's `k=v` parser (strings quoted, numbers and bools bare)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        # Flower splits pairs with the regex '...'|"..."|\S+, so a string may not contain its own quote.
        if "'" not in value and "\n" not in value:
            return f"'{value}'"  # TOML literal string: no escapes needed (Windows paths, backslashes)
        if '"' not in value:
            return json.dumps(value)  # a JSON string without '"' inside is a valid TOML basic string
        raise LeukError(f"config value {value!r} cannot contain both ' and \" (Flower cannot parse it)")
    raise LeukError(f"config value {value!r} must be a string, integer, float or bool, not {type(value).__name__}")


def toml_pairs(config: Mapping[str, ConfigValue]) -> str:
    """`k1=v1 k2='text'` for `--run-config` / `--node-config`."""
    pairs = []
    for key, value in config.items():
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise LeukError(f"invalid config key {key!r}")
        pairs.append(f"{key}={toml_value(value)}")
    return " ".join(pairs)


def write_flwr_config(flwr_home: Path, connections: Mapping[str, Mapping[str, object]]) -> Path:
    """Write FLWR_HOME/config.toml with the given `[superlink.NAME]` connections (first one is default).

    Each connection is e.g. {"address": "127.0.0.1:9092", "root-certificates": "/abs/ca.crt"}
    or {"address": "127.0.0.1:9092", "insecure": True}. Relative certificate paths are made absolute.
    """
    if not connections:
        raise LeukError("write_flwr_config needs at least one connection")
    lines = ["[superlink]", f"default = {json.dumps(next(iter(connections)))}", ""]
    for name, conn in connections.items():
        lines.append(f"[superlink.{json.dumps(name)}]")
        for key, value in conn.items():
            if key == "root-certificates":
                value = str(Path(str(value)).expanduser().resolve())
            lines.append(f"{key} = {_toml_literal(value)}")
        lines.append("")
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True if binding host:port fails with 'address in use'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def kill_process_group(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM the process group of `proc`, SIGKILL it after `timeout` s; return the exit code.

    Flower starts its SuperExec in a session of its own, so the group alone is not enough: every
    descendant found before the leader goes (ppid links vanish with it) is killed as well.
    A process that does not lead its own group is signalled alone.
    """
    tree = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
    _signal_group(proc.pid, signal.SIGKILL)  # members left behind by a leader that is gone
    code = proc.wait()
    _reap_tree(tree)
    return code


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _reap_tree(pids: list[int], grace: float = 3.0) -> None:
    """Give leftover descendants `grace` s to exit (SuperExec follows its parent), then SIGKILL them."""
    end = time.monotonic() + grace
    while any(map(_alive, pids)) and time.monotonic() < end:
        time.sleep(0.1)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ('' if missing), ANSI colours removed."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(strip_ansi(text).splitlines()[-lines:])


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes (Flower colours its log levels)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def write_pidfile(path: Path, pid: int) -> None:
    """Record `pid` and its owner (this process) so a later start can recognise an orphan."""
    path.write_text(f"{pid} {os.getpid()}\n", encoding="utf-8")


def claim_pidfile(path: Path, program: str, what: str, timeout: float = 10.0) -> None:
    """Before starting `program` again: stop an orphan whose owner died; LeukError if the owner still lives."""
    try:
        pid, owner = (int(x) for x in path.read_text(encoding="utf-8").split()[:2])
    except (FileNotFoundError, ValueError):
        return
    if not _runs(pid, program):
        return
    if owner != os.getpid() and _alive(owner):
        raise LeukError(f"{what} is already running (pid {pid}, started by process {owner}): stop that one first")
    _stop_orphan(pid, program, timeout)


def _runs(pid: int, program: str) -> bool:
    """True if `pid` is alive and its command line contains `program` (Linux /proc)."""
    try:
        return program.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_orphan(pid: int, program: str, timeout: float) -> None:
    """SIGTERM the orphan's group (a SuperNode leaves the federation cleanly), SIGKILL after `timeout` s."""
    tree = descendants(pid)
    _signal_group(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _runs(pid, program) and time.monotonic() < end:
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
    _reap_tree(tree)


def http_get(host: str, port: int, path: str, ctx: ssl.SSLContext | None, timeout: float) -> tuple[int, str, str]:
    """One GET; returns (status, Server header, Allow header)."""
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("server", ""), resp.getheader("allow", "")
    finally:
        conn.close()
