"""`flower-supernode` with its waits shortened: the node notices a new message within 0.5 s, not 3 s."""
from __future__ import annotations

import sys
import time

MODULE = "leukfed.client.supernode_process"   # what the SuperNode's command line shows (pidfile check)

# Flower 1.41's node loop (flwr.supernode.start_client_internal) asks the SuperLink for a message, and
# when there is none sleeps 3 s: on average 1.5 s of idle time per message, twice a round. It waits
# for the ClientApp's reply, and for each reply object, in steps of 0.5 s. Asking the SuperLink every
# 0.5 s is one small authenticated request per node and poll; the local waits read memory.
POLL_S = 0.5
LOCAL_WAIT_S = 0.05


class _ShorterSleeps:
    """The `time` module as the node loop sees it: polls of POLL_S, local waits of LOCAL_WAIT_S."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S if seconds >= 1.0 else LOCAL_WAIT_S))


def shorter_waits() -> None:
    """Patch the node loop's module-level names; a Flower layout without them keeps Flower's waits."""
    from flwr.supernode import start_client_internal as node

    from leukfed.server.flower_env import REMOTE_PULL_BACKOFF_S, prompt_object_pulls

    if getattr(node, "time", None) is time:
        node.time = _ShorterSleeps()
    prompt_object_pulls(node, "pull_objects", REMOTE_PULL_BACKOFF_S)  # from the SuperLink, maybe far away


def command() -> list[str]:
    """The command that starts this SuperNode (arguments as for `flower-supernode`)."""
    return [sys.executable, "-m", MODULE]


def main() -> None:
    shorter_waits()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
