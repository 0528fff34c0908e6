"""Secure aggregation, the site's half: the four protocol stages inside the ClientApp (`secure_train`).

The site trains with its ordinary train function and sends only its update masked (see
`leukfed.common.secagg`). Before it shares any secret it checks that every key in the round is
signed by a distinct site whose public key it pins (node config `site-key`, `peer-keys`), over the
same round content as its own: a server that invents a site, substitutes or replays round keys, strips
signatures, or gives sites different arrays or settings makes it refuse. It masks only the content
whose digest it signed, and trains each round number at most once, in increasing order (a round
repeated with another set of sites would give one site's update by difference). Only a simulation
(no site key, a `partition-id` in the node config) runs with unsigned keys.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from leukfed.common.errors import LeukError, SiteRefusal
from leukfed.common.fedconfig import SiteConfig
from leukfed.common.secagg import (
    MASKED,
    MESSAGE_TYPE,
    RECORD,
    SEEN,
    TRAINED,
    STAGES,
    STATE,
    RoundKey,
    SiteKey,
    SitePublicKey,
    content_digest,
    create_shares,
    decode_site_arrays,
    ids,
    ids_text,
    keypair,
    load_pinned_keys,
    load_site_key,
    pack,
    pair_mask,
    public_bytes,
    quantize_update,
    round_keys_statement,
    round_sequence,
    scale_bits,
    seal,
    self_mask,
    share_key,
    sign,
    unpack,
    unseal,
    verify_round_keys,
)

TrainFn = Callable[[Message, Context], Message]
OnMasked = Callable[[ArrayRecord, dict], None]   # (the masked record that leaves, its clear metrics)


def secagg_required(context: Context) -> bool:
    """True when this site's node config says `secure-aggregation="required"` (or true)."""
    value = context.node_config.get("secure-aggregation", "")
    return value is True or str(value).lower() in ("required", "true", "1", "yes")


def refuse_plain_training(msg: Message, context: Context) -> None:
    """For the plain @app.train: a site that requires secure aggregation never trains in the clear.

    Inside `secure_train` the train function sees the `train.secagg` message, which passes.
    """
    if msg.metadata.message_type == MESSAGE_TYPE:
        return
    if secagg_required(context):
        raise SiteRefusal("this site only takes part in secure-aggregation rounds "
                        "(node config secure-aggregation=required)")
    if str(context.run_config.get("secure-aggregation", "")).lower() in ("true", "1"):
        raise SiteRefusal("this run declares secure aggregation: this site trains only inside masked rounds")


@dataclass(frozen=True)
class SiteIdentity:
    """Who this site is in a secure round, and whom it accepts as peers."""

    name: str
    key: SiteKey | None                  # None: a simulation, whose round keys go unsigned
    pinned: Mapping[str, SitePublicKey]  # the federation's site public keys by name
    min_sites: int                       # fewest distinct sites this site aggregates with


def site_identity(context: Context) -> SiteIdentity:
    """This site's signing key and pinned peers from its node config; LeukError where keys are missing."""
    site = SiteConfig.from_node_config(context.node_config)
    try:
        min_sites = int(site.extra.get("secagg_min_sites", 2))
    except (TypeError, ValueError):
        raise LeukError("node config secagg-min-sites must be an integer") from None
    if min_sites < 2:
        raise LeukError("node config secagg-min-sites must be at least 2")
    if site.site_key:
        key = load_site_key(site.site_key)
        pinned = load_pinned_keys(site.peer_keys)
        own = pinned.get(site.name)
        if own is None or public_bytes(own) != public_bytes(key):
            raise LeukError(f"secure aggregation: the pinned keys in {site.peer_keys} have no key for this site "
                            f"{site.name!r} matching {site.site_key}")
        return SiteIdentity(site.name, key, pinned, min_sites)
    if site.partition_id >= 0:
        return SiteIdentity(site.name, None, {}, min_sites)
    raise LeukError("secure aggregation refused: this site has no site key to sign its round keys with "
                    "(node config site-key and peer-keys, which `leuk-client --certs` sets); only a "
                    "simulation runs it unsigned")


def secure_train(msg: Message, context: Context, train_fn: TrainFn, on_masked: OnMasked | None = None) -> Message:
    """Handle one `train.secagg` message; `train_fn` is the site's ordinary @app.train function.

    `on_masked(record, metrics)` is called with exactly what leaves the site in the mask stage (the
    masked vector and the clear metrics), e.g. for the site's audit log.
    """
    cfg = msg.content.config_records.get(RECORD)
    if cfg is None:
        raise SiteRefusal("secure-aggregation message without its 'secagg' record")
    stage, ctx = str(cfg.get("stage", "")), str(cfg.get("round", ""))
    if stage not in STAGES or not ctx:
        raise SiteRefusal(f"secure aggregation: unknown stage {stage!r}")
    nid = int(msg.metadata.dst_node_id)
    if context.node_id and int(context.node_id) != nid:
        raise SiteRefusal(f"secure aggregation: message for node {nid} delivered to node {context.node_id}; refused")
    state = context.state.config_records.get(STATE)
    if stage != "setup":
        expected = STAGES[STAGES.index(stage) - 1]
        if state is None or state.get("round") != ctx or state.get("stage") != expected:
            raise SiteRefusal(f"secure aggregation: stage {stage} out of order "
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
    if stage == "mask" and on_masked is not None:
        on_masked(records[MASKED], dict(records["metrics"]))
    content = RecordDict({**records, RECORD: ConfigRecord({"stage": stage, "round": ctx, **fields})})
    return Message(content, reply_to=msg)


def _remember_round(context: Context, ctx: str) -> None:
    """Refuse a round id this site has already seen in this run (a replayed round)."""
    _remember_increasing(context, SEEN, round_sequence(ctx), "round {number} is not fresh (this site already "
                         "took part in round {last} of run {run}); refused")


def _remember_training_round(context: Context, config) -> None:
    """Refuse a training round number (server-round + round-offset) not above the last one this site masked
    in this run: the same round over another set of sites would differ from the first by one site's update."""
    if "server-round" not in config:
        return
    try:
        number = int(config["server-round"]) + int(config.get("round-offset", 0))
    except (TypeError, ValueError):
        raise SiteRefusal("secure aggregation: malformed server-round; refused") from None
    _remember_increasing(context, TRAINED, number, "round {number} is not after this site's last trained round "
                         "{last} of run {run}; refused")


def _remember_increasing(context: Context, record: str, number: int, refusal: str) -> None:
    """Keep `number` in the site's state `record` for this run; SiteRefusal(`refusal`) unless it is above
    the one kept."""
    kept = context.state.config_records.get(record)
    run = str(context.run_id)
    if kept is not None and kept.get("run") == run and number <= int(kept["number"]):
        raise SiteRefusal("secure aggregation: " + refusal.format(number=number, last=kept["number"], run=run))
    context.state.config_records[record] = ConfigRecord({"run": run, "number": number})


def _site_setup(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    ctx = str(cfg["round"])
    sites = ids(cfg["sites"])
    clip, max_examples = float(cfg["clip"]), int(cfg["max-examples"])
    bits = int(cfg["scale-bits"])
    if nid not in sites:
        raise SiteRefusal("secure aggregation: this site is not among the round's sites")
    if bits != scale_bits(len(sites), clip, max_examples):
        raise SiteRefusal("secure aggregation: the server's fixed-point scale would overflow the sum")
    content = str(cfg.get("content", ""))
    if len(content) != 64:
        raise SiteRefusal("secure aggregation: the setup names no round content to sign; refused")
    identity = site_identity(context)
    _remember_round(context, ctx)
    sk_c, pk_c = keypair()
    sk_s, pk_s = keypair()
    signature = b""
    if identity.key is not None:
        signature = sign(identity.key, round_keys_statement(context.run_id, ctx, nid, identity.name, pk_c, pk_s,
                                                            content=content))
    state.update({"sites": ids_text(sites), "clip": clip, "max-examples": max_examples, "scale-bits": bits,
                  "content": content,
                  "sk-c": sk_c, "sk-s": sk_s, "pk-c": pk_c, "pk-s": pk_s, "name": identity.name,
                  "min-sites": identity.min_sites})
    return {"pk-c": pk_c, "pk-s": pk_s, "name": identity.name, "sig": signature}, {}


def _check_key_list(cfg, holders: list[int], nid: int, state, context: Context) -> None:
    """Every key in the list is this round's, signed by a distinct pinned site (deployment)."""
    names, signatures = list(cfg.get("names", [])), list(cfg.get("sigs", []))
    identity = site_identity(context)
    if identity.key is None:                              # a simulation: node ids only
        if len(holders) < identity.min_sites:
            raise SiteRefusal(f"secure aggregation: only {len(holders)} sites take part, this site requires "
                            f"at least {identity.min_sites}; refused")
        return
    if len(names) != len(holders) or len(signatures) != len(holders):
        raise SiteRefusal("secure aggregation: the key list lacks a site name and signature for every key "
                        "(unsigned keys); refused")
    if str(names[holders.index(nid)]) != state["name"]:
        raise SiteRefusal("secure aggregation: the server altered this site's name in the key list; refused")
    entries = [RoundKey(n, str(name), bytes(c), bytes(s), bytes(sig))
               for n, name, c, s, sig in zip(holders, names, cfg["pk-c"], cfg["pk-s"], signatures)]
    verify_round_keys(entries, identity.pinned, context.run_id, str(cfg["round"]), identity.min_sites,
                      content=state["content"])


def _site_share_keys(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    holders = ids(cfg["ids"])
    threshold = int(cfg["threshold"])
    pks_c, pks_s = list(cfg["pk-c"]), list(cfg["pk-s"])
    if len(pks_c) != len(holders) or len(pks_s) != len(holders) or len(set(holders)) != len(holders):
        raise SiteRefusal("secure aggregation: malformed key list")
    if not set(holders) <= set(ids(state["sites"])) or nid not in holders:
        raise SiteRefusal("secure aggregation: the key list names sites outside the round")
    keys = dict(zip(holders, zip(pks_c, pks_s)))
    if keys[nid] != (state["pk-c"], state["pk-s"]):
        raise SiteRefusal("secure aggregation: the server altered this site's public keys")
    if len(set(pks_c) | set(pks_s)) != 2 * len(holders):
        raise LeukError("secure aggregation: repeated public keys")
    if not 2 <= threshold <= len(holders) or 2 * threshold <= len(holders):
        raise LeukError(f"secure aggregation: threshold {threshold} must be a majority of the "
                        f"{len(holders)} sites and at least 2")
    _check_key_list(cfg, holders, nid, state, context)     # before any secret leaves the site
    seed = os.urandom(32)
    b_shares = create_shares(seed, threshold, len(holders))
    s_shares = create_shares(state["sk-s"], threshold, len(holders))
    dsts, sealed = [], []
    for index, other in enumerate(holders):          # holders are sorted: share index = position
        if other == nid:
            state[f"b:{nid}"], state[f"s:{nid}"] = b_shares[index], s_shares[index]
            continue
        key = share_key(state["sk-c"], keys[other][0], str(cfg["round"]), nid, other)
        aad = f"{cfg['round']}|{nid}|{other}".encode()
        dsts.append(str(other))
        sealed.append(seal(key, pack(b_shares[index], s_shares[index]), aad))
    state.update({"seed": seed, "threshold": threshold, "holders": ids_text(holders),
                  "pks-c": pks_c, "pks-s": pks_s})
    return {"dst": dsts, "ct": sealed}, {}


def _site_mask(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    ctx = str(cfg["round"])
    holders = ids(state["holders"])
    keys = dict(zip(holders, zip(state["pks-c"], state["pks-s"])))
    peers = ids(cfg["peers"])
    threshold = int(state["threshold"])
    if nid not in peers or not set(peers) <= set(holders):
        raise LeukError("secure aggregation: the peer list names sites that did not share keys")
    if len(peers) < max(threshold, int(state["min-sites"])):
        raise LeukError(f"secure aggregation: only {len(peers)} sites left, below the threshold {threshold} "
                        f"or this site's minimum {state['min-sites']}")
    srcs = ids(cfg.get("src", ""))
    sealed = list(cfg.get("ct", []))
    if sorted(srcs) != sorted(p for p in peers if p != nid) or len(sealed) != len(srcs):
        raise LeukError("secure aggregation: missing key shares from the other sites")
    for src, blob in zip(srcs, sealed):
        key = share_key(state["sk-c"], keys[src][0], ctx, nid, src)
        try:
            b_share, s_share = unpack(unseal(key, blob, f"{ctx}|{src}|{nid}".encode()))
        except (InvalidTag, ValueError):
            raise LeukError(f"secure aggregation: key shares from site {src} failed authentication") from None
        state[f"b:{src}"], state[f"s:{src}"] = b_share, s_share

    # Train with the ordinary function, on the strategy's own content (arrays + config): the content whose
    # digest every site of the round signed, and a round number this site has not trained yet.
    del msg.content[RECORD]
    if content_digest(msg.content) != state["content"]:
        raise SiteRefusal("secure aggregation: the round's content differs from the one this site signed; refused")
    _remember_training_round(context, msg.content.config_records.get("config") or {})
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
    state["peers"] = ids_text(peers)
    metrics["secagg-clipped"] = clipped
    # Fresh records: the raw update never leaves this function.
    return {}, {MASKED: ArrayRecord({"vector": Array(vector)}), "metrics": MetricRecord(metrics)}


def _site_unmask(state, cfg, nid, msg, context, train_fn) -> tuple[dict, dict]:
    survivors, dropped = ids(cfg["survivors"]), ids(cfg.get("dropped", ""))
    peers = ids(state["peers"])
    if set(survivors) & set(dropped):
        raise LeukError("secure aggregation: the server asked for both secrets of one site; refused")
    if set(survivors) | set(dropped) != set(peers) or nid not in survivors:
        raise LeukError("secure aggregation: survivors and dropped sites do not match the round's sites")
    if len(survivors) < max(int(state["threshold"]), int(state["min-sites"])):
        raise LeukError("secure aggregation: fewer survivors than the threshold or this site's minimum; "
                        "refused to unmask")
    owners = [str(i) for i in survivors] + [str(i) for i in dropped]
    shares = [state[f"b:{i}"] for i in survivors] + [state[f"s:{i}"] for i in dropped]
    return {"ids": owners, "kinds": ["b"] * len(survivors) + ["s"] * len(dropped), "shares": shares}, {}
