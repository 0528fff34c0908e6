"""The sites leuk-server registered: the only nodes a run sends to, waits for and accepts replies from."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from leukfed.common.errors import LeukError
from leukfed.common.site_keys import SITE_NAME_RE
from leukfed.server.grids import DelegatingGrid


# A reply's self-introduction (simulation's virtual sites): ConfigRecord NAME_RECORD with {"name": ...}.
NAME_RECORD = "site"


def describe(site: str, node: object) -> str:
    """A history entry's site for a log line: `site a (node 123)`, or `node 123` where it has no name."""
    return f"node {node}" if site == f"node-{node}" else f"site {site} (node {node})"


@dataclass(frozen=True)
class RegisteredSites:
    """node id -> site name. Empty: no list (simulation, `--insecure`): every node counts, and a node is
    named by what it calls itself (`claimed`, see `note_claim`) or `node-<id>`."""

    names: Mapping[int, str] = field(default_factory=dict)
    claimed: dict[int, str] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, text: str) -> RegisteredSites:
        """From FedConfig.sites, `name=node_id,...`."""
        names: dict[int, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, node = item.partition("=")
            if not name.strip() or not node.strip().isdigit():
                raise LeukError(f"bad site entry {item!r} in the run's sites: expected NAME=NODE_ID")
            names[int(node)] = name.strip()
        return cls(names)

    @staticmethod
    def format(node_ids: Mapping[str, int]) -> str:
        """FedConfig.sites for leuk-server's {name: node id} registrations."""
        return ",".join(f"{name}={node}" for name, node in sorted(node_ids.items()))

    @property
    def restricted(self) -> bool:
        return bool(self.names)

    def allows(self, node: int) -> bool:
        return not self.names or node in self.names

    def only(self, nodes: Iterable[int]) -> list[int]:
        return [n for n in nodes if self.allows(n)]

    def name(self, node: int) -> str | None:
        """The registered name (or, without a registration list, the claimed one); None if unknown."""
        return self.names.get(node) or self.claimed.get(node)

    def site_name(self, node: int) -> str:
        """The name logs and history use: the site's name, else `node-<id>`."""
        return self.name(node) or f"node-{node}"

    def label(self, node: int) -> str:
        """`site a (node 123)`, or `node 123` where no name is known."""
        return describe(self.site_name(node), node)

    def note_claim(self, node: int, claimed: object) -> None:
        """Without a registration list, a node's reply may name it (the simulation's `site-K`). A label
        only, never an identity: a valid site name that no other node holds; the first claim stays. With a
        list, the coordinator's names are the only ones."""
        if self.restricted or node in self.claimed or not isinstance(claimed, str):
            return
        fallback_like = claimed.startswith("node-")   # would pass for another node's unnamed label
        if SITE_NAME_RE.match(claimed) and not fallback_like and claimed not in self.claimed.values():
            self.claimed[node] = claimed

    def note_reply(self, reply: Message) -> None:
        """`note_claim` for the name a reply carries, if any."""
        if reply.has_error():
            return
        record = reply.content.config_records.get(NAME_RECORD)
        if record is not None:
            self.note_claim(reply.metadata.src_node_id, record.get("name"))

    def grid(self, grid: Grid) -> Grid:
        """The grid as seen by sampling and the site wait: only registered nodes exist."""
        if not self.restricted or isinstance(grid, RegisteredSitesGrid):
            return grid
        return RegisteredSitesGrid(grid, self)


class RegisteredSitesGrid(DelegatingGrid):
    """A grid that lists only registered nodes and refuses to send to any other."""

    def __init__(self, grid: Grid, sites: RegisteredSites) -> None:
        super().__init__(grid)
        self.sites = sites

    def get_node_ids(self) -> Iterable[int]:
        return self.sites.only(self._grid.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._registered_only(messages))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(self._registered_only(messages), timeout=timeout)

    def _registered_only(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            if not self.sites.allows(message.metadata.dst_node_id):
                raise LeukError(f"refusing to send to node {message.metadata.dst_node_id}: "
                                "not one of the sites this coordinator registered")
        return messages
