"""Flower's `flower-supernode`, unchanged except for two waits that cost every round seconds.

1. The node asks the SuperLink for new messages every 3 s; here every second.
2. The node pulls a message's arrays with a backoff of 1, 2, 4, 8, 10 s while the ServerApp is still
   uploading them (a message is visible before its arrays are); here 0.1 s doubling to 0.5 s, with
   Flower's time bound (2 h) instead of its 500-try bound.
Both are module-level names of `flwr.supernode.start_client_internal` in Flower 1.41; if a Flower
version lacks them, the node runs with Flower's own waits. Started by client/supernode.py.
"""
from __future__ import annotations

import functools
import sys
import time

POLL_S = 1.0
PULL_BACKOFF_S = (0.1, 0.5)


class _ShorterSleeps:
    """`time` for the node's loop: any sleep is at most POLL_S."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def _patch_waits() -> None:
    from flwr.supernode import start_client_internal as node

    if getattr(node, "time", None) is time:
        node.time = _ShorterSleeps()
    pull = getattr(node, "pull_objects", None)
    if pull is not None and not isinstance(pull, functools.partial):
        node.pull_objects = functools.partial(pull, initial_backoff=PULL_BACKOFF_S[0], backoff_cap=PULL_BACKOFF_S[1],
                                              max_tries_per_object=None)


def main() -> None:
    _patch_waits()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
