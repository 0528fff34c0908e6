"""Offline environment, executables and config files shared by every Flower process we start."""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import socket
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path

from leukfed.common.atomic import atomic_write_text
from leukfed.common.errors import LeukError

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}
ConfigValue = bool | int | float | str

def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus a private FLWR_HOME, this Python's scripts first on PATH, and every switch that keeps
    Flower offline; `extra` last (a caller's own PATH wins)."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) through PATH: take them
    # from this Python environment, not from another Flower release found first (it refuses a mixed pair).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower console script (`flower-superlink`, `flwr`, ...) of this Python environment."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LeukError(f"cannot find the Flower program {name!r}: is flwr (1.41 or 1.42) installed in this environment?")
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
    return atomic_write_text(path, "\n".join(lines))


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
