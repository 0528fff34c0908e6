"""Run and drive a `flower-superlink` process: start, health, site registration, runs, shutdown."""

from __future__ import annotations

import ipaddress
import http.client
import json
import ssl
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Self


from leukfed.common.atomic import atomic_write_text
from leukfed.common.errors import LeukError
from leukfed.server.tls_certificates import check_server_certs, public_key_digest
from leukfed.common.flower import superlink_process
from leukfed.common.flower.cli import FlwrCli, FlwrCliError, registered_node_id
from leukfed.common.flower.control_plane import ALLOW_ENV, PUBLIC_ENV
from leukfed.common.flower.patches import check_flower_version
from leukfed.common.flower.env import (
    ConfigValue,
    flower_env,
    free_port,
    http_get,
    port_in_use,
    toml_pairs,
    write_flwr_config,
)
from leukfed.common.flower.processes import (
    claim_pidfile,
    kill_process_group,
    log_tail,
    spawn_logged,
    strip_ansi,
)

DEFAULT_PORT = 9092
CONNECTION = "leukfed"
FINISHED = "finished:"
TlsFiles = tuple[Path, Path, Path]  # (ca.crt, server.pem, server.key)
__all__ = ["SuperLink", "FlwrCliError", "DEFAULT_PORT", "CONNECTION"]


class SuperLink:
    """One `flower-superlink` child process plus a private FLWR_HOME to drive it with the `flwr` CLI.

    Use as `with SuperLink().start(state_dir, ...) as link:`; leaving the block terminates it.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.state_dir = Path()
        self.host = "127.0.0.1"
        self.port = DEFAULT_PORT
        self.admin_port = 0
        self.ca: Path | None = None
        self.database_path = Path()
        self._started_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(
        self,
        state_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        certs: TlsFiles | None = None,
        insecure: bool = False,
        supernode_auth: bool = True,
        database: str | Path | None = None,
        health_timeout: float = 60.0,
        admin_port: int | None = None,
        admin_allow: Iterable[str] = (),
    ) -> SuperLink:
        """Start the SuperLink on host:port and return once GET /health answers (or raise LeukError).

        Without `database` Flower keeps its state in memory: registrations, runs and messages. That
        halves the time to move a model (Flower's SQLite state runs several SQL transactions per 5 MB
        object; measured in PERFORMANCE.md, section 6), and leuk-server registers its sites again
        whenever it starts a SuperLink (their SuperNodes restart and rejoin), while training resumes
        from leuk-server's own checkpoints. With a `database` file, registrations and Flower's run
        history outlive a SuperLink restart; the model objects stay in memory either way.

        Sites connect to host:port, where only Flower's Fleet API and /health answer (the control plane,
        Control and Runtime APIs, is refused there: common/flower/control_plane.py). Flower itself and
        this object's `flwr` CLI use the loopback admin port (`admin_port`, default a free one);
        `admin_allow` lists client IPs that may still use the control plane on host:port.
        """
        if self.proc is not None:
            raise LeukError("this SuperLink is already started")
        check_flower_version()
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.host, self.port = host, port
        self.admin_port = admin_port or free_port("127.0.0.1")
        admin_allow = [_ip(address) for address in admin_allow]
        args = self._tls_args(certs, insecure, supernode_auth)
        db = Path(database).expanduser().resolve() if database else None
        self.database_path = db or Path()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LeukError(f"cannot create the SuperLink state folder: {err}") from None
        claim_pidfile(self.pid_path, superlink_process.MODULE, f"a SuperLink for {self.state_dir}")
        if port_in_use(host, port):
            raise LeukError(f"port {port} on {host} is already in use (another leuk-server?): choose another --port")
        if port_in_use("127.0.0.1", self.admin_port) or self.admin_port == port:
            raise LeukError(f"admin port {self.admin_port} on 127.0.0.1 is already in use: choose another --admin-port")
        write_flwr_config(self.flwr_home, {CONNECTION: self._connection()})
        cmd = [*superlink_process.command(), *args, *(["--database", str(db)] if db is not None else [])]
        cmd += ["--host", "127.0.0.1", "--port", str(self.admin_port), "--disable-runtime-dependency-installation"]
        public = {PUBLIC_ENV: f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                  ALLOW_ENV: ",".join(admin_allow)}
        self.proc = spawn_logged(cmd, self.log_path, flower_env(self.flwr_home, public), self.state_dir, self.pid_path)
        self._started_at = time.monotonic()
        try:
            self.wait_healthy(health_timeout)
        except BaseException:
            self.terminate(timeout=5)
            raise
        return self

    def _tls_args(self, certs: TlsFiles | None, insecure: bool, supernode_auth: bool) -> list[str]:
        if insecure:
            if supernode_auth:
                raise LeukError("site authentication needs TLS: give certificates or turn site authentication off")
            return ["--insecure"]
        if certs is None:
            raise LeukError("no TLS certificates given (create them with `leuk certs init`)")
        ca, cert, key = (Path(p).expanduser().resolve() for p in certs)
        check_server_certs(ca, cert, key)
        self.ca = ca
        args = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        return [*args, "--enable-supernode-auth"] if supernode_auth else args

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Poll GET /health until it answers 200; return seconds since start. Raise LeukError on death/timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_dead()
            if self.healthy():
                return time.monotonic() - self._started_at
            if time.monotonic() > deadline:
                raise LeukError(f"the SuperLink did not become healthy within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        """True if GET /health answers 200 on the admin and the public socket (TLS verified against the CA)."""
        try:
            return all(http_get(host, port, "/health", self._ssl_context(), timeout=2.0)[0] == 200
                       for host, port in (("127.0.0.1", self.admin_port), (self.local_host, self.port)))
        except (OSError, http.client.HTTPException):
            return False

    def running(self) -> bool:
        """True while the SuperLink process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the SuperLink's process group, SIGKILL after `timeout` s; return its exit code.

        During a run the SuperLink can need ~55 s to exit on SIGTERM; between runs ~3 s.
        """
        if self.proc is None:
            return None
        code = kill_process_group(self.proc, timeout)
        self.pid_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    # ------------------------------------------------------------------ sites

    def register_site(self, public_key: str | Path, name: str) -> int:
        """Register a site's public key and return its node id; an already registered key returns its id."""
        return self.register_sites({name: public_key})[name]

    def register_sites(self, public_keys: Mapping[str, str | Path]) -> dict[str, int]:
        """Register several sites ({name: site.pub}); keys this state dir already registered cost no call."""
        statuses = {int(str(n["node-id"])): str(n["status"]) for n in self.list_nodes()}
        known = {str(s["public_key_sha256"]): int(s["node_id"]) for s in self.sites().values()}
        ids = {}
        for name, key in public_keys.items():
            pub = Path(key).expanduser().resolve()
            digest = public_key_digest(pub)
            node_id = known.get(digest)
            if node_id is None or node_id not in statuses:  # new key, or the database was reset
                node_id = self._register(pub, name)
            _refuse_unregistered(pub, node_id, statuses.get(node_id, ""))
            self._remember_site(name, node_id, digest)
            ids[name] = node_id
        return ids

    def _register(self, pub: Path, name: str) -> int:
        try:
            return int(str(self.cli.json("supernode", "register", str(pub), CONNECTION, "--name", name)["node-id"]))
        except FlwrCliError as err:
            if "code: 23" not in str(err) and "already in use" not in str(err):
                raise
        # "public key already in use": registered earlier, but this state dir lost track of it.
        node_id = registered_node_id(self.database_path, pub)
        if node_id is None:
            raise LeukError(f"{pub} is already registered with this SuperLink, but its node id is unknown here")
        return node_id

    def sites(self) -> dict[str, dict[str, int | str]]:
        """Registered sites known to this state dir: {name: {"node_id": int, "public_key_sha256": str}}."""
        try:
            data = json.loads(self.sites_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise LeukError(f"{self.sites_path} is unreadable ({exc}); restore it or register the sites again") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("node_id"), int) and isinstance(v.get("public_key_sha256"), str)
                for v in data.values()):
            raise LeukError(f"{self.sites_path} is not a JSON object of sites (node_id, public_key_sha256); "
                            "restore it or register the sites again")
        return {str(k): v for k, v in data.items()}

    def _remember_site(self, name: str, node_id: int, digest: str) -> None:
        sites = self.sites()
        sites[name] = {"node_id": node_id, "public_key_sha256": digest}
        atomic_write_text(self.sites_path, json.dumps(sites, indent=2, sort_keys=True))

    def list_nodes(self) -> list[dict[str, object]]:
        """`flwr supernode list`: dicts with node-id, status (registered|online|offline|unregistered), ..."""
        return list(self.cli.json("supernode", "list", CONNECTION).get("nodes", []))

    def online_node_ids(self) -> set[int]:
        """Node ids the SuperLink currently counts as online."""
        return {int(str(n["node-id"])) for n in self.list_nodes() if n.get("status") == "online"}

    # ------------------------------------------------------------------ runs

    def submit(self, app_dir: str | Path, run_config: Mapping[str, ConfigValue] | Path | None = None) -> int:
        """`flwr run APP_DIR` with run-config overrides (a mapping or a .toml file); returns the run id at once.

        Only keys declared under [tool.flwr.app.config] may be overridden.
        """
        app = Path(app_dir).expanduser().resolve()
        if not (app / "pyproject.toml").is_file():
            raise LeukError(f"{app} is not a Flower app (no pyproject.toml)")
        args = ["run", str(app), CONNECTION]
        if isinstance(run_config, Path):
            if run_config.suffix != ".toml" or not run_config.is_file():
                raise LeukError(f"run config {run_config} must be an existing .toml file")
            args += ["--run-config", str(run_config.resolve())]
        elif run_config:
            _check_declared(app, run_config)
            args += ["--run-config", toml_pairs(run_config)]
        return int(self.cli.json(*args)["run-id"])

    def run_info(self, run_id: int) -> dict[str, object]:
        """The `flwr ls --run-id` record: status, status-details, timestamps, compute time."""
        record = self.cli.run_record(CONNECTION, run_id)
        if record is not None:
            return record
        runs = self.cli.json("ls", "--run-id", str(run_id), CONNECTION).get("runs", [])
        if not runs:
            raise LeukError(f"run {run_id} is unknown to this SuperLink")
        return dict(runs[0])

    def status(self, run_id: int) -> str:
        """pending | starting | running | finished:completed | finished:failed | finished:stopped."""
        return str(self.run_info(run_id)["status"])

    def wait(
        self,
        run_id: int,
        poll_s: float = 5.0,
        on_poll: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Poll until the run finishes; return its final status (e.g. `finished:completed`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._raise_if_dead()
            status = self.status(run_id)
            if on_poll is not None:
                on_poll(status)
            if status.startswith(FINISHED):
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise LeukError(f"run {run_id} still '{status}' after {timeout:.0f} s")
            time.sleep(poll_s)

    def logs(self, run_id: int) -> str:
        """The ServerApp's output of a run (`flwr log --show`), without colour codes."""
        proc = self.cli.raw("log", str(run_id), CONNECTION, "--show")
        lines = strip_ansi(proc.stdout).splitlines()
        keep = [ln for ln in lines if not ln.startswith("Using SuperLink:") and "Printing logstream" not in ln]
        return "\n".join(keep).strip() + "\n"

    def stop_run(self, run_id: int) -> None:
        """`flwr stop`: the run ends as finished:stopped within a few seconds."""
        self.cli.json("stop", str(run_id), CONNECTION)

    # ------------------------------------------------------------------ paths and plumbing

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def cli(self) -> FlwrCli:
        """The `flwr` CLI connected (as CONNECTION) to the admin address."""
        return FlwrCli(self.flwr_home)

    @property
    def log_path(self) -> Path:
        return self.state_dir / "superlink.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "superlink.pid"

    @property
    def sites_path(self) -> Path:
        return self.state_dir / "sites.json"

    @property
    def local_host(self) -> str:
        """Where this machine reaches the SuperLink (the certificate always covers 127.0.0.1)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::", "[::]") else self.host

    @property
    def address(self) -> str:
        """Where sites on this machine reach the SuperLink (Fleet only)."""
        return f"{self.local_host}:{self.port}"

    @property
    def admin_address(self) -> str:
        """The loopback address with the whole API (Control, Runtime): Flower's own launcher and the CLI."""
        return f"127.0.0.1:{self.admin_port}"

    def _connection(self) -> dict[str, object]:
        if self.ca is None:
            return {"address": self.admin_address, "insecure": True}
        return {"address": self.admin_address, "root-certificates": str(self.ca)}

    def _ssl_context(self) -> ssl.SSLContext | None:
        return None if self.ca is None else ssl.create_default_context(cafile=str(self.ca))

    def _raise_if_dead(self) -> None:
        if self.proc is None:
            raise LeukError("the SuperLink is not started")
        code = self.proc.poll()
        if code is not None:
            tail = _last_attempt(log_tail(self.log_path, 200))
            reason = _death_reason(tail, self.port)
            raise LeukError(f"{reason} (exit code {code}); last lines of {self.log_path}:\n" + "\n".join(tail[-8:]))

def _ip(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip()))
    except ValueError:
        raise LeukError(f"--admin-allow: {address!r} is not an IP address") from None


def _check_declared(app: Path, run_config: Mapping[str, ConfigValue]) -> None:
    """Flower only says "Invalid run configuration": name the keys the app does not declare."""
    try:
        declared = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    except (KeyError, tomllib.TOMLDecodeError):
        declared = {}
    unknown = sorted(set(run_config) - set(_flat_keys(declared)))
    if unknown:
        raise LeukError(f"run config keys {unknown} are not declared in {app}/pyproject.toml [tool.flwr.app.config]")


def _flat_keys(table: Mapping[str, object], prefix: str = "") -> list[str]:
    keys = []
    for key, value in table.items():
        keys += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [f"{prefix}{key}"]
    return keys


def _refuse_unregistered(pub: Path, node_id: int, status: str) -> None:
    if status in ("unregistered", "deleted"):
        raise LeukError(
            f"the key {pub} was unregistered (node {node_id}) and can never be registered again: "
            "create a new key pair for this site (`leuk certs add-site` with a new name)"
        )


def _last_attempt(text: str) -> list[str]:
    """Log lines written since our last `=== leukfed:` header (the current process)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("=== leukfed:")]
    return lines[starts[-1] + 1 :] if starts else lines


def _death_reason(lines: list[str], port: int) -> str:
    text = "\n".join(lines).lower()
    if "address already in use" in text or "errno 98" in text:
        return f"the SuperLink could not listen on port {port}: address already in use"
    if "sslerror" in text or "pem lib" in text:
        return "the SuperLink could not load its TLS certificate or key"
    if "unable to open database" in text or "sqlite" in text:
        return "the SuperLink could not open its database"
    return "the SuperLink exited early"
