"""Site key pairs: born at the hospital (`leuk-client keygen`), only the public half ever travels."""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from leukfed.common.atomic import atomic_create_bytes
from leukfed.common.errors import LeukError

SITE_CURVE = ec.SECP384R1  # what Flower's SuperNode authentication and leukfed's CA use
PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "site.key", "site.pub"
MAX_PUBLIC_KEY_BYTES = 16 * 1024  # an OpenSSH or PEM P-384 public key is a few hundred bytes
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class SiteKeyFiles:
    """A freshly made key pair and the fingerprint to read out by phone."""

    private_key: Path
    public_key: Path
    fingerprint: str


def validate_site_name(name: str) -> str:
    """Return `name` if it is a valid site name (letters, digits, - and _), else raise LeukError."""
    if not SITE_NAME_RE.match(name):
        raise LeukError(
            f"invalid site name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def generate_site_key(folder: str | Path, name: str = "") -> SiteKeyFiles:
    """Create `site.key` (0600, OpenSSH, EC P-384) and `site.pub` in `folder`; never overwrites."""
    if name:
        validate_site_name(name)
    folder = Path(folder).expanduser()
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise LeukError(f"{path} already exists: refusing to overwrite a site key (move it away first)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(SITE_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    created: list[Path] = []
    try:
        created.append(create_file(private_path, private, secret=True))
        created.append(create_file(public_path, public_key_line(key.public_key(), name)))
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return SiteKeyFiles(private_path, public_path, fingerprint(key.public_key()))


def create_file(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Create `path` atomically and exclusively: 0600 for secrets, else 0644; one-line LeukErrors."""
    try:
        return atomic_create_bytes(path, data, 0o600 if secret else 0o644)
    except FileExistsError:
        raise LeukError(f"{path} already exists: refusing to overwrite keys or certificates") from None
    except OSError as exc:
        raise LeukError(f"cannot write {path}: {exc.strerror or exc}") from None


def public_key_line(key: ec.EllipticCurvePublicKey, name: str = "") -> bytes:
    """The OpenSSH one-line form, commented with the site name."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (f" leukfed-site-{name}" if name else "").encode() + b"\n"


def read_site_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A site's public key (OpenSSH line or PEM), checked to be EC on SITE_CURVE; LeukError otherwise."""
    path = Path(path).expanduser()
    try:
        if not path.is_file():
            raise LeukError(f"public key file not found: {path}")
        with path.open("rb") as fh:
            data = fh.read(MAX_PUBLIC_KEY_BYTES + 1)
    except OSError as exc:
        raise LeukError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PUBLIC_KEY_BYTES:
        raise LeukError(f"{path} is not a site public key: over {MAX_PUBLIC_KEY_BYTES} bytes")
    if b"PRIVATE KEY" in data:
        raise LeukError(f"{path} holds a PRIVATE key: send only the public key (site.pub); the private key "
                        "must never leave the site (make a new key pair there, this one is exposed)")
    key = _parse_public_key(data.strip(), path)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.removeprefix("_").removesuffix("PublicKey")
        raise LeukError(f"{path} is a {kind} key, not an EC {SITE_CURVE.name} key: make the site key with "
                        "`leuk-client keygen`")
    if not isinstance(key.curve, SITE_CURVE):
        raise LeukError(f"{path} is an EC key on curve {key.curve.name}, expected {SITE_CURVE.name}: "
                        "make the site key with `leuk-client keygen`")
    return key


def _parse_public_key(data: bytes, path: Path):
    loaders = (serialization.load_ssh_public_key, serialization.load_pem_public_key)
    for load in loaders:
        try:
            return load(data)
        except (ValueError, UnsupportedAlgorithm, TypeError):
            continue
    raise LeukError(f"{path} is not a public key (expected the site.pub made by `leuk-client keygen`)")


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:...` of the OpenSSH key blob, as `ssh-keygen -l -f site.pub` prints it."""
    blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*spki) == b.public_bytes(*spki)


def keygen_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for site.key (secret, stays here) and site.pub.")],
    site: Annotated[Optional[str], typer.Option("--site", help="This site's name (written into site.pub).")] = None,
) -> None:
    """Create this hospital's key pair here; hand only site.pub to the coordinator."""
    files = generate_site_key(out, site or "")
    typer.echo(f"created {files.private_key} (secret: never copy it off this machine) and {files.public_key}")
    typer.echo(f"public key fingerprint: {files.fingerprint}")
    typer.echo(f"give {files.public_key} to the coordinator (`leuk certs add-site NAME --public-key site.pub`) "
               "and compare the fingerprint it prints with this one by phone")
