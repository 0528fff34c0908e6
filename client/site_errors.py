"""What a failed task may tell the coordinator: a site error code and a generic text; details stay local."""
from __future__ import annotations

import secrets
import sys
import time
import traceback

from leukfed.common.errors import LeukError, SiteRefusal

# Exception texts name files, folders and patients (a corrupt image's path, a missing partition file):
# none of it may reach the coordinator. Only the code and this text leave the site. (A policy refusal,
# SiteRefusal or BudgetSpent, sends its own text, which names the rule only.)
SITE_ERRORS = {
    1: "internal error",
    3: "data could not be read",
    4: "the received model does not match this site's model",
    5: "a check at the site failed",
    6: "out of memory",
    7: "the site's audit log could not be written",
}
DATA_MODULES = ("leukfed.common.data", "leukfed.common.dataset", "leukfed.common.splits",
                "leukfed.common.partition", "leukfed.common.images", "leukfed.common.patients_table", "PIL.")


def site_log(text: str) -> None:
    """The site's local log: the task process's stderr, which the SuperNode writes to its log file."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} leukfed site: {text}", file=sys.stderr, flush=True)


class ReceivedArraysRefused(LeukError):
    """The server's arrays do not describe this site's model (keys, dtypes, shapes or sizes)."""


def is_refusal(exc: BaseException) -> bool:
    """A policy refusal: its message names the rule only, and is sent as it is."""
    from leukfed.common.dp_settings import BudgetSpent

    return isinstance(exc, (SiteRefusal, BudgetSpent))


def error_code(exc: BaseException) -> int:
    if isinstance(exc, ReceivedArraysRefused):
        return 4
    if isinstance(exc, MemoryError):
        return 6
    if isinstance(exc, OSError) or _raised_in(exc, DATA_MODULES):
        return 3
    if isinstance(exc, LeukError):
        return 4 if _raised_in(exc, ("leukfed.common.site",), function="build_site_model") else 5
    return 1


def public_reason(code: int, ref: str) -> str:
    return f"site error {code}: {SITE_ERRORS[code]}; see the site's local log (ref {ref})"


def new_ref() -> str:
    """A random incident reference: it links the coordinator's failure line to the site's log entry."""
    return secrets.token_hex(6)


def local_detail(exc: BaseException) -> str:
    """The full exception, for the site's own log only."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def log_failure(kind: str, ref: str, exc: BaseException) -> None:
    site_log(f"{kind} task failed (ref {ref}): {local_detail(exc)}\n"
             + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())


def _raised_in(exc: BaseException, modules: tuple[str, ...], function: str = "") -> bool:
    """Whether the innermost leukfed or PIL frame of the exception's traceback is in one of `modules`."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_globals.get("__name__", ""), tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    for module, name in reversed(frames):
        if module.startswith(("leukfed.", "PIL.")):
            return module.startswith(modules) and (not function or name == function)
    return False
