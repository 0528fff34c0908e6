"""The ClientApp of `leuk simulate`: the product ClientApp, each virtual site given its share and fault."""
from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from leukfed.client.client_app import app as product_app
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.site import SiteShare, cached_manifest, use_share_source
from leukfed.server.registered_sites import NAME_RECORD
from leukfed.simulations.faults import corrupt_update, flip_labels

COMPONENT = "leukfed.simulations.client_app:app"
# Declared only in the simulation's app bundle; moved into each virtual site's node config here, so the
# product ClientApp sees a plain run config (and refuses any key it does not know).
PARTITION_KEY = "simulation-partition-file"
POLICY_KEY = "simulation-site-policy"


def _partition(site: SiteConfig) -> dict:
    partition = json.loads(Path(site.partition_file).read_text())
    if not 0 <= site.partition_id < len(partition["sites"]):
        raise LeukError(f"partition id {site.partition_id} is outside the {len(partition['sites'])} sites")
    return partition


def partition_share(fed: FedConfig, site: SiteConfig) -> SiteShare:
    """A virtual site's images: its share of partition.json, and its fault, if any."""
    if not site.partition_file:
        raise LeukError(f"virtual site {site.name} has no partition-file in its node config")
    partition = _partition(site)
    manifest = cached_manifest(partition["data"])
    share = partition["sites"][site.partition_id]
    fault = share.get("fault", "")
    relabel = (lambda labels, n: flip_labels(fault, labels, n)) if fault else None
    tamper = (lambda old, new, seed: corrupt_update(fault, old, new, seed=seed)) if fault else None
    return SiteShare(manifest, share["train"], share["val"], fed.classes or manifest.class_names, relabel, tamper)


use_share_source(partition_share)


def virtual_site(context: Context) -> Context:
    """The node config a hospital's leuk-client would write, for the virtual site `partition-id`."""
    run_config = dict(context.run_config)
    partition_file = str(run_config.pop(PARTITION_KEY, ""))
    policy_file = str(run_config.pop(POLICY_KEY, ""))
    partition_id = int(context.node_config.get("partition-id", -1))
    name = f"site-{partition_id}"
    state_dir = Path(str(run_config.get("state-dir", "")) or "leuk-server-state")
    node_config = {**context.node_config, "site-name": name, "partition-file": partition_file,
                   "site-policy": policy_file, "dp-clear-metrics": True,  # a study wants its curves
                   "dp-ledger": str(state_dir / "privacy" / f"{name}.json")}
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config,
                   state=context.state, run_config=run_config)


def named_reply(msg: Message, context: Context) -> Message:
    """The product ClientApp's reply, carrying the virtual site's name (`site-K`): a simulation has no
    registration list, so the coordinator names its sites by what they call themselves."""
    site = virtual_site(context)
    reply = product_app(msg, site)
    if not reply.has_error():
        reply.content[NAME_RECORD] = ConfigRecord({"name": str(site.node_config["site-name"])})
    return reply


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return named_reply(msg, context)


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    return product_app(msg, virtual_site(context))   # its stages' replies are checked field by field


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return named_reply(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return named_reply(msg, context)
