"""Site keys are born at the site: the coordinator holds only public keys, refuses bad ones, and a full
disk during `leuk certs init` leaves no half-written key behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cli_errors import assert_one_line_error
from leukfed.common.site_keys import generate_site_key
from leukfed.server.certs import CertsLayout, add_site, init_certs

PY = sys.executable
LEUK = [PY, "-c", "from leukfed.cli import main; main()"]
CLIENT = [PY, "-c", "from leukfed.client.cli import main; main()"]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def private_keys_in(folder: Path) -> list[Path]:
    """Every file under `folder` that holds a private key of any kind."""
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


@pytest.fixture
def coordinator(tmp_path: Path) -> CertsLayout:
    return init_certs(tmp_path / "coordinator", ["localhost"])


def test_after_the_site_flow_the_coordinator_holds_no_site_private_key(coordinator: CertsLayout, tmp_path: Path) -> None:
    made = {}
    for name in ("h1", "h2"):
        result = run([*CLIENT, "keygen", "--out", str(tmp_path / f"site-{name}"), "--site", name])
        assert result.returncode == 0, result.stderr
        made[name] = tmp_path / f"site-{name}"
        added = run([*LEUK, "certs", "add-site", name, "--out", str(coordinator.root),
                     "--public-key", str(made[name] / "site.pub")])
        assert added.returncode == 0, added.stderr
        site_fp = next(line for line in result.stdout.splitlines() if "fingerprint" in line).split()[-1]
        assert site_fp in added.stdout
    assert sorted(private_keys_in(coordinator.root)) == sorted([coordinator.ca_key, coordinator.server_key])
    assert not list(coordinator.root.rglob("site.key"))
    assert coordinator.site_names() == ["h1", "h2"]
    for name, folder in made.items():
        assert (folder / "site.key").stat().st_mode & 0o777 == 0o600
        assert (coordinator.bundle / "peers" / f"{name}.pub").read_text().split()[:2] == \
            (folder / "site.pub").read_text().split()[:2]


def _openssh(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


BAD_KEYS = {
    "rsa": (lambda: _openssh(rsa.generate_private_key(65537, 2048)), "RSA key, not an EC secp384r1"),
    "ed25519": (lambda: _openssh(ed25519.Ed25519PrivateKey.generate()), "not an EC secp384r1"),
    "p256-openssh": (lambda: _openssh(ec.generate_private_key(ec.SECP256R1())), "curve secp256r1"),
    "p521-pem": (lambda: _pem(ec.generate_private_key(ec.SECP521R1())), "curve secp521r1"),
    "malformed": (lambda: b"ecdsa-sha2-nistp384 AAAAnot-base64!! x\n", "is not a public key"),
    "truncated": (lambda: _openssh(ec.generate_private_key(ec.SECP384R1()))[:60], "is not a public key"),
    "empty": (lambda: b"", "is not a public key"),
    "binary": (lambda: os.urandom(300), "is not a public key"),
    "huge": (lambda: b"A" * (1 << 20), "over 16384 bytes"),
    "private-key": (lambda: ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), "PRIVATE key"),
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_bad_public_keys_are_refused_with_one_line(coordinator: CertsLayout, tmp_path: Path, kind: str) -> None:
    make, needle = BAD_KEYS[kind]
    path = tmp_path / "offered.pub"
    path.write_bytes(make())
    result = run([*LEUK, "certs", "add-site", "h9", "--out", str(coordinator.root), "--public-key", str(path)])
    assert_one_line_error(result, needle)
    assert coordinator.site_names() == [] and not coordinator.site("h9").dir.exists()


def test_special_files_offered_as_keys_are_refused(coordinator: CertsLayout, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.pub"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path, tmp_path / "missing.pub"):
        result = run([*LEUK, "certs", "add-site", "h9", "--out", str(coordinator.root), "--public-key", str(path)])
        assert_one_line_error(result, "not found")


# ---------------------------------------------------------------- full disk


def _limited(limit: int, *args: str) -> list[str]:
    """`leuk ARGS` in a process whose files may not grow past `limit` bytes (writes then fail: EFBIG)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = ['leuk', *{list(args)!r}]; "
            "from leukfed.cli import main; main()")
    return [PY, "-c", code]


@pytest.mark.parametrize("limit", [0, 200, 400, 800, 1400])
def test_full_disk_during_init_leaves_nothing_half_written(tmp_path: Path, limit: int) -> None:
    out = tmp_path / "certs"
    args = ["certs", "init", "--out", str(out), "--server-name", "coord", "--sites", "h1,h2"]
    result = run(_limited(limit, *args))
    assert_one_line_error(result, "cannot write")
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert left == [], left  # no 0-byte or partial ca.key, no temporary files
    again = run([*LEUK, *args])
    assert again.returncode == 0, again.stderr
    layout = CertsLayout.at(out)
    for key in (layout.ca_key, layout.server_key, layout.site("h1").private_key):
        assert key.stat().st_size > 100


def test_full_disk_during_keygen_and_add_site(tmp_path: Path, coordinator: CertsLayout) -> None:
    site = tmp_path / "site"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); "
            f"sys.argv = ['leuk-client', 'keygen', '--out', {str(site)!r}]; "
            "from leukfed.client.cli import main; main()")
    assert_one_line_error(run([PY, "-c", code]), "cannot write")
    assert not site.exists() or not [p for p in site.iterdir()]
    made = generate_site_key(site, "h1")  # the rerun works
    before = sorted(p for p in coordinator.root.rglob("*"))
    result = run(_limited(1, "certs", "add-site", "h1", "--out", str(coordinator.root), "--public-key", str(made.public_key)))
    assert_one_line_error(result, "cannot write")
    assert sorted(p for p in coordinator.root.rglob("*")) == before
    add_site(coordinator.root, "h1", made.public_key)
    assert coordinator.site_names() == ["h1"]


# ---------------------------------------------------------------- an honest site joins


@pytest.mark.slow
def test_a_key_made_at_the_site_joins_a_real_superlink(coordinator: CertsLayout, tmp_path: Path) -> None:
    from leukfed.client.supernode import SuperNode
    from leukfed.common.flower.env import free_port
    from leukfed.server.superlink import SuperLink

    made = generate_site_key(tmp_path / "hospital", "h1")
    add_site(coordinator.root, "h1", made.public_key)
    link = SuperLink()
    node = None
    try:
        link.start(tmp_path / "server", port=free_port(),
                   certs=(coordinator.ca_cert, coordinator.server_cert, coordinator.server_key), supernode_auth=True)
        node_id = link.register_sites({n: s.public_key for n, s in coordinator.sites().items()})["h1"]
        node = SuperNode(f"127.0.0.1:{link.port}", state_dir=tmp_path / "node", ca=coordinator.bundle / "ca.crt",
                         private_key=made.private_key, node_config={"site-name": "h1"})
        node.start()
        assert node.wait_joined(timeout=90) == node_id
    finally:
        if node is not None:
            node.stop(timeout=10)
        link.terminate(timeout=5)
