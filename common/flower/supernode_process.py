"""`flower-supernode` with its waits shortened: the node notices a new message within 0.5 s, not 3 s."""
from __future__ import annotations

import sys

MODULE = "leukfed.common.flower.supernode_process"   # what the SuperNode's command line shows (pidfile check)


def command() -> list[str]:
    """The command that starts this SuperNode (arguments as for `flower-supernode`)."""
    return [sys.executable, "-m", MODULE]


def main() -> None:
    from leukfed.common.errors import LeukError
    from leukfed.common.flower.patches import apply_patches

    try:
        apply_patches("supernode")
    except LeukError as err:
        sys.exit(f"error: {err}")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
