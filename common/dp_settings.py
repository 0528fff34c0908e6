"""A site's DP settings, the budget refusal, and the server's checks of the DP metrics sites report."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leukfed.common.errors import LeukError

ACCOUNTANTS = ("rdp",)


class BudgetSpent(LeukError):
    """The site's privacy budget would be exceeded by the next round: it stops contributing."""


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters of one site's local training, and the site's lifetime budget."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    budget_epsilon: float | None = None   # None: account and report, never refuse
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        checks = [(self.noise_multiplier > 0, "DP noise multiplier must be > 0"),
                  (self.max_grad_norm > 0, "DP max grad norm must be > 0"),
                  (0 < self.delta < 1, "DP delta must be in (0, 1)"),
                  (self.budget_epsilon is None or self.budget_epsilon > 0, "DP budget epsilon must be > 0"),
                  (self.accountant in ACCOUNTANTS, f"DP accountant must be one of {', '.join(ACCOUNTANTS)}")]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise LeukError("; ".join(problems))


def require_opacus() -> None:
    """LeukError naming the install command when Opacus (the `dp` extra) is missing."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise LeukError("differential privacy needs Opacus: pip install 'leukfed[dp]'") from None


def noise_problem(metrics: Mapping[str, Any], min_noise_multiplier: float) -> str | None:
    """Server policy: why an update must be refused for too little DP noise, or None.

    The noise multiplier is what the site reports; the server cannot verify it, so this guards
    against misconfigured sites, not dishonest ones.
    """
    if min_noise_multiplier <= 0:
        return None
    reported = metrics.get("dp_noise_multiplier")
    if reported is None:
        return f"no DP noise reported; the run requires noise multiplier >= {min_noise_multiplier:g}"
    if not float(reported) >= min_noise_multiplier:   # NaN fails too
        return f"DP noise multiplier {float(reported):g} < the required {min_noise_multiplier:g}"
    return None


def round_privacy(site_metrics: Mapping[Any, Mapping[str, Any]]) -> dict[str, float]:
    """For the server's history: the round's worst site epsilon and least noise (empty without DP)."""
    reports = [m for m in site_metrics.values() if "dp_epsilon" in m]
    if not reports:
        return {}
    return {"max_epsilon": max(float(m["dp_epsilon"]) for m in reports),
            "min_noise_multiplier": min(float(m["dp_noise_multiplier"]) for m in reports),
            "delta": max(float(m["dp_delta"]) for m in reports), "sites": len(reports)}
