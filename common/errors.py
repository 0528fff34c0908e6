"""User-facing errors: one clear line, non-zero exit, no traceback."""


class LeukError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


class SiteRefusal(LeukError):
    """A site's policy refused a request; the message names the rule, never data, and may be sent to the coordinator."""
