"""`flower-superlink` with leukfed's patches: model objects in memory, the control plane closed to sites."""
from __future__ import annotations

import sys

MODULE = "leukfed.common.flower.superlink_process"   # what the SuperLink's command line shows (pidfile check)


def command() -> list[str]:
    """The command that starts this SuperLink (arguments as for `flower-superlink`)."""
    return [sys.executable, "-m", MODULE]


def main() -> None:
    from leukfed.common.flower.patches import run_flower_program

    run_flower_program("superlink", "flwr.superlink.cli:flower_superlink")


if __name__ == "__main__":
    main()
