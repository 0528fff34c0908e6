"""Federation PKI: SANs, chain, permissions, no overwrites, add-site, site names, CLI."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from leukfed.common.errors import LeukError
from leukfed.common.site_keys import generate_site_key, validate_site_name
from leukfed.server.certs import CertsLayout, add_site, init_certs, site_fingerprint
from leukfed.server.certs_cli import certs_app
from leukfed.server.tls_certificates import certificate_fingerprint
from leukfed.server.tls_certificates import check_server_certs


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    out = tmp_path_factory.mktemp("pki") / "certs"
    return init_certs(out, ["coord.hospital-net.example,10.1.2.3"], ["h1", "site_2"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_cert_has_given_and_mandatory_sans(layout: CertsLayout) -> None:
    san = _cert(layout.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.hospital-net.example", "localhost"}
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert ips == {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}


def test_loopback_san_added_even_for_ip_only(tmp_path: Path) -> None:
    lay = init_certs(tmp_path / "c", ["192.168.7.7"], [])
    san = _cert(lay.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


def test_chain_verifies_and_ca_is_a_ca(layout: CertsLayout) -> None:
    ca, server = _cert(layout.ca_cert), _cert(layout.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    check_server_certs(layout.ca_cert, layout.server_cert, layout.server_key)  # what the SuperLink checks


def test_private_keys_are_0600_and_loadable(layout: CertsLayout) -> None:
    site = layout.site("h1")
    for key in (layout.ca_key, layout.server_key, site.private_key, layout.site("site_2").private_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    private = serialization.load_ssh_private_key(site.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    pub_text = site.public_key.read_text()
    assert pub_text.startswith("ecdsa-sha2-nistp384 ") and pub_text.count("\n") == 1
    public = serialization.load_ssh_public_key(pub_text.encode())
    assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]


def test_site_folder_is_self_contained(layout: CertsLayout) -> None:
    site = layout.site("h1")
    assert site.ca_cert.read_bytes() == layout.ca_cert.read_bytes()
    assert sorted(p.name for p in site.dir.iterdir()) == ["ca.crt", "peers", "site.key", "site.pub"]
    assert sorted(p.name for p in (site.dir / "peers").iterdir()) == ["h1.pub", "site_2.pub"]
    assert (site.dir / "peers" / "site_2.pub").read_bytes() == layout.site("site_2").public_key.read_bytes()
    readme = layout.readme.read_text()
    assert "ca.key" in readme and "SECRET" in readme and "sites/h1/" in readme and "DEMO" in readme


def test_never_overwrites(layout: CertsLayout) -> None:
    before = layout.ca_key.read_bytes()
    with pytest.raises(LeukError, match="ca.crt already exists"):
        init_certs(layout.root, ["x"], ["h9"])
    with pytest.raises(LeukError, match=r"sites/h1/site.key already exists"):
        add_site(layout.root, "h1")
    assert layout.ca_key.read_bytes() == before
    assert not layout.site("h9").dir.exists()


def test_add_site_later(tmp_path: Path) -> None:
    lay = init_certs(tmp_path / "c", ["coord"], ["a"])
    site = add_site(lay.root, "late-comer")
    assert stat.S_IMODE(site.private_key.stat().st_mode) == 0o600
    assert lay.site_names() == ["a", "late-comer"]
    assert "sites/late-comer/" in lay.readme.read_text()
    with pytest.raises(LeukError, match="run `leuk certs init"):
        add_site(tmp_path / "nothing-here", "b")


@pytest.mark.parametrize("bad", ["", "a b", "../x", "h/1", "-lead", "é", "a" * 64, "x.y"])
def test_bad_site_names(bad: str, tmp_path: Path) -> None:
    with pytest.raises(LeukError, match="invalid site name"):
        validate_site_name(bad)
    with pytest.raises(LeukError, match="invalid site name"):
        init_certs(tmp_path / "c", ["coord"], [bad])
    assert not (tmp_path / "c").exists()  # nothing half-created


def test_bad_server_name(tmp_path: Path) -> None:
    with pytest.raises(LeukError, match="invalid server name"):
        init_certs(tmp_path / "c", ["bad_name!"], [])


def test_fingerprint_pem_and_der_agree(layout: CertsLayout) -> None:
    pem = layout.server_cert.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    fp = certificate_fingerprint(pem)
    assert fp == certificate_fingerprint(der) and len(fp) == 64


def test_server_cert_checks_catch_mistakes(layout: CertsLayout, tmp_path: Path) -> None:
    other = init_certs(tmp_path / "other", ["coord"], [])
    with pytest.raises(LeukError, match="is not the private key"):
        check_server_certs(layout.ca_cert, layout.server_cert, other.server_key)
    with pytest.raises(LeukError, match="is not signed by the CA"):
        check_server_certs(other.ca_cert, layout.server_cert, layout.server_key)


def test_cli_init_and_add_site(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(certs_app, ["init", "--out", str(out), "--server-name", "coord,10.0.0.1", "--sites", "h1,h2"])
    assert res.exit_code == 0, res.output
    assert "127.0.0.1" in res.output and (out / "sites/h2/site.key").is_file()
    res = runner.invoke(certs_app, ["add-site", "--out", str(out), "h3"])
    assert res.exit_code == 0 and (out / "sites/h3/site.pub").is_file()
    res = runner.invoke(certs_app, ["add-site", "--out", str(out), "h3"])
    assert res.exit_code == 2 and "already exists" in res.output
    assert "DEMO ONLY" in runner.invoke(certs_app, ["add-site", "--out", str(out), "h4"]).output


def test_site_made_key_registered_by_public_key(tmp_path: Path) -> None:
    lay = init_certs(tmp_path / "c", ["coord"])
    made = generate_site_key(tmp_path / "at-the-site", "h1")
    assert stat.S_IMODE(made.private_key.stat().st_mode) == 0o600
    site = add_site(lay.root, "h1", made.public_key)
    assert not site.private_key.exists() and sorted(p.name for p in site.dir.iterdir()) == ["site.pub"]
    assert site_fingerprint(site) == made.fingerprint
    assert lay.site_names() == ["h1"]
    assert (lay.bundle / "ca.crt").read_bytes() == lay.ca_cert.read_bytes()
    assert (lay.bundle / "peers" / "h1.pub").read_bytes() == site.public_key.read_bytes()
    assert "leuk-client keygen" in lay.readme.read_text()
    with pytest.raises(LeukError, match="already exists"):
        add_site(lay.root, "h1", made.public_key)
    with pytest.raises(LeukError, match="already registered as site 'h1'"):
        add_site(lay.root, "h2", made.public_key)
    with pytest.raises(LeukError, match="already exists"):
        generate_site_key(tmp_path / "at-the-site")  # a site key is never overwritten


def test_cli_keygen_then_add_site_print_the_same_fingerprint(tmp_path: Path) -> None:
    from leukfed.client.cli import app as client_app

    runner = CliRunner()
    out = tmp_path / "c"
    assert runner.invoke(certs_app, ["init", "--out", str(out), "--server-name", "coord"]).exit_code == 0
    made = runner.invoke(client_app, ["keygen", "--out", str(tmp_path / "h1"), "--site", "h1"])
    assert made.exit_code == 0, made.output
    added = runner.invoke(certs_app, ["add-site", "--out", str(out), "h1", "--public-key", str(tmp_path / "h1" / "site.pub")])
    assert added.exit_code == 0, added.output
    fingerprints = [line.split()[3] for r in (made, added) for line in r.output.splitlines()
                    if line.startswith("public key fingerprint")]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1] and fingerprints[0].startswith("SHA256:")
    assert "DEMO" not in added.output
