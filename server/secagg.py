"""Secure aggregation, the coordinator's half: a Grid that runs every TRAIN exchange as a masked round.

Why not Flower's own SecAgg+ (SecAggPlusWorkflow + secaggplus_mod)? Measured with flwr 1.41.0:
it runs only on the legacy compat layer (LegacyContext, a `flwr.server.strategy` strategy,
`fitins.*`/`fitres.*` records whose arrays lose their names, dtypes and shapes; a Message-API
reply fails with KeyError 'fitres.parameters' and the run still "completes" with the model
unchanged), it clips the weights themselves to +-8, and it expands every mask seed through
`np.random.RandomState` seeded with 32 bits. leukfed implements the same protocol natively:
the primitives in `leukfed.common.secagg`, the site's stages in `leukfed.client.secagg`, this
server half here.

One round (every message is `train.secagg`, so a ClientApp without the handler fails instead of
training in the clear):

  setup       server -> sampled sites   settings;            site -> two X25519 public keys, its
                                                                     site name and its signature over them
  share-keys  server -> sites with keys all public keys,     site -> (after checking every signature
              names and signatures                                    against its pinned site keys)
                                                                     encrypted Shamir shares of
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

Wrap the Grid, `SecureAggregationGrid(grid, SecAggSettings())`, and keep calling
`strategy.start(grid=...)`. The wrapper turns the strategy's TRAIN messages into the four stages
and hands `aggregate_train` one reply per surviving site, each carrying the securely computed
average and that site's clear metrics (Flower's SecAgg+ workflow does the same with FitRes), so
FedAvg/FedProx/FedAdam/FedYogi, the ReplyGuard and the evaluate_fn hook work unchanged.

Model: the server is honest-but-curious at best; it only relays the sites' signed round keys, and
sites refuse keys not signed by a site they pin, so it cannot add sites of its own. A malicious
site can corrupt (not read) the sum. This module never imports torch.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from leukfed.common.errors import LeukError
from leukfed.common.secagg import (
    ERROR_CODE,
    MASKED,
    MESSAGE_TYPE,
    RECORD,
    SecAggSettings,
    check_secagg_strategy,
    content_digest,
    combine_shares,
    dequantize_sum,
    ids_text,
    layout,
    new_round_id,
    pair_mask,
    scale_bits,
    self_mask,
)
from leukfed.server.grids import DelegatingGrid

__all__ = ["SecAggReport", "SecAggSettings", "SecureAggregationGrid", "check_secagg_strategy"]


@dataclass
class SecAggReport:
    """What one secure round did: who took part at each stage, who dropped and why, timings."""

    ctx: str = ""
    sampled: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)        # sent public keys
    names: dict[int, str] = field(default_factory=dict)  # the site names the keys were signed for
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
        drops = "".join(f"; site {self.names.get(n, n)} dropped at {why}" for n, why in self.dropped.items())
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
        report = SecAggReport(ctx=self._round_id(run_id), sampled=sorted(originals))
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

    def _round_id(self, run_id: int) -> str:
        """A fresh round id; sites refuse one whose sequence they have already seen in this run."""
        return new_round_id(run_id, self._sequence)

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
        digests = {content_digest(m.content) for m in originals.values()}
        if len(digests) != 1:   # the sites sign the one digest they are given: differing content cannot be masked
            raise _Abort("the strategy's train messages differ between sites; every site of a round trains from "
                         "the same content")

        # Stage 0: settings and the content's digest out, public keys back (signed over that digest).
        setup = ConfigRecord({"stage": "setup", "round": ctx, "sites": ids_text(originals),
                              "clip": float(settings.clip), "max-examples": int(settings.max_examples),
                              "scale-bits": bits, "content": digests.pop()})
        replies = self._exchange("setup", {n: RecordDict({RECORD: setup}) for n in originals}, group,
                                 control, report)
        keys, names, signatures = {}, {}, {}
        for nid, reply in replies.items():
            cfg = reply.content[RECORD]
            if not isinstance(cfg.get("pk-c"), bytes) or not isinstance(cfg.get("pk-s"), bytes):
                report.dropped[nid] = "setup: malformed reply"
                continue
            keys[nid] = (cfg["pk-c"], cfg["pk-s"])
            names[nid], signatures[nid] = str(cfg.get("name", "")), bytes(cfg.get("sig", b""))
        report.keys, report.names = sorted(keys), names
        threshold = settings.threshold or max(2, len(keys) // 2 + 1)
        report.threshold = threshold
        if len(keys) < threshold or 2 * threshold <= len(keys):
            raise _Abort(f"{len(keys)} sites sent keys; threshold {threshold} must be reached and be a majority")

        # Stage 1: every public key out, encrypted shares back.
        holders = sorted(keys)
        share_cfg = ConfigRecord({"stage": "share-keys", "round": ctx, "ids": ids_text(holders),
                                  "threshold": threshold, "pk-c": [keys[n][0] for n in holders],
                                  "pk-s": [keys[n][1] for n in holders], "names": [names[n] for n in holders],
                                  "sigs": [signatures[n] for n in holders]})
        replies = self._exchange("share-keys", {n: RecordDict({RECORD: share_cfg}) for n in holders}, group,
                                 control, report)
        report.shared = sorted(replies)
        if len(replies) < threshold:
            raise _Abort(f"only {len(replies)} sites shared keys (threshold {threshold})")
        inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in replies}
        for src, reply in replies.items():
            cfg = reply.content[RECORD]
            for dst, sealed in zip(cfg.get("dst", []), cfg.get("ct", [])):
                dst = _node_id(dst)
                if dst in inbox and isinstance(sealed, bytes):   # anything else: the share fails authentication
                    inbox[dst].append((src, sealed))

        # Stage 2: the strategy's content + this site's shares out, masked update back.
        peers = ids_text(replies)
        contents = {}
        for nid in replies:
            content = RecordDict(dict(originals[nid].content.items()))
            srcs = [s for s, _ in inbox[nid]]
            cfg = ConfigRecord({"stage": "mask", "round": ctx, "peers": peers, "src": ids_text(srcs)})
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
            try:
                vector = record["vector"].numpy() if record is not None and "vector" in record else None
            except Exception:  # noqa: BLE001 - a site's bytes, not an array
                vector = None
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
        unmask_cfg = ConfigRecord({"stage": "unmask", "round": ctx, "survivors": ids_text(survivors),
                                   "dropped": ids_text(dropped)})
        replies = self._exchange("unmask", {n: RecordDict({RECORD: unmask_cfg}) for n in survivors}, group,
                                 control, report)
        report.unmasked = sorted(replies)
        started = time.perf_counter()
        shares: dict[tuple[str, int], list[bytes]] = {}
        for reply in replies.values():
            cfg = reply.content[RECORD]
            for owner, kind, share in zip(cfg.get("ids", []), cfg.get("kinds", []), cfg.get("shares", [])):
                owner = _node_id(owner)
                wanted = (kind == "b" and owner in survivors) or (kind == "s" and owner in dropped)
                if wanted and isinstance(share, bytes):
                    shares.setdefault((kind, owner), []).append(share)
        for kind, owners in (("b", survivors), ("s", dropped)):
            for owner in owners:
                if len(shares.get((kind, owner), [])) < threshold:
                    raise _Abort(f"too few shares to unmask site {owner} ({len(shares.get((kind, owner), []))}"
                                 f" < threshold {threshold})")
        try:
            for owner in survivors:
                seed = combine_shares(shares[("b", owner)])
                total -= self_mask(seed, ctx, owner, size)
            for gone in dropped:
                private = combine_shares(shares[("s", gone)])
                for owner in survivors:
                    mask = pair_mask(private, keys[owner][1], ctx, gone, owner, size)
                    # Survivor `owner` added the mask if owner < gone, subtracted it otherwise.
                    total = total - mask if owner < gone else total + mask
        except ValueError as exc:                    # malformed shares or a degenerate key
            raise _Abort(f"the sites' shares do not rebuild the masks ({exc})") from None
        try:
            arrays, report.total_examples = dequantize_sum(total, global_arrays, bits)
        except LeukError as exc:                      # no examples at all: nothing to average
            raise _Abort(str(exc).removeprefix("secure aggregation: ")) from None
        if report.total_examples > len(survivors) * settings.max_examples:
            raise _Abort("the unmasked total is out of range (a site sent a malformed update)")
        report.stage_seconds["unmask-server"] = time.perf_counter() - started
        return arrays


def _node_id(value) -> int | None:
    """A node id from a site's reply, or None for anything that is not one."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _last_line(text: str, limit: int = 200) -> str:
    """The telling line of a (possibly multi-line, Ray-wrapped) error reason."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [line for line in lines if "Error" in line or "Exception" in line] or lines or [""]
    return telling[-1][:limit]


class _Abort(Exception):
    """A secure round that cannot complete; every sampled site gets an error reply."""

