"""X.509 for the SuperLink's TLS: the federation CA and server certificates, their names and fingerprints."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
import time
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leukfed.common.errors import LeukError

CA_DAYS = 3650
SERVER_DAYS = 825
# Backdate validity so a coordinator or hospital whose clock runs a little behind still accepts the certs.
CLOCK_SKEW = dt.timedelta(days=1)
ALWAYS_SANS = ("127.0.0.1", "localhost")  # the SuperLink dials itself on 127.0.0.1
DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


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


def server_certificate_names(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "leukfed"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))


def ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The self-signed federation CA certificate (may sign end-entity certificates only)."""
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


def server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    dns: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> x509.Certificate:
    """The SuperLink's TLS certificate for `dns` and `ips`, signed by the CA."""
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


def pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (written 0600 by the caller)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def check_server_certs(ca: Path, cert: Path, key: Path) -> None:
    """Raise LeukError unless cert is CA-signed, matches key, is valid now and covers 127.0.0.1."""
    for p in (ca, cert, key):
        if not p.is_file():
            raise LeukError(f"certificate file {p} not found")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
        server = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise LeukError(f"cannot read the TLS files {ca.name}/{cert.name}/{key.name}: {err}") from None
    if private.public_key().public_bytes(*_SPKI) != server.public_key().public_bytes(*_SPKI):
        raise LeukError(f"{key} is not the private key of {cert}")
    try:
        server.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise LeukError(f"{cert} is not signed by the CA {ca}: {type(err).__name__}") from None
    now = time.time()
    if not server.not_valid_before_utc.timestamp() <= now <= server.not_valid_after_utc.timestamp():
        raise LeukError(
            f"{cert} is valid only from {server.not_valid_before_utc:%Y-%m-%d} to "
            f"{server.not_valid_after_utc:%Y-%m-%d}: check this machine's clock or renew the certificate"
        )
    ips = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if "127.0.0.1" not in map(str, ips.get_values_for_type(x509.IPAddress)):
        # Flower's own launcher dials 127.0.0.1: without this SAN runs stay pending forever.
        raise LeukError(f"{cert} has no IP SAN 127.0.0.1: re-create it with `leuk certs init`")


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_digest(pub: Path) -> str:
    """SHA-256 of an OpenSSH public key's blob (comment ignored)."""
    try:
        blob = base64.b64decode(pub.read_text(encoding="utf-8").split()[1])
    except (OSError, IndexError, ValueError):
        raise LeukError(f"{pub} is not an OpenSSH public key (site.pub)") from None
    return hashlib.sha256(blob).hexdigest()
