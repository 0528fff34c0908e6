"""Runs the leukfed ServerApp/ClientApp on Flower's simulation engine (Ray), privately and offline."""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tomli_w

from leukfed.common.atomic import atomic_write_text
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.fab import write_app_dir, write_run_config
from leukfed.common.flower import superlink_process
from leukfed.common.flower.cli import FlwrCli
from leukfed.common.flower.env import flower_env, free_port
from leukfed.common.flower.patches import check_flower_version
from leukfed.common.flower.processes import kill_process_group, log_tail, strip_ansi

CONNECTION = "leuk-sim"


@dataclass(frozen=True)
class SimulationResources:
    """How many virtual sites, and each one's share of the machine."""

    num_sites: int
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0


def _write_config(flwr_home: Path, resources: SimulationResources) -> None:
    # Flower 1.41 refuses a float CPU count (it calls range() on it): whole CPUs only.
    cpus = max(1, round(resources.cpus_per_site))
    options = {"num-supernodes": resources.num_sites,
               "backend": {"client-resources": {"num-cpus": cpus, "num-gpus": resources.gpus_per_site}}}
    config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": ":local:", "options": options}}}
    flwr_home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(flwr_home / "config.toml", tomli_w.dumps(config))


def _start_superlink(work_dir: Path, env: dict[str, str], http_port: int, control_port: int) -> subprocess.Popen:
    """Our own simulation SuperLink on free ports, so concurrent simulations never collide."""
    log_file = work_dir / "superlink.log"
    command = [*superlink_process.command(), "--insecure", "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1",
               "--port", str(http_port),   # state in memory: Flower's SQLite file halves the speed of moving models
               "--disable-runtime-dependency-installation", "--log-file", str(log_file)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    import httpx
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LeukError(f"the simulation SuperLink exited early: {log_tail(log_file, 5)}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=0.5).is_success:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    kill_process_group(process, 5)
    raise LeukError("the simulation SuperLink did not become healthy within 60 s")


def run_simulation(fed: FedConfig, resources: SimulationResources, work_dir: Path,
                   on_line: Callable[[str], None] | None = None, *, sites: dict[str, str] | None = None) -> None:
    """Submit one federated run to a private simulation SuperLink and wait for it to finish. `sites`:
    the simulation ClientApp's own settings (partition and site policy files), declared in its bundle."""
    check_flower_version()
    work_dir = Path(work_dir).resolve()  # the `flwr` CLI runs from FLWR_HOME
    work_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = work_dir / "flwr-home"
    http_port, control_port = free_port(), free_port()
    threads = str(max(1, round(resources.cpus_per_site)))  # one site's share: no thread oversubscription
    env = flower_env(flwr_home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                                 "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
                                 "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    _write_config(flwr_home, resources)
    app_dir = write_app_dir(work_dir / "app", clientapp="leukfed.simulations.client_app:app", extra_config=sites)
    run_config = write_run_config(work_dir / "run_config.toml", fed)
    superlink = _start_superlink(work_dir, env, http_port, control_port)
    cli = FlwrCli(flwr_home, env)
    try:
        run_id = _submit(app_dir, run_config, cli)
        _stream_until_done(run_id, cli, on_line)
    finally:
        kill_process_group(superlink, 10)


def _submit(app_dir: Path, run_config: Path, cli: FlwrCli) -> int:
    result = cli.raw("run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json")
    try:
        payload = json.loads(result.stdout)
        return int(payload["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        message = strip_ansi(result.stdout + result.stderr).strip().splitlines()
        raise LeukError(f"flwr run failed: {message[-1] if message else 'no output'}") from None


def _run_status(run_id: int, cli: FlwrCli) -> tuple[str, str]:
    result = cli.raw("ls", "--run-id", str(run_id), CONNECTION, "--format", "json")
    try:
        run = json.loads(result.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return "unknown", strip_ansi(result.stdout + result.stderr)[-300:]


def _stream_until_done(run_id: int, cli: FlwrCli, on_line: Callable[[str], None] | None) -> None:
    """Follow the ServerApp's log (our `[leukfed]` lines) until Flower reports the run finished."""
    stream = cli.stream("log", str(run_id), CONNECTION, "--stream")
    try:
        for line in stream.stdout:  # type: ignore[union-attr]
            line = strip_ansi(line.rstrip("\n"))
            if on_line is not None and "[leukfed]" in line:
                on_line(line[line.index("[leukfed]") + 10:])
            if "finished" in line.lower() and "run" in line.lower():
                break
    finally:
        kill_process_group(stream, 2)
    status, details = _run_status(run_id, cli)
    while status.startswith(("pending", "starting", "running")):
        time.sleep(1)
        status, details = _run_status(run_id, cli)
    if status != "finished:completed":
        raise LeukError(f"the federated run ended {status}: {details.strip()[-500:] or 'see the logs'}")

