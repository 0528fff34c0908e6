"""Privacy accounting: RDP epsilon of DP-SGD steps, noise for a target epsilon, the persisted ledger."""
from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukfed.common.atomic import atomic_write_json
from leukfed.common.dp_settings import BudgetSpent, DPSettings, require_opacus
from leukfed.common.errors import LeukError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one training per site at a time is assumed there
    fcntl = None

# The RDP orders of Opacus' RDPAccountant, so epsilons match what its accountant reports.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
LEDGER_VERSION = 1
# One step of the accountant's history: (noise multiplier, Poisson sample rate, number of steps).
Mechanism = tuple[float, float, int]


def epsilon_of(history: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of the composition of every (noise, sample rate, steps) in `history`.

    The same bound as Opacus' RDPAccountant (same orders); RDP composes additively and is linear
    in the number of steps, so one per-step curve per (noise, sample rate) serves every round.
    """
    if not history:
        return 0.0
    require_opacus()
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(int(steps) * _rdp_per_step(float(noise), float(rate)) for noise, rate, steps in history)
    with warnings.catch_warnings():
        # RDP warns when the best order is at the edge of its grid; the bound stays valid.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    require_opacus()
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends `target_epsilon` at `delta` in `steps` Poisson steps (RDP)."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the search probes tiny noise: edge-order warnings
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant="rdp",
                                          epsilon_tolerance=0.005))


class PrivacyLedger:
    """A site's DP-SGD history on its data, kept as JSON so that fresh processes compose it.

    Every training round (of any run) that touched the site's data appends one entry; epsilon is
    always computed from the whole history, so budgets hold across rounds, runs and restarts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            for e in entries:
                _ = (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh over a damaged ledger: that would forget privacy already spent.
            raise LeukError(f"privacy ledger {self.path} is unreadable ({exc}); repair or remove it "
                            "knowingly") from None
        return entries

    def history(self) -> list[Mechanism]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in self.entries()]

    def epsilon(self, delta: float, extra: Sequence[Mechanism] = ()) -> float:
        """Epsilon spent so far (plus `extra`, the steps about to be taken) at `delta`."""
        return epsilon_of(self.history() + list(extra), delta)

    def would_exceed(self, budget_epsilon: float, delta: float, noise_multiplier: float,
                     sample_rate: float, steps: int) -> bool:
        return self.epsilon(delta, [(noise_multiplier, sample_rate, steps)]) > budget_epsilon

    def require_budget(self, settings: DPSettings, sample_rate: float, steps: int) -> None:
        """Raise BudgetSpent, before any training, when the next `steps` would overspend."""
        if settings.budget_epsilon is None:
            return
        planned = (settings.noise_multiplier, sample_rate, steps)
        if not self.would_exceed(settings.budget_epsilon, settings.delta, *planned):
            return
        spent, after = self.epsilon(settings.delta), self.epsilon(settings.delta, [planned])
        raise BudgetSpent(f"privacy budget spent: epsilon {spent:.3f} of {settings.budget_epsilon:g} "
                          f"(delta {settings.delta:g}) used on this site's data; the next round "
                          f"({steps} steps at noise {settings.noise_multiplier:g}) would reach "
                          f"{after:.3f}, so this site stops contributing")

    def record(self, history: Sequence[Mechanism], delta: float, **context: Any) -> float:
        """Append one round's mechanisms (with e.g. run id, round); returns epsilon spent in all."""
        entries = self.entries()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for noise, rate, steps in history:
            entries.append({"time": stamp, "noise_multiplier": float(noise), "sample_rate": float(rate),
                            "steps": int(steps), **context})
        epsilon = epsilon_of([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries], delta)
        if history:
            entries[-1]["epsilon_after"] = epsilon
            entries[-1]["delta"] = delta
            atomic_write_json(self.path, {"version": LEDGER_VERSION, "accountant": "rdp", "entries": entries})
        return epsilon

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Exclusive across processes: check, train and record as one step, so that two
        concurrent trainings on the same data cannot both pass the budget check."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield self
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
