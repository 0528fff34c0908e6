"""Grid wrappers: plain delegation, and a send-and-receive that notices replies within a fraction of a second."""
from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from leukfed.common.flower.wire import NpyError, pack_message, unpack_message
from leukfed.common.flower.patches import apply_patches

# Flower's deployment grid sleeps 3 s between pulls: on average 1.5 s of idle time per phase, twice a
# round. Pulling asks the local SuperLink for ready replies (no site traffic), so polling often is cheap.
PULL_INTERVAL_S = 0.2


class DelegatingGrid(Grid):
    """A Grid that forwards everything to the grid it wraps; subclasses change what they need."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """Send and wait like Flower's grid (same timeout semantics), but notice replies within 0.2 s; the
    arrays of each message travel packed into one Array (common/flower/wire.py, PACKED_KEY)."""

    def __init__(self, grid: Grid, pull_interval: float = PULL_INTERVAL_S) -> None:
        super().__init__(grid)
        self.pull_interval = pull_interval
        apply_patches("serverapp")  # the ServerApp process: refuse an unchecked Flower, pull replies promptly

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        packed: dict = {}  # one packed copy of a model sent to every site
        return self._grid.push_messages([pack_message(m, packed) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_unpacked(m) for m in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if waiting:
                time.sleep(self.pull_interval)
        return replies


def _unpacked(reply: Message) -> Message:
    """The reply with its arrays unpacked; a damaged pack is left as it came, for the strategy's reply
    checks to reject (its keys do not match the model's) rather than failing the round."""
    try:
        return unpack_message(reply)
    except NpyError:
        return reply
