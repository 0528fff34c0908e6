"""The one driver of Flower's `flwr` CLI: JSON commands, raw commands, streams, and in-process run status."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from leukfed.common.errors import LeukError
from leukfed.common.flower.env import OFFLINE_ENV, flower_env, flower_executable
from leukfed.common.flower.processes import strip_ansi

CLI_TIMEOUT_S = 120.0


class FlwrCliError(LeukError):
    """A `flwr` command failed; the message is Flower's own error line."""


class FlwrCli:
    """`flwr` with a private FLWR_HOME (its config.toml names the connections) and Flower kept offline."""

    def __init__(self, flwr_home: Path, extra_env: Mapping[str, str] | None = None,
                 timeout: float = CLI_TIMEOUT_S) -> None:
        self.flwr_home = Path(flwr_home)
        self.env = flower_env(self.flwr_home, extra_env)
        self.timeout = timeout

    def command(self, *args: str) -> list[str]:
        return [flower_executable("flwr"), *args]

    def raw(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `flwr ARGS` (captured, no stdin) from FLWR_HOME, away from any pyproject.toml of the caller."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        try:
            return subprocess.run(self.command(*args), check=False, capture_output=True, text=True, env=self.env,
                                  cwd=self.flwr_home, timeout=self.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LeukError(f"`flwr {args[0]}` did not answer within {self.timeout:.0f} s") from None

    def json(self, *args: str) -> dict[str, object]:
        """Run `flwr ... --format json`; return the JSON or raise FlwrCliError with Flower's message."""
        proc = self.raw(*args, "--format", "json")
        data = parse_json(proc.stdout)
        # `--format json` reports failures as success=false with exit status 0.
        if data is None or not data.get("success", False):
            raise FlwrCliError(f"`flwr {' '.join(args[:2])}` failed: {cli_error(data, proc)}")
        return data

    def stream(self, *args: str) -> subprocess.Popen[str]:
        """`flwr ARGS` with stdout (and stderr) as a text pipe, in a session of its own."""
        return subprocess.Popen(self.command(*args), env=self.env, cwd=self.flwr_home, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                stdin=subprocess.DEVNULL)

    def run_record(self, connection: str, run_id: int) -> dict[str, object] | None:
        """What `flwr ls --run-id ID --format json` prints for one run, asked through the CLI's public
        functions in this process (~20 ms instead of a `flwr` process, ~2 s of CPU taken from the sites'
        training at every status poll). None on any failure: then run the CLI for Flower's message."""
        try:
            from flwr.cli.flower_config import read_superlink_connection
            from flwr.cli.run_utils import format_runs
            from flwr.cli.utils import init_http_client_from_connection
            from flwr.common.serde import run_from_proto
            from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module
        except ImportError:  # another Flower layout: the CLI answers instead
            return None
        saved = {key: os.environ.get(key) for key in (*OFFLINE_ENV, "FLWR_HOME")}
        os.environ.update({**OFFLINE_ENV, "FLWR_HOME": str(self.flwr_home.resolve())})
        client = None
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI's "Using SuperLink ..." lines
                client = init_http_client_from_connection(read_superlink_connection(connection))
                res = client.ListRuns(ListRunsRequest(run_id=run_id))
                rows = format_runs([run_from_proto(p) for p in res.run_dict.values()], res.now)
            return run_row_json(rows[0]) if rows else None
        except (Exception, SystemExit):  # the CLI's error handler may exit; it answers below instead
            return None
        finally:
            if client is not None:
                client.close()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_row_json(row) -> dict[str, object]:
    """One of Flower's RunRow as `flwr ls --format json` writes it."""
    inbound, outbound = row.network_traffic_inbound, row.network_traffic_outbound
    server_s, client_s = row.compute_time_serverapp, row.compute_time_clientapp
    return {
        "run-id": f"{row.run_id}", "federation-id": row.federation_id, "fab-id": row.fab_id,
        "fab-name": row.fab_id.split("/")[-1], "fab-version": row.fab_version, "fab-hash": row.fab_hash,
        "status": row.status_text, "status-details": row.details, "elapsed": row.elapsed,
        "pending-at": row.pending_at, "starting-at": row.starting_at, "running-at": row.running_at,
        "finished-at": row.finished_at,
        "network-traffic": {"inbound-bytes": inbound, "outbound-bytes": outbound, "total-bytes": inbound + outbound},
        "compute-time": {"serverapp-seconds": server_s, "clientapp-seconds": client_s,
                         "total-seconds": server_s + client_s},
    }


def parse_json(stdout: str) -> dict[str, object] | None:
    """The JSON object in a `flwr --format json` output (after any "Using SuperLink" line), or None."""
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def cli_error(data: dict[str, object] | None, proc: subprocess.CompletedProcess[str]) -> str:
    """Flower's error message of a failed command, on one line without its box drawing."""
    if data and data.get("error-message"):
        text = str(data["error-message"])
    else:
        text = strip_ansi(proc.stderr or proc.stdout)
    lines = [ln.strip(" │╭╮╰╯─") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Using SuperLink") and not re.fullmatch(r"Error", ln)]
    return " ".join(lines)[:500] or f"exit status {proc.returncode}"


def registered_node_id(database: Path, pub: Path) -> int | None:
    """The node id Flower gave a public key, read from the SuperLink's SQLite file (Flower's internal
    schema: no public route maps a key to its id; `flwr supernode list` omits keys). Only needed when a
    key is "already in use" but leuk-server's sites.json lost it. Row "node-id-from-database" of
    patches.py; None when unknown."""
    try:
        pem = serialization.load_ssh_public_key(pub.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
            row = con.execute("SELECT node_id FROM node WHERE public_key = ?", (pem,)).fetchone()
    except (sqlite3.Error, ValueError, OSError):
        return None
    return None if row is None else int(row[0]) % (1 << 64)
