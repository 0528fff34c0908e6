"""`leuk-client`: one hospital's SuperNode, after checking its data, the server and its key."""
from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Optional

import typer

from leukfed.common.cli_support import run_app
from leukfed.common.settings import with_options

app = typer.Typer(help="Join a federated run as one hospital: train locally, send only model updates.",
                  add_completion=False, pretty_exceptions_enable=False)


def _site_files(certs: Path, site: str):
    """Accept the hospital's own folder (site.key, site.pub, ca.crt) or a whole `leuk certs init` folder."""
    from leukfed.common.errors import LeukError

    for folder in (certs, certs / "sites" / site):
        key, ca = folder / "site.key", folder / "ca.crt"
        if key.exists() and ca.exists():
            return ca, key
    raise LeukError(f"no site.key and ca.crt for site {site!r} in {certs} (`leuk-client keygen --out DIR` makes site.key; "
                    "ca.crt and peers/ come from the coordinator's hospital-bundle/)")


def _check_data(data: Path) -> tuple[tuple[str, ...], dict]:
    """The checks of `leuk data check`: refuse to join with unusable data, before touching the network.
    Returns the class names and the report."""
    from leukfed.common.data import scan_dataset
    from leukfed.common.data_check import check_dataset
    from leukfed.common.errors import LeukError

    report = check_dataset(data)
    problems = report.get("problems") or []
    if report.get("unreadable"):
        raise LeukError(f"refusing to join: {len(report['unreadable'])} unreadable images in {data} "
                        f"(e.g. {report['unreadable'][0]}); run `leuk data check {data}`")
    if report.get("ok") is False:
        raise LeukError(f"refusing to join: {problems[0] if problems else 'the data check failed'}")
    return scan_dataset(data).class_names, report


def _wait_for_server(host: str, port: int, ca, wait: float):
    """Preflight the server; a refused connection is retried for `wait` s (the coordinator may start later)."""
    import time

    from leukfed.client.preflight import check_server
    from leukfed.common.errors import LeukError

    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            return check_server(host, port, ca)
        except LeukError as exc:
            if "connection refused" not in str(exc) or time.monotonic() >= deadline:
                raise
            if not announced:
                typer.echo(f"waiting up to {wait:.0f}s for the server at {host}:{port} (connection refused)")
                announced = True
            time.sleep(2.0)


def _approved_launcher(state: Path, approvals: Path | None) -> tuple[Path, Path]:
    """Refuse to start with code the hospital has not approved; every task is checked again at launch.

    Returns the guarded `flwr-clientapp` launcher and the approvals file."""
    from leukfed.client.approval import verify, write_guarded_launcher

    approvals = (approvals or state / "approvals.json").expanduser().resolve()
    verify(approvals)
    launcher = write_guarded_launcher(state / "bin", approvals)
    typer.echo(f"code approved ({approvals}); each task's code and app bundle are checked before they run")
    return launcher, approvals


def _parse_server(server: str) -> tuple[str, int]:
    from leukfed.common.errors import LeukError

    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise LeukError(f"--server must be HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)


def _site_policy(ctx: typer.Context, policy_file: Path | None, settings: dict, state: Path) -> Path:
    """The hospital's policy: its file (if any), then the options given on the command line; written to
    STATE/site-policy.toml, which every task reads before touching the data."""
    from click.core import ParameterSource

    from leukfed.client.policy import SitePolicy
    from leukfed.common.atomic import atomic_write_text

    base = SitePolicy.load(policy_file) if policy_file else SitePolicy()
    given = {name: value for name, value in settings.items()
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    policy = dataclasses.replace(base, **given)
    path = state / "site-policy.toml"
    atomic_write_text(path, policy.to_toml())
    typer.echo(f"site policy ({path}): {policy.summary()}")
    return path


def join(
    ctx: typer.Context,
    server: Optional[str] = typer.Option(None, "--server", help="The coordinator's HOST:PORT."),
    data: Optional[Path] = typer.Option(None, "--data", help="This hospital's image folder (never leaves the site)."),
    site: Optional[str] = typer.Option(None, "--site", help="This site's name (as registered with `leuk certs add-site`)."),
    certs: Optional[Path] = typer.Option(None, "--certs", help="This site's key folder: site.key (from `leuk-client keygen`), ca.crt and peers/ (from the coordinator's hospital-bundle/)."),
    device: str = typer.Option("auto", "--device", help="auto (GPU when present), cpu, cuda or cuda:N."),
    state: Optional[Path] = typer.Option(None, "--state", help="Site state folder: audit log, node logs (default ~/.leukfed/SITE)."),
    insecure: bool = typer.Option(False, "--insecure", help="Connect without TLS (only to an --insecure test server)."),
    wait: float = typer.Option(120.0, "--wait", help="Seconds to keep retrying while the server refuses connections."),
    approvals: Optional[Path] = typer.Option(None, "--approvals", help="Approvals file from `leuk-client approve` (default: STATE/approvals.json)."),
    require_secagg: bool = typer.Option(False, "--require-secure-aggregation", help="Train only in secure-aggregation rounds."),
    dp_budget: float = typer.Option(0.0, "--dp-budget", help="Lifetime privacy budget on this site's data (epsilon at the "
                                    "run's delta, never above --dp-delta): stop contributing before a round would exceed it; refuse runs without DP. 0: none."),
    dp_noise: float = typer.Option(0.0, "--dp-noise", help="Train with at least this DP noise multiplier (0: the run's)."),
    image_cache: bool = typer.Option(True, "--image-cache/--no-image-cache", help="Keep decoded copies of this "
                                     "site's images and their hashes in STATE/image-cache (owner-only) so that rounds do not "
                                     "decode or hash them again."),
    cold_start: bool = typer.Option(False, "--cold-start", help="Start every task in a fresh process (Flower's "
                                    "default) instead of forking it from a process that imported torch once."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="This site's policy file (TOML, keys as the policy "
                                          "options below); the options given override it."),
    console: str = typer.Option("", "--console", help="PORT (or 127.0.0.1:PORT): serve this site's read-only "
                                "console on loopback (approvals, audit log, policy, DP budget, data check). Off unless given."),
    **policy_settings,
) -> None:
    """Check the data, check the server, start the SuperNode and keep it running."""
    if ctx.invoked_subcommand is not None:
        return
    from leukfed.client.supernode import SuperNode
    from leukfed.common.errors import LeukError

    if not (server and data and site and (certs or insecure)):
        raise LeukError("--server, --data, --site and --certs are required (see leuk-client --help)")
    host, port = _parse_server(server)
    if console:
        from leukfed.client.console import console_address

        console_address(console)   # a non-loopback address is refused before anything starts
    classes, data_report = _check_data(data)
    typer.echo(f"data ok: {data} ({len(classes)} classes: {', '.join(classes)})")
    ca, key = (None, None) if insecure else _site_files(certs, site)
    state = (state or Path.home() / ".leukfed" / site).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    policy_path = _site_policy(ctx, policy, policy_settings, state)  # a bad policy stops us before the network
    if console:
        from leukfed.client.console import SiteFiles, serve_console

        serve_console(SiteFiles(site, state, (approvals or state / "approvals.json").expanduser().resolve(),
                                data.resolve(), data_report, dp_budget), console, say=typer.echo)
    info = _wait_for_server(host, port, ca, wait)
    fingerprint = getattr(info, "fingerprint_sha256", "") or ""
    typer.echo(f"server {server} reachable" + (f", certificate sha256 {fingerprint}" if fingerprint else " (insecure)"))
    launcher, approvals = _approved_launcher(state, approvals)
    node_config = {"data-path": str(data.resolve()), "site-name": site, "audit-log": str(state / "audit.jsonl"),
                   "site-policy": str(policy_path), "device": device, "server-fingerprint": fingerprint,
                   "dp-budget": dp_budget, "dp-noise-multiplier": dp_noise, "dp-ledger": str(state / "privacy-ledger.json")}
    if key is not None:  # secure aggregation: sign round keys with the site key, pin the federation's site keys
        peers = certs / "sites" if (certs / "sites").is_dir() else certs / "peers"
        node_config.update({"site-key": str(Path(key).resolve()), "peer-keys": str(peers.resolve())})
    if require_secagg:
        node_config["secure-aggregation"] = "required"
    if image_cache:
        (state / "image-cache").mkdir(mode=0o700, exist_ok=True)
        node_config["image-cache"] = str(state / "image-cache")
    node = SuperNode(server, state_dir=state / "supernode", ca=ca, private_key=key, node_config=node_config,
                     insecure=insecure, env={"PATH": f"{launcher.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                     approved_launcher=None if cold_start else launcher,
                     approvals=None if cold_start else approvals)
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    try:
        node.supervise(on_event=lambda kind, message: typer.echo(f"{kind}: {message}"),
                       should_stop=lambda: stopping["now"])
    except KeyboardInterrupt:
        node.stop()
    typer.echo(f"left the federation; audit log: {state / 'audit.jsonl'}")


def _policy_options() -> list:
    from leukfed.client.policy import SitePolicy
    from leukfed.common.settings import cli_parameters

    return cli_parameters(SitePolicy, "site")


app.callback(invoke_without_command=True)(with_options(join, _policy_options()))

from leukfed.client.approval import approve_command  # noqa: E402  (light: no torch, no flwr)

app.command("approve")(approve_command)
from leukfed.common.site_keys import keygen_command  # noqa: E402  (light: cryptography only)

app.command("keygen")(keygen_command)

audit_app = typer.Typer(help="The site's audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(audit_log: Path = typer.Option(..., "--audit-log", help="The site's log (STATE/audit.jsonl).")) -> None:
    """Check the log's hash chain: OK with the number of entries, or the first removed, edited or reordered line."""
    from leukfed.client.audit import verify_chain

    report = verify_chain(audit_log)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


main = run_app(app)
