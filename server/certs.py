"""The federation's certificate folder: CA and server certificate, registered site keys, hospital bundle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from leukfed.common.atomic import atomic_write_bytes, atomic_write_text
from leukfed.common.errors import LeukError
from leukfed.common.site_keys import (create_file, fingerprint, generate_site_key,
                                      public_key_line, read_site_public_key, same_key,
                                      validate_site_name)
from leukfed.server.tls_certificates import (ca_certificate, certificate_fingerprint, parse_server_names,
                                             pkcs8_pem, server_certificate, server_certificate_names)


@dataclass(frozen=True)
class SiteFiles:
    """One site's folder at the coordinator: its public key (and, in demo mode only, its private key)."""

    name: str
    dir: Path
    private_key: Path  # secret, hospital only: exists here only for keys made with --sites (demo)
    public_key: Path  # registered with the SuperLink
    ca_cert: Path


@dataclass(frozen=True)
class CertsLayout:
    """Where every file of a certificate folder lives."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    readme: Path

    @classmethod
    def at(cls, root: str | Path) -> CertsLayout:
        """The layout of `root` (files may not exist yet)."""
        r = Path(root).expanduser().resolve()
        return cls(r, r / "ca.crt", r / "ca.key", r / "server.pem", r / "server.key", r / "README.txt")

    @property
    def bundle(self) -> Path:
        """What every hospital gets: ca.crt and peers/<name>.pub (the site keys it pins)."""
        return self.root / "hospital-bundle"

    def site(self, name: str) -> SiteFiles:
        """Paths of one site's folder (files may not exist yet)."""
        d = self.root / "sites" / name
        return SiteFiles(name, d, d / "site.key", d / "site.pub", d / "ca.crt")

    def site_names(self) -> list[str]:
        """Sites that have a public key in this folder."""
        sites = self.root / "sites"
        return sorted(p.parent.name for p in sites.glob("*/site.pub")) if sites.is_dir() else []

    def sites(self) -> dict[str, SiteFiles]:
        """All sites with a public key, by name."""
        return {n: self.site(n) for n in self.site_names()}

    def require_server_files(self) -> None:
        """Raise LeukError unless the coordinator's TLS files are present."""
        for p in (self.ca_cert, self.server_cert, self.server_key):
            if not p.is_file():
                raise LeukError(f"missing {p}: create the certificates first with `leuk certs init --out {self.root}`")


def init_certs(out_dir: str | Path, server_names: list[str], sites: list[str] = ()) -> CertsLayout:
    """Create the CA and the SuperLink certificate; never overwrites, all or nothing.

    `sites` is the DEMO mode: it also makes those sites' key pairs here, at the coordinator. A real
    hospital makes its own (`leuk-client keygen`) and the coordinator registers the public half
    (`add_site(..., public_key=...)`)."""
    layout = CertsLayout.at(out_dir)
    sites = list(sites)
    for name in sites:
        validate_site_name(name)
    if len(set(sites)) != len(sites):
        raise LeukError(f"duplicate site names in {sites}")
    dns, ips = parse_server_names(server_names)
    targets = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]
    targets += [f for s in sites for f in (layout.site(s).private_key, layout.site(s).public_key)]
    _refuse_existing(targets)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    primary = next((s.strip() for n in server_names for s in n.split(",") if s.strip()), "localhost")
    server_cert = server_certificate(server_key, ca_key, ca_cert, primary, dns, ips)
    with _all_or_nothing(layout.root):
        create_file(layout.ca_key, pkcs8_pem(ca_key), secret=True)
        create_file(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        create_file(layout.server_key, pkcs8_pem(server_key), secret=True)
        create_file(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
        for name in sites:
            _create_demo_site(layout, name)
        _publish(layout)
    return layout


def add_site(out_dir: str | Path, name: str, public_key: str | Path | None = None) -> SiteFiles:
    """Register one more hospital by the public key it made itself (`leuk-client keygen`); without
    `public_key`, DEMO mode: make its key pair here."""
    layout = CertsLayout.at(out_dir)
    validate_site_name(name)
    if not layout.ca_cert.is_file():
        raise LeukError(f"{layout.ca_cert} not found: run `leuk certs init --out {layout.root}` first")
    site = layout.site(name)
    _refuse_existing([site.private_key, site.public_key])
    key = read_site_public_key(public_key) if public_key is not None else None
    if key is not None:
        for other in layout.sites().values():
            if same_key(key, read_site_public_key(other.public_key)):
                raise LeukError(f"this public key is already registered as site {other.name!r}: "
                                "every site needs a key pair of its own")
    with _all_or_nothing(layout.root):
        if key is None:
            _create_demo_site(layout, name)
        else:
            site.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            create_file(site.public_key, public_key_line(key, name))
        _publish(layout)
    return site


def site_fingerprint(site: SiteFiles) -> str:
    """The fingerprint of a registered site's public key, to compare with the hospital's by phone."""
    return fingerprint(read_site_public_key(site.public_key))


def _create_demo_site(layout: CertsLayout, name: str) -> None:
    """DEMO ONLY: the site's key pair made at the coordinator, in a folder to hand to that site."""
    site = layout.site(name)
    _make_private_dir(site.dir)
    generate_site_key(site.dir, name)
    if not site.ca_cert.exists():
        create_file(site.ca_cert, layout.ca_cert.read_bytes())


def _publish(layout: CertsLayout) -> None:
    """Refresh the hospital bundle (ca.crt, peers/<name>.pub for every site) and the README; demo site
    folders get the same peers/ folder."""
    sites = layout.sites()
    folders = [layout.bundle] + [s.dir for s in sites.values() if s.private_key.exists()]
    for folder in folders:
        peers = folder / "peers"
        peers.mkdir(mode=0o755, parents=True, exist_ok=True)
        if folder == layout.bundle:
            atomic_write_bytes(folder / "ca.crt", layout.ca_cert.read_bytes())
        for name, site in sites.items():
            atomic_write_bytes(peers / f"{name}.pub", site.public_key.read_bytes())
        for stale in peers.glob("*.pub"):
            if stale.stem not in sites:
                stale.unlink()
    _write_readme(layout)


@contextlib.contextmanager
def _all_or_nothing(root: Path) -> Iterator[None]:
    """On any failure (a full disk ...), delete every file and folder created under `root` inside the
    block, so that a rerun starts clean; OSError becomes a one-line LeukError."""
    existed = root.exists()
    _make_private_dir(root)
    before = set(root.rglob("*"))
    try:
        yield
    except BaseException as exc:
        created = sorted(set(root.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True)
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        if not existed:
            with contextlib.suppress(OSError):
                root.rmdir()
        if isinstance(exc, OSError):
            raise LeukError(f"cannot write in {root}: {exc.strerror or exc}; nothing was kept, "
                            "run the command again once fixed") from None
        raise


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        if p.exists():
            raise LeukError(f"{p} already exists: refusing to overwrite keys or certificates (move it away first)")


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_readme(layout: CertsLayout) -> None:
    names = server_certificate_names(layout.server_cert) if layout.server_cert.is_file() else []
    fp = certificate_fingerprint(layout.ca_cert.read_bytes())
    rows = [
        ("ca.crt", "coordinator + every hospital", "public"),
        ("ca.key", "nowhere online: keep offline (only needed to issue a new server cert)", "SECRET"),
        ("server.pem", "coordinator (leuk-server)", "public"),
        ("server.key", "coordinator (leuk-server)", "SECRET"),
        ("hospital-bundle/", "every hospital: ca.crt + peers/ (all site public keys, pinned)", "public"),
    ]
    for name, site in layout.sites().items():
        if site.private_key.exists():
            rows.append((f"sites/{name}/  (DEMO, whole folder)", f"hospital {name!r} (leuk-client)", "contains a secret"))
            rows.append((f"sites/{name}/site.key", "DEMO ONLY: made here, not at the site", "SECRET"))
        rows.append((f"sites/{name}/site.pub", "coordinator (registered with the server)", "public"))
    width = max(len(r[0]) for r in rows)
    header = f"  {'file'.ljust(width)}  machine  [secrecy]"
    table = "\n".join(f"  {f.ljust(width)}  {who}  [{secret}]" for f, who, secret in rows)
    text = f"""leukfed federation certificates
================================

Server certificate valid for: {", ".join(names) or "?"}
CA certificate SHA-256 fingerprint: {fp}

{header}
{table}

Site keys are born at the site. Each hospital runs, on its own machine:
    leuk-client keygen --out SITE_FOLDER --site NAME
which writes SITE_FOLDER/site.key (secret, 0600, never leaves that machine) and site.pub, and prints
the public key's fingerprint. The hospital sends only site.pub; the coordinator registers it with
    leuk certs add-site --out {layout.root} NAME --public-key site.pub
which prints the fingerprint again: compare the two by phone. The coordinator then sends every
hospital the contents of hospital-bundle/ (ca.crt and peers/), copied into SITE_FOLDER next to site.key;
send peers/ again to everyone whenever a site is added. A hospital compares the CA fingerprint above with
the one the coordinator tells it by phone, then starts `leuk-client --certs SITE_FOLDER --site NAME ...`.

DEMO ONLY: `leuk certs init --sites a,b` and `leuk certs add-site NAME` without --public-key make
the sites' private keys here, at the coordinator, in sites/<name>/ (for tests and trials on one
machine). Never use such keys for real patient data.
Private keys (*.key) are created with permissions 0600. Nothing here is ever overwritten: to replace a
file, move the old one away first.
"""
    atomic_write_text(layout.readme, text)
