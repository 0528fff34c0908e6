"""Federation PKI: a private CA, the SuperLink TLS certificate and per-site SuperNode auth keys."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leukfed.common.errors import LeukError

CA_DAYS = 3650
SERVER_DAYS = 825
# Backdate validity so a coordinator or hospital whose clock runs a little behind still accepts the certs.
CLOCK_SKEW = dt.timedelta(days=1)
ALWAYS_SANS = ("127.0.0.1", "localhost")  # the SuperLink dials itself on 127.0.0.1
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
T = TypeVar("T")


@dataclass(frozen=True)
class SiteFiles:
    """The folder handed to one hospital, plus its public key kept by the coordinator."""

    name: str
    dir: Path
    private_key: Path  # secret, hospital only
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


def validate_site_name(name: str) -> str:
    """Return `name` if it is a valid site name (letters, digits, - and _), else raise LeukError."""
    if not SITE_NAME_RE.match(name):
        raise LeukError(
            f"invalid site name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def parse_server_names(names: list[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Split host names and IP addresses (comma lists allowed), adding 127.0.0.1 and localhost."""
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    items = [s.strip() for n in names for s in n.split(",") if s.strip()]
    for item in [*items, *ALWAYS_SANS]:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            host = item.lower().rstrip(".")
            if not all(DNS_LABEL_RE.match(label) for label in host.split(".")):
                raise LeukError(f"invalid server name {item!r}: expected a DNS name or an IP address") from None
            if host not in dns:
                dns.append(host)
            continue
        if ip not in ips:
            ips.append(ip)
    return dns, ips


def certificate_fingerprint(cert_bytes: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (accepts PEM or DER)."""
    if cert_bytes.lstrip().startswith(b"-----BEGIN"):
        cert_bytes = x509.load_pem_x509_certificate(cert_bytes).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(cert_bytes).hexdigest()


def init_certs(out_dir: str | Path, server_names: list[str], sites: list[str]) -> CertsLayout:
    """Create the CA, the SuperLink certificate and one auth key pair per site; never overwrites."""
    layout = CertsLayout.at(out_dir)
    for name in sites:
        validate_site_name(name)
    if len(set(sites)) != len(sites):
        raise LeukError(f"duplicate site names in {sites}")
    dns, ips = parse_server_names(server_names)
    targets = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]
    targets += [f for s in sites for f in (layout.site(s).private_key, layout.site(s).public_key)]
    _refuse_existing(targets)

    _make_private_dir(layout.root)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    primary = next((s.strip() for n in server_names for s in n.split(",") if s.strip()), "localhost")
    server_cert = _server_certificate(server_key, ca_key, ca_cert, primary, dns, ips)

    _write_new(layout.ca_key, _pkcs8_pem(ca_key), secret=True)
    _write_new(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_new(layout.server_key, _pkcs8_pem(server_key), secret=True)
    _write_new(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for name in sites:
        _create_site(layout, name)
    _write_readme(layout)
    return layout


def add_site(out_dir: str | Path, name: str) -> SiteFiles:
    """Create one more site's key pair (and CA copy) in an existing certificate folder."""
    layout = CertsLayout.at(out_dir)
    validate_site_name(name)
    if not layout.ca_cert.is_file():
        raise LeukError(f"{layout.ca_cert} not found: run `leuk certs init --out {layout.root}` first")
    site = layout.site(name)
    _refuse_existing([site.private_key, site.public_key])
    _create_site(layout, name)
    _write_readme(layout)
    return site


def server_certificate_names(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


# ---------------------------------------------------------------- building blocks


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "leukfed"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _name("leukfed federation CA")
    builder = _validity(x509.CertificateBuilder(), CA_DAYS)
    builder = (
        builder.subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA384())


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    dns: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    builder = _validity(x509.CertificateBuilder(), SERVER_DAYS)
    builder = (
        builder.subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA384())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _create_site(layout: CertsLayout, name: str) -> None:
    site = layout.site(name)
    _make_private_dir(site.dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(site.private_key, private, secret=True)
    _write_new(site.public_key, public + f" leukfed-site-{name}\n".encode())
    if not site.ca_cert.exists():
        _write_new(site.ca_cert, layout.ca_cert.read_bytes())


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        if p.exists():
            raise LeukError(f"{p} already exists: refusing to overwrite keys or certificates (move it away first)")


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_new(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Create `path` exclusively (O_EXCL), 0600 for secrets and 0644 otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    except FileExistsError:
        raise LeukError(f"{path} already exists: refusing to overwrite keys or certificates") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if secret else 0o644)  # the umask may have narrowed 0644; 0600 stays exact


def _write_readme(layout: CertsLayout) -> None:
    names = server_certificate_names(layout.server_cert) if layout.server_cert.is_file() else []
    fp = certificate_fingerprint(layout.ca_cert.read_bytes())
    rows = [
        ("ca.crt", "coordinator + every hospital", "public"),
        ("ca.key", "nowhere online: keep offline (only needed to issue a new server cert)", "SECRET"),
        ("server.pem", "coordinator (leuk-server)", "public"),
        ("server.key", "coordinator (leuk-server)", "SECRET"),
    ]
    for name in layout.site_names():
        rows.append((f"sites/{name}/  (whole folder)", f"hospital {name!r} (leuk-client)", "contains a secret"))
        rows.append((f"sites/{name}/site.key", f"hospital {name!r} only; delete here after copying", "SECRET"))
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

Every hospital gets exactly its own folder sites/<name>/ (site.key, site.pub, ca.crt).
Private keys (*.key) are created with permissions 0600: copy them with scp/sftp or a USB key,
never by e-mail, and keep them 0600 on the target machine.
A hospital must compare the CA fingerprint above with the one the coordinator tells it by phone.
Add a hospital later with `leuk certs add-site --out {layout.root} NAME`.
Nothing here is ever overwritten: to replace a file, move the old one away first.
"""
    tmp = layout.readme.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, layout.readme)


# ---------------------------------------------------------------- CLI (`leuk certs ...`)

certs_app = typer.Typer(help="Create the federation's CA, server certificate and hospital keys.", no_args_is_help=True)


@certs_app.command("init")
def init_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to create the certificates in.")],
    server_name: Annotated[
        list[str],
        typer.Option("--server-name", help="DNS name(s)/IP(s) hospitals dial, comma separated; repeatable."),
    ],
    sites: Annotated[str, typer.Option("--sites", help="Hospital site names, comma separated (h1,h2,h3).")] = "",
) -> None:
    """Create a CA, the coordinator's TLS certificate and one key pair per hospital."""
    site_list = [s.strip() for s in sites.split(",") if s.strip()]
    layout = _run_cli(lambda: init_certs(out, server_name, site_list))
    typer.echo(f"created certificates in {layout.root}")
    typer.echo(f"server certificate valid for: {', '.join(server_certificate_names(layout.server_cert))}")
    typer.echo(f"CA fingerprint (sha256): {certificate_fingerprint(layout.ca_cert.read_bytes())}")
    for name in site_list:
        typer.echo(f"site {name}: give {layout.site(name).dir} to that hospital")
    typer.echo(f"see {layout.readme} for which file goes where")


@certs_app.command("add-site")
def add_site_command(
    name: Annotated[str, typer.Argument(help="New hospital site name.")],
    out: Annotated[Path, typer.Option("--out", help="The certificate folder made by `leuk certs init`.")],
) -> None:
    """Create a key pair for one more hospital."""
    site = _run_cli(lambda: add_site(out, name))
    typer.echo(f"created {site.dir}: give this folder to hospital {name}; the coordinator registers {site.public_key}")


def _run_cli(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except LeukError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
