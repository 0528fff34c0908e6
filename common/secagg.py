"""Secure-aggregation core: key agreement, masks, Shamir shares, quantisation and site signatures.

The protocol (Bonawitz et al. 2017, complete graph) runs between `server/secagg.py` (the coordinator's
half, a Grid wrapper) and `client/secagg.py` (the site's half, inside the ClientApp); both build on
this module, which imports neither Flower nor torch. X25519 key agreement, masks expanded with
ChaCha20 into Z/2^64, Shamir shares over GF(2^128) (pycryptodome, as Flower's `crypto.shamir`) of
each site's self-mask seed and masking key, sent AES-GCM-encrypted through the server.

Identity binding: a site signs its round public keys with its SITE KEY (the key its SuperNode
authenticates with) over run id, round id, node id, site name, the key bytes and the digest of the
round's content (the arrays and config every site will train from); every site checks the others'
signatures against the federation's site public keys it pins. A server can therefore neither invent a
site nor substitute or replay a site's round keys (`verify_round_keys`), nor send one site other
arrays or settings than the rest of the round (a "model inconsistency" attack: sites given a model
whose update is known, or clipped to a known value, would leave one site's update alone in the sum):
a site masks only the content whose digest every other site signed (`content_digest`).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from leukfed.common.errors import LeukError, SiteRefusal
from leukfed.common.fedconfig import COMPATIBLE_STRATEGIES

MESSAGE_TYPE = "train.secagg"                  # Flower's MessageType.TRAIN + ".secagg": @app.train("secagg")
RECORD = "secagg"                              # ConfigRecord with the protocol fields
MASKED = "masked"                              # ArrayRecord with the masked vector
STATE = "leukfed.secagg"                       # the site's protocol state in context.state
SEEN = "leukfed.secagg.seen"                   # the site's last round id per run (replay guard)
TRAINED = "leukfed.secagg.trained"             # the site's last masked training round number per run
STAGES = ("setup", "share-keys", "mask", "unmask")
ERROR_CODE = 4100                              # Flower Error code of the server's synthetic failure replies
VERSION = b"leukfed-secagg/v2"
_BF16_SUFFIX = "::bf16"
_ROUND_ID = re.compile(r"^(\d+):(\d+):([0-9a-f]{16})$")


SiteKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]
SitePublicKey = Union[ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey]


@dataclass(frozen=True)
class SecAggSettings:
    """Protocol parameters chosen by the server, checked by every site.

    threshold: Shamir threshold (shares needed to rebuild a site's secret) and the minimum number
        of surviving sites; None: a majority of the sites that sent keys, at least 2.
    clip: bound on each element of a site's update (new - global); larger values are clipped and
        counted in the site's `secagg-clipped` metric.
    max_examples: the largest example count (weight) one site may report in a round.
    control_timeout: seconds to wait in the setup/share-keys/unmask stages (None: the strategy's
        round timeout). The mask stage (training) always gets the strategy's timeout.
    """

    threshold: int | None = None
    clip: float = 1024.0
    max_examples: int = 1 << 20
    control_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold < 2:
            raise LeukError("secure aggregation needs a threshold of at least 2 sites")
        if not (0 < self.clip <= 2.0 ** 20):
            raise LeukError("secure aggregation clip must be in (0, 2^20]")
        if not (1 <= self.max_examples <= 1 << 30):
            raise LeukError("secure aggregation max-examples must be in [1, 2^30]")


def scale_bits(num_sites: int, clip: float, max_examples: int) -> int:
    """Fixed-point bits such that the sum of num_sites clipped, weighted updates fits in int64."""
    headroom = math.ceil(math.log2(clip)) + math.ceil(math.log2(max(1, num_sites) * max_examples)) + 1
    bits = 63 - headroom
    if bits < 8:
        raise LeukError(f"secure aggregation: clip {clip} and max-examples {max_examples} leave "
                        f"only {bits} bits of precision for {num_sites} sites")
    return min(bits, 40)


def check_secagg_strategy(strategy: str) -> None:
    """LeukError for a strategy that needs to see the individual updates."""
    if strategy not in COMPATIBLE_STRATEGIES:
        raise LeukError(f"strategy {strategy} needs every site's own update, but secure aggregation "
                        f"reveals only their sum: use one of {', '.join(COMPATIBLE_STRATEGIES)}")


def new_round_id(run_id: int, sequence: int) -> str:
    """`run:sequence:nonce`; sites refuse a sequence they have already seen in this run."""
    return f"{int(run_id)}:{int(sequence)}:{os.urandom(8).hex()}"


def round_sequence(ctx: str) -> int:
    """The sequence number of a round id (LeukError for a malformed one)."""
    match = _ROUND_ID.match(ctx)
    if match is None:
        raise SiteRefusal(f"secure aggregation: malformed round id {ctx[:60]!r}")
    return int(match.group(2))


# --------------------------------------------------------------------------------------------
# Key agreement, masks, authenticated encryption
# --------------------------------------------------------------------------------------------

def kdf(secret: bytes, *info: object) -> bytes:
    label = b"|".join([VERSION, *(str(i).encode() for i in info)])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 (private, public) pair, raw bytes."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def agree(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret (raises ValueError for a degenerate public key)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """`length` uniform uint64 values: the ChaCha20 keystream under a 32-byte key."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64, copy=False)


def self_mask(seed: bytes, ctx: str, nid: int, length: int) -> np.ndarray:
    return mask_stream(kdf(seed, "self", ctx, nid), length)


def pair_mask(private: bytes, public: bytes, ctx: str, a: int, b: int, length: int) -> np.ndarray:
    """The mask sites a and b share; site min(a,b) adds it, site max(a,b) subtracts it."""
    lo, hi = sorted((a, b))
    return mask_stream(kdf(agree(private, public), "pair", ctx, lo, hi), length)


def share_key(private: bytes, public: bytes, ctx: str, a: int, b: int) -> bytes:
    """The AES-GCM key sites a and b encrypt their Shamir shares for each other with."""
    lo, hi = sorted((a, b))
    return kdf(agree(private, public), "share", ctx, lo, hi)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """AES-GCM decryption; raises cryptography's InvalidTag when the ciphertext was altered."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def pack(*parts: bytes) -> bytes:
    """Length-prefixed concatenation (unambiguous, also what signatures cover)."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def unpack(blob: bytes) -> list[bytes]:
    parts, i = [], 0
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 4], "big")
        parts.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return parts


def ids(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x]


def ids_text(values: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(values))


# --------------------------------------------------------------------------------------------
# Shamir secret sharing (pycryptodome works on 16-byte blocks: one sharing per block)
# --------------------------------------------------------------------------------------------

def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """`num` shares of a secret whose length is a multiple of 16; any `threshold` rebuild it."""
    if not secret or len(secret) % 16:
        raise ValueError("the secret must be a non-empty multiple of 16 bytes")
    shares = [bytearray(index.to_bytes(4, "big")) for index in range(1, num + 1)]
    for start in range(0, len(secret), 16):
        for index, share in Shamir.split(threshold, num, secret[start:start + 16], ssss=False):
            shares[index - 1] += share
    return [bytes(share) for share in shares]


def combine_shares(shares: Sequence[bytes]) -> bytes:
    """The secret from `threshold` or more shares made by `create_shares`."""
    blocks = (len(shares[0]) - 4) // 16
    if any(len(share) != 4 + 16 * blocks for share in shares):
        raise ValueError("shares of different lengths")
    indexed = [(int.from_bytes(share[:4], "big"), share[4:]) for share in shares]
    return b"".join(Shamir.combine([(i, s[16 * b:16 * b + 16]) for i, s in indexed], ssss=False)
                    for b in range(blocks))


# --------------------------------------------------------------------------------------------
# Quantisation: float updates <-> integers mod 2^64
# --------------------------------------------------------------------------------------------

def decode_site_arrays(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A train reply's arrays (Flower Arrays: `.numpy()`) as float32/int numpy, keyed like the state dict."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = array.numpy()
        if key.endswith(_BF16_SUFFIX):
            bits = value.view(np.uint16).astype(np.uint32) << 16
            value, key = bits.view(np.float32), key[: -len(_BF16_SUFFIX)]
        elif value.dtype == np.float16:
            value = value.astype(np.float32)
        out[key] = value
    return out


def layout(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The vector layout both sides derive from the global arrays: sorted keys, shapes, dtypes."""
    return [(k, tuple(arrays[k].shape), arrays[k].dtype) for k in sorted(arrays)]


def quantize_update(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray], weight: int,
                    clip: float, bits: int) -> tuple[np.ndarray, int]:
    """q = round(clip(new - old) * weight * 2^bits) per element, then the weight: int64, #clipped."""
    if set(new) != set(old):
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        raise LeukError(f"secure aggregation: the update's arrays differ from the global model's "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    parts = []
    for key, shape, _ in layout(old):
        if tuple(new[key].shape) != shape:
            raise LeukError(f"secure aggregation: array {key} has shape {tuple(new[key].shape)}, expected {shape}")
        parts.append(new[key].astype(np.float64).ravel() - old[key].astype(np.float64).ravel())
    delta = np.concatenate(parts) if parts else np.zeros(0)
    if not np.isfinite(delta).all():
        raise LeukError("secure aggregation: the local update contains NaN or Inf; nothing was sent")
    clipped = int(np.count_nonzero(np.abs(delta) > clip))
    np.clip(delta, -clip, clip, out=delta)
    delta *= float(weight) * 2.0 ** bits
    np.rint(delta, out=delta)
    q = np.empty(delta.size + 1, dtype=np.int64)
    q[:-1] = delta
    q[-1] = weight
    return q, clipped


def dequantize_sum(total: np.ndarray, old: Mapping[str, np.ndarray], bits: int) -> tuple[dict[str, np.ndarray], int]:
    """Global arrays + sum(q) / (sum(w) * 2^bits): the FedAvg result, and the total weight."""
    signed = total.view(np.int64)
    weight = int(signed[-1])
    if weight <= 0:
        raise LeukError(f"secure aggregation: the sites' total example count is {weight}")
    mean = signed[:-1].astype(np.float64) / (weight * 2.0 ** bits)
    out, offset = {}, 0
    for key, shape, dtype in layout(old):
        size = int(np.prod(shape, dtype=np.int64))
        value = old[key].astype(np.float64).ravel() + mean[offset:offset + size]
        offset += size
        value = np.rint(value) if np.dtype(dtype).kind in "iub" else value
        out[key] = np.asarray(value.reshape(shape).astype(dtype), order="C")   # keeps 0-d arrays 0-d
    return out, weight


# --------------------------------------------------------------------------------------------
# Site identities: round keys signed with the site key, checked against pinned public keys
# --------------------------------------------------------------------------------------------

def load_site_key(path: str | Path) -> SiteKey:
    """The site's private key (OpenSSH, as `leuk certs` writes it, or PEM)."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise LeukError(f"secure aggregation: cannot read this site's key {path}: {exc.strerror}") from None
    try:
        key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH" in data
               else serialization.load_pem_private_key(data, password=None))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise LeukError(f"secure aggregation: {path} is not an unencrypted OpenSSH or PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise LeukError(f"secure aggregation: {path} must be an EC or Ed25519 key")
    return key


def load_pinned_keys(folder: str | Path) -> dict[str, SitePublicKey]:
    """The federation's site public keys by site name: `<name>.pub` or `<name>/site.pub` in `folder`."""
    root = Path(folder).expanduser()
    if not str(folder) or not root.is_dir():
        raise LeukError(f"secure aggregation: no folder of pinned site public keys at {folder!r} "
                        f"(put the federation's site keys there as <name>.pub)")
    files = [(p.stem, p) for p in root.glob("*.pub")] + [(p.parent.name, p) for p in root.glob("*/site.pub")]
    pinned: dict[str, SitePublicKey] = {}
    for name, path in sorted(files):
        try:
            key = serialization.load_ssh_public_key(path.read_bytes().strip())
        except (ValueError, UnsupportedAlgorithm, OSError):
            raise LeukError(f"secure aggregation: {path} is not an OpenSSH public key") from None
        if name in pinned and public_bytes(pinned[name]) != public_bytes(key):
            raise LeukError(f"secure aggregation: two different pinned keys for site {name!r} in {root}")
        pinned[name] = key
    if not pinned:
        raise LeukError(f"secure aggregation: no site public keys (<name>.pub) in {root}")
    return pinned


def public_bytes(key: SiteKey | SitePublicKey) -> bytes:
    """The OpenSSH encoding of a site key's public half (to compare keys)."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def round_keys_statement(run_id: int, ctx: str, node_id: int, name: str, pk_c: bytes, pk_s: bytes, *,
                         content: str) -> bytes:
    """What a site signs: its round public keys bound to the run, the round, its node, its name and the
    digest of the content the round trains from (`content_digest`)."""
    return pack(VERSION, b"round-keys", str(int(run_id)).encode(), ctx.encode(), str(int(node_id)).encode(),
                name.encode(), pk_c, pk_s, content.encode())


def content_digest(records: Mapping[str, Any]) -> str:
    """SHA-256 of a message's records (name -> ArrayRecord/ConfigRecord/MetricRecord, the secagg record
    left out) in a canonical form: records and keys sorted; arrays by dtype, shape and bytes; config
    values by type and repr (lists and tuples alike). The same on the server's original and on the
    content a site receives after transport."""
    digest = hashlib.sha256(VERSION + b"content")
    for name in sorted(records):
        if name == RECORD:
            continue
        record = records[name]
        digest.update(pack(b"record", name.encode(), type(record).__name__.encode()))
        for key in sorted(record.keys()):
            value = record[key]
            if hasattr(value, "numpy"):
                array = np.ascontiguousarray(value.numpy())
                digest.update(pack(b"array", key.encode(), array.dtype.str.encode(), repr(array.shape).encode(),
                                   str(array.nbytes).encode()))
                digest.update(array.reshape(-1).view(np.uint8) if array.size else b"")
            else:
                value = list(value) if isinstance(value, (list, tuple)) else value
                digest.update(pack(b"value", key.encode(), repr(value).encode()))
    return digest.hexdigest()


def sign(key: SiteKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(_ecdsa_hash(key.curve)))


def verify(public: SitePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(_ecdsa_hash(public.curve)))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _ecdsa_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA256() if curve.key_size <= 256 else hashes.SHA384() if curve.key_size <= 384 else hashes.SHA512()


@dataclass(frozen=True)
class RoundKey:
    """One site's entry in the round's key list, as the server relays it."""

    node_id: int
    name: str
    pk_c: bytes
    pk_s: bytes
    signature: bytes


def verify_round_keys(entries: Sequence[RoundKey], pinned: Mapping[str, SitePublicKey], run_id: int, ctx: str,
                      min_sites: int, *, content: str) -> None:
    """LeukError unless every entry is signed by a distinct pinned site for this run, round, node and
    round content (the digest this site was given: a site given other content signed another one)."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise SiteRefusal(f"secure aggregation: site names appear twice in the key list {sorted(names)}; refused")
    for entry in entries:
        public = pinned.get(entry.name)
        if public is None:
            raise SiteRefusal(f"secure aggregation: unknown site {entry.name!r} (node {entry.node_id}) in the key "
                            f"list: its key is not pinned; refused")
        if not entry.signature:
            raise SiteRefusal(f"secure aggregation: the round keys of site {entry.name!r} are unsigned; refused")
        statement = round_keys_statement(run_id, ctx, entry.node_id, entry.name, entry.pk_c, entry.pk_s,
                                         content=content)
        if not verify(public, entry.signature, statement):
            raise SiteRefusal(f"secure aggregation: bad signature on the round keys of site {entry.name!r} "
                            f"(node {entry.node_id}): substituted, replayed, not this round's, or signed for "
                            "other round content than this site's; refused")
    if len(entries) < min_sites:
        raise SiteRefusal(f"secure aggregation: only {len(entries)} distinct pinned sites take part, this site "
                        f"requires at least {min_sites}; refused")

