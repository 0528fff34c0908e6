"""What every leukfed command line shares: one-line errors, progress bars, JSON output."""
from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from leukfed.common.errors import LeukError

err_console = Console(stderr=True)


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)


def run_guarded(entry: Callable[[], None]) -> None:
    """Run a command line (a console script or a benchmark script): LeukError -> `error: ...` on one line,
    exit 2; a bug -> one line, exit 1, unless LEUK_DEBUG is set."""
    # SIGTERM (kill, systemd, docker stop) unwinds like an error, so the Flower processes a command
    # started are stopped by its `finally` blocks instead of being orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        entry()
    except LeukError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: one line unless the user asks for detail
        if os.environ.get("LEUK_DEBUG"):
            raise
        err_console.print(f"internal error: {type(exc).__name__}: {exc} (set LEUK_DEBUG=1 for the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Wrap a Typer app as a console script (run_guarded)."""
    return lambda: run_guarded(app)


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("LEUK_NO_PROGRESS")


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A rich progress bar on stderr (a no-op display when stderr is not a terminal)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                        disable=not progress_enabled(), transient=True)
    with progress:
        yield progress


def parse_csv_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []
