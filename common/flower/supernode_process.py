"""`flower-supernode` with its waits shortened: the node notices a new message within 0.5 s, not 3 s."""
from __future__ import annotations

import sys

MODULE = "leukfed.common.flower.supernode_process"   # what the SuperNode's command line shows (pidfile check)


def command() -> list[str]:
    """The command that starts this SuperNode (arguments as for `flower-supernode`)."""
    return [sys.executable, "-m", MODULE]


def main() -> None:
    from leukfed.common.flower.patches import run_flower_program

    run_flower_program("supernode", "flwr.supernode.cli.flower_supernode:flower_supernode")


if __name__ == "__main__":
    main()
