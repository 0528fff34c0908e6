"""Secure aggregation over Flower's Message API: the server learns only the SUM of the sites' updates.

Why not Flower's own SecAgg+ (SecAggPlusWorkflow + secaggplus_mod)? Measured with flwr 1.41.0:
it runs only on the legacy compat layer (LegacyContext, a `flwr.server.strategy` strategy,
`fitins.*`/`fitres.*` records whose arrays lose their names, dtypes and shapes; a Message-API
reply fails with KeyError 'fitres.parameters' and the run still "completes" with the model
unchanged), it clips the weights themselves to +-8, and it expands every mask seed through
`np.random.RandomState` seeded with 32 bits. This module implements the same protocol
(Bonawitz et al. 2017, complete graph) natively: X25519 key agreement, masks expanded with
ChaCha20, Shamir shares (Flower's `crypto.shamir`, GF(2^128)) of each site's self-mask seed and
masking key sent AES-GCM-encrypted through the server, updates quantised into Z/2^64.

One round (every message is `train.secagg`, so a ClientApp without the handler fails instead of
training in the clear):

  setup       server -> sampled sites   settings;            site -> two X25519 public keys
  share-keys  server -> sites with keys all public keys;     site -> encrypted Shamir shares of
                                                                     (self-mask seed b, mask key)
  mask        server -> sites that shared: the strategy's own train content + the shares for it;
              site trains (the unchanged train function), then sends
                  y = q(w * (new - global)) || w  +  PRG(b)  +  sum_j +-PRG(s_ij)   (mod 2^64)
  unmask      server -> sites that sent y: who survived, who dropped; site -> shares of b for
              survivors, of the mask key for dropped sites (never both for one site)

The server adds the y's, removes the survivors' self masks and the dropped sites' pairwise masks,
and obtains sum_i q(w_i * delta_i) and sum_i w_i, hence the FedAvg update. A site that drops
after sharing keys (even after masking) costs nothing but its contribution; fewer than
`threshold` survivors abort the round (never fewer than 2: the "sum" of one site is its update).

Server: wrap the Grid, `SecureAggregationGrid(grid, SecAggSettings())`, and keep calling
`strategy.start(grid=...)`. The wrapper turns the strategy's TRAIN messages into the four stages
and hands `aggregate_train` one reply per surviving site, each carrying the securely computed
average and that site's clear metrics (Flower's SecAgg+ workflow does the same with FitRes), so
FedAvg/FedProx/FedAdam/FedYogi, the ReplyGuard and the evaluate_fn hook work unchanged.
Site: `@app.train("secagg")` calling `secure_train(msg, context, train)`.

Model: honest-but-curious server and sites, as in SecAgg; sites are not authenticated to each
other beyond what the SuperLink's node authentication gives, and a malicious site can corrupt
(not read) the sum. This module never imports torch.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.serverapp import Grid
from leukfed.common.errors import LeukError
from leukfed.server.grids import DelegatingGrid

MESSAGE_TYPE = f"{MessageType.TRAIN}.secagg"   # routed to @app.train("secagg")
RECORD = "secagg"                              # ConfigRecord with the protocol fields
MASKED = "masked"                              # ArrayRecord with the masked vector
STATE = "leukfed.secagg"                       # the site's protocol state in context.state
STAGES = ("setup", "share-keys", "mask", "unmask")
ERROR_CODE = 4100                              # Flower Error code of our synthetic failure replies
_BF16_SUFFIX = "::bf16"
_VERSION = b"leukfed-secagg/v1"

# Strategies that only combine the weighted average can run on the secure sum; the others must
# see each site's update (median, trimmed mean, Krum) and would silently degrade to plain FedAvg.
COMPATIBLE_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


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


# --------------------------------------------------------------------------------------------
# Cryptographic primitives (cryptography + Flower's Shamir)
# --------------------------------------------------------------------------------------------

def _kdf(secret: bytes, *info: object) -> bytes:
    label = b"|".join([_VERSION, *(str(i).encode() for i in info)])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def _keypair() -> tuple[bytes, bytes]:
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def _agree(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret (raises ValueError for a degenerate public key)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def mask_stream(key: bytes, length: int) -> np.ndarray:
    """`length` uniform uint64 values: the ChaCha20 keystream under a 32-byte key."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64, copy=False)


def self_mask(seed: bytes, ctx: str, nid: int, length: int) -> np.ndarray:
    return mask_stream(_kdf(seed, "self", ctx, nid), length)


def pair_mask(private: bytes, public: bytes, ctx: str, a: int, b: int, length: int) -> np.ndarray:
    """The mask sites a and b share; site min(a,b) adds it, site max(a,b) subtracts it."""
    lo, hi = sorted((a, b))
    return mask_stream(_kdf(_agree(private, public), "pair", ctx, lo, hi), length)


def _share_key(private: bytes, public: bytes, ctx: str, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return _kdf(_agree(private, public), "share", ctx, lo, hi)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def _pack(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _unpack(blob: bytes) -> list[bytes]:
    parts, i = [], 0
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 4], "big")
        parts.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return parts


def _ids(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x]


def _ids_text(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(ids))


# --------------------------------------------------------------------------------------------
# Quantisation: float updates <-> integers mod 2^64
# --------------------------------------------------------------------------------------------

def decode_site_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A ClientApp's reply arrays as float32/int numpy keyed like the state dict (numpy only)."""
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
# Site side
# --------------------------------------------------------------------------------------------

def secagg_required(context: Context) -> bool:
    """True when this site's node config says `secure-aggregation="required"` (or true)."""
    value = context.node_config.get("secure-aggregation", "")
    return value is True or str(value).lower() in ("required", "true", "1", "yes")


def refuse_plain_training(msg: Message, context: Context) -> None:
    """For the plain @app.train: a site that requires secure aggregation never trains in the clear.

    Inside `secure_train` the train function sees the `train.secagg` message, which passes.
    """
    if secagg_required(context) and msg.metadata.message_type != MESSAGE_TYPE:
        raise LeukError("this site only takes part in secure-aggregation rounds "
                        "(node config secure-aggregation=required)")


def secure_train(msg: Message, context: Context,
                 train_fn: Callable[[Message, Context], Message]) -> Message:
    """Handle one `train.secagg` message; `train_fn` is the site's ordinary @app.train function."""
    cfg = msg.content.config_records.get(RECORD)
    if cfg is None:
        raise LeukError("secure-aggregation message without its 'secagg' record")
    stage, ctx = str(cfg.get("stage", "")), str(cfg.get("round", ""))
    if stage not in STAGES or not ctx:
        raise LeukError(f"secure aggregation: unknown stage {stage!r}")
    nid = int(msg.metadata.dst_node_id)
    state = context.state.config_records.get(STATE)
    if stage != "setup":
        expected = STAGES[STAGES.index(stage) - 1]
        if state is None or state.get("round") != ctx or state.get("stage") != expected:
            raise LeukError(f"secure aggregation: stage {stage} out of order "
                            f"(this site is at {state.get('stage') if state else 'no round'})")
    handler = {"setup": _site_setup, "share-keys": _site_share_keys, "mask": _site_mask,
               "unmask": _site_unmask}[stage]
    if stage == "setup":
        state = ConfigRecord()
    fields, records = handler(state, cfg, nid, msg, context, train_fn)
    state["stage"], state["round"] = stage, ctx
    if stage == "unmask":
        del context.state.config_records[STATE]      # the round is over: forget every secret
    else:
        context.state.config_records[STATE] = state
    content = RecordDict({**records, RECORD: ConfigRecord({"stage": stage, "round": ctx, **fields})})
    return Message(content, reply_to=msg)


def _site_setup(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    sites = _ids(cfg["sites"])
    clip, max_examples = float(cfg["clip"]), int(cfg["max-examples"])
    bits = int(cfg["scale-bits"])
    if nid not in sites:
        raise LeukError("secure aggregation: this site is not among the round's sites")
    if bits != scale_bits(len(sites), clip, max_examples):
        raise LeukError("secure aggregation: the server's fixed-point scale would overflow the sum")
    sk_c, pk_c = _keypair()
    sk_s, pk_s = _keypair()
    state.update({"sites": _ids_text(sites), "clip": clip, "max-examples": max_examples,
                  "scale-bits": bits, "sk-c": sk_c, "sk-s": sk_s, "pk-c": pk_c, "pk-s": pk_s})
    return {"pk-c": pk_c, "pk-s": pk_s}, {}


def _site_share_keys(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    holders = _ids(cfg["ids"])
    threshold = int(cfg["threshold"])
    pks_c, pks_s = list(cfg["pk-c"]), list(cfg["pk-s"])
    if len(pks_c) != len(holders) or len(pks_s) != len(holders) or len(set(holders)) != len(holders):
        raise LeukError("secure aggregation: malformed key list")
    if not set(holders) <= set(_ids(state["sites"])) or nid not in holders:
        raise LeukError("secure aggregation: the key list names sites outside the round")
    keys = dict(zip(holders, zip(pks_c, pks_s)))
    if keys[nid] != (state["pk-c"], state["pk-s"]):
        raise LeukError("secure aggregation: the server altered this site's public keys")
    if len(set(pks_c) | set(pks_s)) != 2 * len(holders):
        raise LeukError("secure aggregation: repeated public keys")
    if not 2 <= threshold <= len(holders) or 2 * threshold <= len(holders):
        raise LeukError(f"secure aggregation: threshold {threshold} must be a majority of the "
                        f"{len(holders)} sites and at least 2")
    seed = os.urandom(32)
    b_shares = create_shares(seed, threshold, len(holders))
    s_shares = create_shares(state["sk-s"], threshold, len(holders))
    dsts, sealed = [], []
    for index, other in enumerate(holders):          # holders are sorted: share index = position
        if other == nid:
            state[f"b:{nid}"], state[f"s:{nid}"] = b_shares[index], s_shares[index]
            continue
        key = _share_key(state["sk-c"], keys[other][0], str(cfg["round"]), nid, other)
        aad = f"{cfg['round']}|{nid}|{other}".encode()
        dsts.append(str(other))
        sealed.append(_seal(key, _pack(b_shares[index], s_shares[index]), aad))
    state.update({"seed": seed, "threshold": threshold, "holders": _ids_text(holders),
                  "pks-c": pks_c, "pks-s": pks_s})
    return {"dst": dsts, "ct": sealed}, {}


def _site_mask(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    ctx = str(cfg["round"])
    holders = _ids(state["holders"])
    keys = dict(zip(holders, zip(state["pks-c"], state["pks-s"])))
    peers = _ids(cfg["peers"])
    threshold = int(state["threshold"])
    if nid not in peers or not set(peers) <= set(holders):
        raise LeukError("secure aggregation: the peer list names sites that did not share keys")
    if len(peers) < threshold:
        raise LeukError(f"secure aggregation: only {len(peers)} sites left, below the threshold {threshold}")
    srcs = _ids(cfg.get("src", ""))
    sealed = list(cfg.get("ct", []))
    if sorted(srcs) != sorted(p for p in peers if p != nid) or len(sealed) != len(srcs):
        raise LeukError("secure aggregation: missing key shares from the other sites")
    for src, blob in zip(srcs, sealed):
        key = _share_key(state["sk-c"], keys[src][0], ctx, nid, src)
        try:
            b_share, s_share = _unpack(_open(key, blob, f"{ctx}|{src}|{nid}".encode()))
        except (InvalidTag, ValueError):
            raise LeukError(f"secure aggregation: key shares from site {src} failed authentication") from None
        state[f"b:{src}"], state[f"s:{src}"] = b_share, s_share

    # Train with the ordinary function, on the strategy's own content (arrays + config).
    del msg.content[RECORD]
    global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    reply = train_fn(msg, context)
    if reply.has_error():
        raise LeukError(f"secure aggregation: local training failed: {reply.error.reason}")
    records = reply.content.array_records
    if len(records) != 1:
        raise LeukError("secure aggregation: the train function must reply with one ArrayRecord")
    metric_records = list(reply.content.metric_records.values())
    metrics = dict(metric_records[0]) if metric_records else {}
    weight = metrics.get("num-examples")
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= int(state["max-examples"]):
        raise LeukError(f"secure aggregation: num-examples {weight!r} must be an integer in "
                        f"[0, {state['max-examples']}]")
    q, clipped = quantize_update(decode_site_arrays(next(iter(records.values()))), global_arrays, weight,
                                 float(state["clip"]), int(state["scale-bits"]))
    vector = q.view(np.uint64)
    vector = vector + self_mask(state["seed"], ctx, nid, vector.size)     # wraps mod 2^64
    for other in peers:
        if other == nid:
            continue
        mask = pair_mask(state["sk-s"], keys[other][1], ctx, nid, other, vector.size)
        vector = vector + mask if nid < other else vector - mask
    state["peers"] = _ids_text(peers)
    metrics["secagg-clipped"] = clipped
    # Fresh records: the raw update never leaves this function.
    return {}, {MASKED: ArrayRecord({"vector": Array(vector)}), "metrics": MetricRecord(metrics)}


def _site_unmask(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    survivors, dropped = _ids(cfg["survivors"]), _ids(cfg.get("dropped", ""))
    peers = _ids(state["peers"])
    if set(survivors) & set(dropped):
        raise LeukError("secure aggregation: the server asked for both secrets of one site; refused")
    if set(survivors) | set(dropped) != set(peers) or nid not in survivors:
        raise LeukError("secure aggregation: survivors and dropped sites do not match the round's sites")
    if len(survivors) < int(state["threshold"]):
        raise LeukError("secure aggregation: fewer survivors than the threshold; refused to unmask")
    ids = [str(i) for i in survivors] + [str(i) for i in dropped]
    shares = [state[f"b:{i}"] for i in survivors] + [state[f"s:{i}"] for i in dropped]
    return {"ids": ids, "kinds": ["b"] * len(survivors) + ["s"] * len(dropped), "shares": shares}, {}


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------

@dataclass
class SecAggReport:
    """What one secure round did: who took part at each stage, who dropped and why, timings."""

    ctx: str = ""
    sampled: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)        # sent public keys
    shared: list[int] = field(default_factory=list)      # sent encrypted shares
    masked: list[int] = field(default_factory=list)      # sent a masked update
    unmasked: list[int] = field(default_factory=list)    # sent shares for unmasking
    dropped: dict[int, str] = field(default_factory=dict)
    threshold: int = 0
    total_examples: int = 0
    aborted: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_masked: int = 0

    def summary(self) -> str:
        counts = (f"{len(self.sampled)} sampled, {len(self.keys)} keys, {len(self.shared)} shared, "
                  f"{len(self.masked)} masked, {len(self.unmasked)} unmasked (threshold {self.threshold})")
        drops = "".join(f"; site {n} dropped at {why}" for n, why in self.dropped.items())
        end = f"; ABORTED: {self.aborted}" if self.aborted else f"; sum of {len(self.masked)} sites, {self.total_examples} examples"
        return f"secure aggregation {counts}{drops}{end}, {sum(self.stage_seconds.values()):.1f}s"


class SecureAggregationGrid(DelegatingGrid):
    """A Grid that runs every TRAIN send-and-receive as a secure-aggregation round.

    All other traffic (evaluate, query) passes through unchanged. `reports` holds one
    SecAggReport per round, `last_report` the latest.
    """

    def __init__(self, grid: Grid, settings: SecAggSettings | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        super().__init__(grid)
        self.settings = settings or SecAggSettings()
        self._log = log
        self.reports: list[SecAggReport] = []
        self._sequence = 0
        self._metrics: dict[int, dict] = {}

    @property
    def last_report(self) -> SecAggReport | None:
        return self.reports[-1] if self.reports else None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        return self.secure_round(messages, timeout)

    # --- the protocol ---
    def _exchange(self, stage: str, contents: dict[int, RecordDict], group: str, timeout: float | None,
                  report: SecAggReport) -> dict[int, Message]:
        """Send one stage, return the valid replies by node; note every site that fell out."""
        started = time.perf_counter()
        out = [Message(content, dst_node_id=nid, message_type=MESSAGE_TYPE, group_id=group)
               for nid, content in contents.items()]
        replies: dict[int, Message] = {}
        for reply in self._grid.send_and_receive(out, timeout=timeout):
            nid = int(reply.metadata.src_node_id)
            if nid not in contents:
                continue
            if reply.has_error():
                reason = (reply.error.reason or "error").strip()
                report.dropped[nid] = f"{stage}: {_last_line(reason)}"
                continue
            cfg = reply.content.config_records.get(RECORD)
            if cfg is None or cfg.get("stage") != stage or cfg.get("round") != report.ctx:
                report.dropped[nid] = f"{stage}: malformed reply"
                continue
            replies[nid] = reply
        for nid in contents:
            if nid not in replies and nid not in report.dropped:
                report.dropped[nid] = f"{stage}: no reply within {timeout}s"
        report.stage_seconds[stage] = time.perf_counter() - started
        return replies

    def secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """The four stages for the strategy's TRAIN messages; replies as the strategy expects."""
        self._sequence += 1
        try:
            run_id = self._grid.run.run_id
        except Exception:  # noqa: BLE001 - a test grid may have no run
            run_id = 0
        originals = {int(m.metadata.dst_node_id): m for m in messages}
        group = messages[0].metadata.group_id or str(self._sequence)
        report = SecAggReport(ctx=f"{run_id}:{self._sequence}:{os.urandom(8).hex()}", sampled=sorted(originals))
        self.reports.append(report)
        settings = self.settings
        control = settings.control_timeout if settings.control_timeout is not None else timeout
        try:
            total = self._run_stages(originals, group, timeout, control, report)
        except _Abort as abort:
            report.aborted = str(abort)
            self._say(report.summary())
            reason = f"secure aggregation aborted: {abort}"
            return [Message(Error(ERROR_CODE, reason + (f" (this site: {report.dropped[n]})" if n in report.dropped else "")),
                            reply_to=m) for n, m in originals.items()]
        self._say(report.summary())
        aggregate = ArrayRecord({k: Array(v) for k, v in total.items()})
        replies = []
        for nid, original in originals.items():
            if nid in report.masked:
                metrics = dict(self._metrics.get(nid, {}))
                metrics.setdefault("num-examples", 1)
                content = RecordDict({"arrays": aggregate, "metrics": MetricRecord(metrics)})
                replies.append(Message(content, reply_to=original))
            else:
                why = report.dropped.get(nid, "dropped")
                replies.append(Message(Error(ERROR_CODE, f"secure aggregation: {why}"), reply_to=original))
        return replies

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log(text)

    def _run_stages(self, originals: dict[int, Message], group: str, timeout: float | None,
                    control: float | None, report: SecAggReport) -> dict[str, np.ndarray]:
        settings = self.settings
        ctx = report.ctx
        first = next(iter(originals.values()))
        if "arrays" not in first.content.array_records:
            raise _Abort("the strategy's train messages carry no 'arrays' record")
        global_arrays = {k: v.numpy() for k, v in first.content["arrays"].items()}
        size = sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in layout(global_arrays)) + 1
        if len(originals) < 2:
            raise _Abort(f"{len(originals)} site sampled; secure aggregation needs at least 2")
        bits = scale_bits(len(originals), settings.clip, settings.max_examples)

        # Stage 0: settings out, public keys back.
        setup = ConfigRecord({"stage": "setup", "round": ctx, "sites": _ids_text(originals),
                              "clip": float(settings.clip), "max-examples": int(settings.max_examples),
                              "scale-bits": bits})
        replies = self._exchange("setup", {n: RecordDict({RECORD: setup}) for n in originals}, group,
                                 control, report)
        keys = {n: (bytes(r.content[RECORD]["pk-c"]), bytes(r.content[RECORD]["pk-s"])) for n, r in replies.items()}
        report.keys = sorted(keys)
        threshold = settings.threshold or max(2, len(keys) // 2 + 1)
        report.threshold = threshold
        if len(keys) < threshold or 2 * threshold <= len(keys):
            raise _Abort(f"{len(keys)} sites sent keys; threshold {threshold} must be reached and be a majority")

        # Stage 1: every public key out, encrypted shares back.
        holders = sorted(keys)
        share_cfg = ConfigRecord({"stage": "share-keys", "round": ctx, "ids": _ids_text(holders),
                                  "threshold": threshold, "pk-c": [keys[n][0] for n in holders],
                                  "pk-s": [keys[n][1] for n in holders]})
        replies = self._exchange("share-keys", {n: RecordDict({RECORD: share_cfg}) for n in holders}, group,
                                 control, report)
        report.shared = sorted(replies)
        if len(replies) < threshold:
            raise _Abort(f"only {len(replies)} sites shared keys (threshold {threshold})")
        inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in replies}
        for src, reply in replies.items():
            cfg = reply.content[RECORD]
            for dst, sealed in zip(cfg.get("dst", []), cfg.get("ct", [])):
                dst = int(dst)
                if dst in inbox:
                    inbox[dst].append((src, bytes(sealed)))

        # Stage 2: the strategy's content + this site's shares out, masked update back.
        peers = _ids_text(replies)
        contents = {}
        for nid in replies:
            content = RecordDict(dict(originals[nid].content.items()))
            srcs = [s for s, _ in inbox[nid]]
            cfg = ConfigRecord({"stage": "mask", "round": ctx, "peers": peers, "src": _ids_text(srcs)})
            if srcs:
                by_src = dict(inbox[nid])
                cfg["ct"] = [by_src[s] for s in sorted(srcs)]
            content[RECORD] = cfg
            contents[nid] = content
        replies = self._exchange("mask", contents, group, timeout, report)
        total = np.zeros(size, dtype=np.uint64)
        self._metrics = {}
        for nid, reply in list(replies.items()):
            record = reply.content.array_records.get(MASKED)
            vector = record["vector"].numpy() if record is not None and "vector" in record else None
            if vector is None or vector.dtype != np.uint64 or vector.shape != (size,):
                report.dropped[nid] = "mask: malformed masked vector"
                del replies[nid]
                continue
            total += vector                                  # only the running sum is kept
            report.bytes_masked += vector.nbytes
            metric_records = list(reply.content.metric_records.values())
            self._metrics[nid] = dict(metric_records[0]) if metric_records else {}
        survivors = sorted(replies)
        report.masked = survivors
        dropped = sorted(set(report.shared) - set(survivors))
        if len(survivors) < threshold:
            raise _Abort(f"only {len(survivors)} masked updates arrived (threshold {threshold})")

        # Stage 3: survivors and dropped out, shares back; rebuild and remove the masks.
        unmask_cfg = ConfigRecord({"stage": "unmask", "round": ctx, "survivors": _ids_text(survivors),
                                   "dropped": _ids_text(dropped)})
        replies = self._exchange("unmask", {n: RecordDict({RECORD: unmask_cfg}) for n in survivors}, group,
                                 control, report)
        report.unmasked = sorted(replies)
        started = time.perf_counter()
        shares: dict[tuple[str, int], list[bytes]] = {}
        for reply in replies.values():
            cfg = reply.content[RECORD]
            for owner, kind, share in zip(cfg.get("ids", []), cfg.get("kinds", []), cfg.get("shares", [])):
                owner = int(owner)
                wanted = (kind == "b" and owner in survivors) or (kind == "s" and owner in dropped)
                if wanted:
                    shares.setdefault((kind, owner), []).append(bytes(share))
        for kind, owners in (("b", survivors), ("s", dropped)):
            for owner in owners:
                if len(shares.get((kind, owner), [])) < threshold:
                    raise _Abort(f"too few shares to unmask site {owner} ({len(shares.get((kind, owner), []))}"
                                 f" < threshold {threshold})")
        for owner in survivors:
            seed = combine_shares(shares[("b", owner)])
            total -= self_mask(seed, ctx, owner, size)
        for gone in dropped:
            private = combine_shares(shares[("s", gone)])
            for owner in survivors:
                mask = pair_mask(private, keys[owner][1], ctx, gone, owner, size)
                # Survivor `owner` added the mask if owner < gone, subtracted it otherwise.
                total = total - mask if owner < gone else total + mask
        arrays, report.total_examples = dequantize_sum(total, global_arrays, bits)
        if report.total_examples > len(survivors) * settings.max_examples:
            raise _Abort("the unmasked total is out of range (a site sent a malformed update)")
        report.stage_seconds["unmask-server"] = time.perf_counter() - started
        return arrays


def _last_line(text: str, limit: int = 200) -> str:
    """The telling line of a (possibly multi-line, Ray-wrapped) error reason."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [line for line in lines if "Error" in line or "Exception" in line] or lines or [""]
    return telling[-1][:limit]


class _Abort(Exception):
    """A secure round that cannot complete; every sampled site gets an error reply."""

