"""`leuk certs init|add-site`: the coordinator's commands over the certificate folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from leukfed.common.errors import LeukError
from leukfed.server.certs import CertsLayout, add_site, init_certs, site_fingerprint
from leukfed.server.tls_certificates import certificate_fingerprint, server_certificate_names

T = TypeVar("T")

certs_app = typer.Typer(help="Create the federation's CA and server certificate; register hospitals' public keys.",
                        no_args_is_help=True)
DEMO_WARNING = ("DEMO ONLY: site private keys were made here, at the coordinator ({}); real hospitals make "
                "their own with `leuk-client keygen` and send only site.pub (`leuk certs add-site NAME --public-key`)")


@certs_app.command("init")
def init_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to create the certificates in.")],
    server_name: Annotated[
        list[str],
        typer.Option("--server-name", help="DNS name(s)/IP(s) hospitals dial, comma separated; repeatable."),
    ],
    sites: Annotated[str, typer.Option("--sites", help="DEMO ONLY: also make these sites' key pairs here "
                                       "(comma separated). Real sites: `leuk-client keygen` + `add-site --public-key`.")] = "",
) -> None:
    """Create a CA and the coordinator's TLS certificate (and, for demos, site key pairs)."""
    site_list = [s.strip() for s in sites.split(",") if s.strip()]
    layout = _run_cli(lambda: init_certs(out, server_name, site_list))
    typer.echo(f"created certificates in {layout.root}")
    typer.echo(f"server certificate valid for: {', '.join(server_certificate_names(layout.server_cert))}")
    typer.echo(f"CA fingerprint (sha256): {certificate_fingerprint(layout.ca_cert.read_bytes())}")
    if site_list:
        typer.echo(DEMO_WARNING.format(", ".join(site_list)), err=True)
        for name in site_list:
            typer.echo(f"demo site {name}: {layout.site(name).dir}")
    typer.echo(f"see {layout.readme} for which file goes where")


@certs_app.command("add-site")
def add_site_command(
    name: Annotated[str, typer.Argument(help="New hospital site name.")],
    out: Annotated[Path, typer.Option("--out", help="The certificate folder made by `leuk certs init`.")],
    public_key: Annotated[Optional[Path], typer.Option("--public-key", help="The site.pub the hospital made with "
                                                       "`leuk-client keygen` (without it: DEMO key pair made here).")] = None,
) -> None:
    """Register one more hospital by its public key."""
    site = _run_cli(lambda: add_site(out, name, public_key))
    if public_key is None:
        typer.echo(DEMO_WARNING.format(name), err=True)
        typer.echo(f"demo site {name}: {site.dir}")
    else:
        typer.echo(f"registered site {name}: {site.public_key}")
    typer.echo(f"public key fingerprint: {site_fingerprint(site)} (compare it with the hospital's by phone)")
    typer.echo(f"send {CertsLayout.at(out).bundle} (ca.crt, peers/) to every hospital")


def _run_cli(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except LeukError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
