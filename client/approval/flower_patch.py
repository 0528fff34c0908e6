"""The one change approval makes inside Flower: a check before `flwr-clientapp` installs a task's bundle.

Flower's `run_clientapp` pulls the task (message, context, run, FAB) and calls the module-level name
`install_from_fab(fab.content, ...)` before unpacking the bundle or importing any app code; the check
wraps that name. Registry row (leukfed.common.flower.patches): target
`flwr.supernode.runtime.run_clientapp.install_from_fab`; reason: refuse a task whose bundle or
installed code is not approved, before Flower unpacks or imports it; checked with Flower 1.41.0 and
1.42.0; apply: `apply_install_from_fab_patch(check)`.
"""
from __future__ import annotations

from typing import Any, Callable

TARGET_MODULE = "flwr.supernode.runtime.run_clientapp"
TARGET_NAME = "install_from_fab"


def apply_install_from_fab_patch(check: Callable[[bytes], Any]) -> Callable[..., Any]:
    """Make Flower's ClientApp runner call `check(fab_bytes)` before it installs any bundle.

    Raises RuntimeError when Flower no longer has the patched name (a Flower upgrade moved it):
    approval must never silently stop checking. Returns the installed wrapper.
    """
    import importlib

    runtime = importlib.import_module(TARGET_MODULE)
    real_install = getattr(runtime, TARGET_NAME, None)
    if not callable(real_install):
        raise RuntimeError(f"cannot enforce code approval: {TARGET_MODULE}.{TARGET_NAME} is missing in this "
                           "Flower version (see leukfed.common.flower.patches)")
    real_install = getattr(real_install, "leuk_unchecked", real_install)

    def checked_install(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        check(fab_content)
        return real_install(fab_content, *args, **kwargs)

    checked_install.leuk_unchecked = real_install  # type: ignore[attr-defined]
    setattr(runtime, TARGET_NAME, checked_install)
    return checked_install


def prepared_flwr_clientapp(check: Callable[[bytes], Any]) -> Callable[[], None]:
    """Flower's flwr-clientapp main, patched in this process: `check(fab_bytes)` runs before the FAB is
    installed, and the message's arrays are pulled promptly (the SuperNode hands out the task before
    they have arrived from the SuperLink; Flower would first wait a whole second)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    from leukfed.common.flower.patches import LOCAL_PULL_BACKOFF_S, prompt_object_pulls

    apply_install_from_fab_patch(check)
    prompt_object_pulls(runtime, "pull_and_inflate_object_from_tree", LOCAL_PULL_BACKOFF_S)
    return flwr_clientapp
