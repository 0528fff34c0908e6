"""A real coordinator and hospitals as separate processes on this machine (TLS, site keys, approvals)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from leukfed.common.errors import LeukError
from leukfed.common.flower.env import free_port
from leukfed.common.flower.processes import descendants

ENV = {**os.environ, "LEUK_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}


def cli(module: str) -> list[str]:
    """The console script of a leukfed module, run with this interpreter."""
    return [sys.executable, "-c", f"from leukfed.{module} import main; main()"]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Signal a CLI; with SIGKILL, everything it started too (a crashed machine leaves nothing behind)."""
    if proc.poll() is not None:
        return
    children = descendants(proc.pid) if sig == signal.SIGKILL else []
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=wait)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_history(state: Path) -> list[dict]:
    try:
        return json.loads((state / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


class LoopbackFederation:
    """`leuk certs init`, one `leuk-server` and one `leuk-client` per site, all in `root`."""

    # The test hospitals' policy (leuk-client options): they join runs of 2 sites on tiny data.
    SITE_POLICY = ("--min-sites", "2", "--min-metric-examples", "1")

    def __init__(self, root: Path, sites: list[str], *, model: str = "tinycnn", image_size: int = 16,
                 site_policy: tuple[str, ...] = SITE_POLICY) -> None:
        self.root, self.sites, self.port, self.procs = root, sites, free_port(), []
        self.site_policy = site_policy
        self.model, self.image_size = model, image_size
        self.certs, self.state = root / "certs", root / "state"
        subprocess.run([*cli("cli"), "certs", "init", "--out", str(self.certs), "--server-name", "localhost",
                        "--sites", ",".join(sites)], check=True, env=ENV, capture_output=True)

    def server(self, *args: str, log: str = "server.log") -> subprocess.Popen:
        proc = spawn([*cli("server.cli"), "--certs", str(self.certs), "--model", self.model,
                      "--image-size", str(self.image_size), "--state", str(self.state), "--host", "127.0.0.1",
                      "--min-metric-examples", "1",
                      "--port", str(self.port), *args], self.root / log)
        self.procs.append(proc)
        return proc

    def wait_submitted(self, log: str = "server.log") -> None:
        wait_for(lambda: "submitted" in self.log(log), 180, "the run to be submitted")

    def approve(self, site: str) -> None:
        """The hospital's reviewer approves the installed code once, before the site joins."""
        subprocess.run([*cli("client.cli"), "approve", "--approvals", str(self.root / f"site-{site}" / "approvals.json"),
                        "--reviewer", "loopback reviewer", "--yes"], check=True, env=ENV, capture_output=True)

    def client(self, site: str, data: Path, *args: str, certs: Path | None = None) -> subprocess.Popen:
        self.approve(site)
        proc = spawn([*cli("client.cli"), "--server", f"127.0.0.1:{self.port}", "--site", site, "--data", str(data),
                      "--certs", str(certs or self.certs / "sites" / site), "--state", str(self.root / f"site-{site}"),
                      *self.site_policy, *args], self.root / f"client-{site}.log")
        self.procs.append(proc)
        return proc

    def wait_server(self, server: subprocess.Popen, clients: list[subprocess.Popen], timeout: float) -> int:
        """The server's exit code; LeukError at once if a hospital's leuk-client exits first (its last log
        line says why), or when `timeout` s pass: a run whose sites are gone never hangs the caller."""
        deadline = time.monotonic() + timeout
        while server.poll() is None:
            for proc, name in ((p, p.args[p.args.index("--site") + 1]) for p in clients):
                if proc.poll() is not None:
                    lines = self.log(f"client-{name}.log").strip().splitlines()
                    raise LeukError(f"hospital {name}'s leuk-client exited ({proc.returncode}) before the run "
                                    f"finished: {lines[-1] if lines else 'no output'}")
            if time.monotonic() > deadline:
                raise LeukError(f"the run did not finish within {timeout:.0f} s")
            time.sleep(1.0)
        return server.returncode

    def history(self) -> list[dict]:
        return read_history(self.state)

    def log(self, name: str) -> str:
        try:
            return (self.root / name).read_text()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
