"""The ServerApp's main against ClientApps in this process (tests, benchmarks): every message and reply
through Flower's protobuf form, as a SuperLink carries them, without Flower's runtime processes."""
from __future__ import annotations

import uuid
from typing import Callable, Iterable, Mapping, Optional

from flwr.app import Context, Error, Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Site = Callable[[Message], Optional[Message]]   # a site's answer to one message; None = the reply is lost


def wire(message: Message) -> Message:
    """Through Flower's protobuf form, as the SuperLink carries it."""
    return message_from_proto(message_to_proto(message))


def run_client_app(app: Callable[[Message, Context], Message], message: Message, context: Context) -> Message:
    """`app(message, context)`; an exception becomes an error reply, as Flower turns ClientApp exceptions."""
    try:
        return app(message, context)
    except Exception as exc:  # noqa: BLE001 - the error reply is what the server would receive
        return Message(Error(1, f"{type(exc).__name__}: {exc}"), reply_to=message)


class InProcessGrid(Grid):
    """Delivers each message (its wire form) to `sites[dst_node_id]` and returns the replies (wire form).

    `run_id`: the run the server sees (None: asking for it fails); `online()`: the connected nodes (it may
    change with every look; default: the sites); `extra_replies(message)`: replies no site was asked for.
    `received` is every reply the server got. Subclasses change what a site receives in `deliver`.
    """

    def __init__(self, sites: Mapping[int, Site], *, run_id: int | None = None,
                 online: Callable[[], Iterable[int]] | None = None,
                 extra_replies: Callable[[Message], Iterable[Message]] | None = None) -> None:
        self.sites = sites
        self.run_id = run_id
        self.online = online or (lambda: list(self.sites))
        self.extra_replies = extra_replies or (lambda message: [])
        self.received: list[Message] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        if self.run_id is None:
            raise RuntimeError("no run in tests")
        return type("Run", (), {"run_id": self.run_id})()

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.online())

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def deliver(self, message: Message) -> Message | None:
        """The addressed site's reply to `message`, or None where it is lost."""
        return self.sites[message.metadata.dst_node_id](message)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in map(wire, messages):              # each site gets its own copy
            reply = self.deliver(message)
            for answer in map(wire, [*([] if reply is None else [reply]), *self.extra_replies(message)]):
                self.received.append(answer)
                replies.append(answer)
        return replies


class QueuedGrid(InProcessGrid):
    """push_messages delivers at once and keeps the reply for pull_messages (what PromptGrid calls)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())   # as Flower's grids do
            reply = self.deliver(wire(message))
            if reply is not None:
                self.waiting[message.metadata.message_id] = wire(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]
        self.received.extend(replies)
        return replies


def set_task_identity(run_id: int, node_id: int = 1, task_id: int = 1) -> None:
    """What Flower's runtime sets before it runs an app (flwr.server.compat.app does the same): the
    ServerApp's and ClientApps' code reads it, so an in-process federation sets it first."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
