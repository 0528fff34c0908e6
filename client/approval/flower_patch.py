"""The one change approval makes inside Flower: a check before `flwr-clientapp` installs a task's bundle.

Flower's `run_clientapp` pulls the task (message, context, run, FAB) and calls the module-level name
`install_from_fab(fab.content, ...)` before unpacking the bundle or importing any app code; the check
wraps that name. It is row `fab-approval-check` of the adapter's table (leukfed.common.flower.patches),
installed through it: a Flower release without the name fails loudly, never silently unchecked.
"""
from __future__ import annotations

from typing import Any, Callable


def apply_install_from_fab_patch(check: Callable[[bytes], Any]) -> None:
    """Make Flower's ClientApp runner call `check(fab_bytes)` before it installs any bundle (LeukError
    when Flower no longer has the patched name). Applying it again replaces the check, never stacks."""
    from leukfed.common.flower.patches import install

    def checked(real_install: Callable[..., Any]) -> Callable[..., Any]:
        real_install = getattr(real_install, "leuk_unchecked", real_install)

        def checked_install(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
            check(fab_content)
            return real_install(fab_content, *args, **kwargs)

        checked_install.leuk_unchecked = real_install  # type: ignore[attr-defined]
        return checked_install

    install("fab-approval-check", checked)


def prepared_flwr_clientapp(check: Callable[[bytes], Any]) -> Callable[[], None]:
    """Flower's flwr-clientapp main with the adapter's clientapp patches (prompt pulls of the task's
    arrays) and `check(fab_bytes)` before the FAB is installed."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from leukfed.common.flower.patches import apply_patches

    apply_patches("clientapp")
    apply_install_from_fab_patch(check)
    return flwr_clientapp
