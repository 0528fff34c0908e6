"""One process manager for every Flower program leukfed starts: spawn with a log, pidfiles, stopping whole trees."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from leukfed.common.atomic import read_tail
from leukfed.common.errors import LeukError


def spawn_logged(cmd: list[str], log_path: Path, env: Mapping[str, str], cwd: Path,
                 pid_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session of its own (stopping it reaches its children), stdout and stderr appended to
    `log_path` after a `=== leukfed: CMD` header; record its pid in `pid_path` when given."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== leukfed: {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=cwd, start_new_session=True)
    if pid_path is not None:
        write_pidfile(pid_path, proc.pid)
    return proc


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


LOG_TAIL_BYTES = 256 * 1024


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ('' if missing), ANSI colours removed; only its last 256 KiB are
    read (a coordinator's or site's log is appended to for as long as it runs)."""
    try:
        text = read_tail(path, LOG_TAIL_BYTES).decode("utf-8", errors="replace")
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


