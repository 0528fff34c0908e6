"""Faulty or malicious virtual sites, for measuring robustness in simulation (never used in deployment)."""
from __future__ import annotations

import torch

from leukfed.common.errors import LeukError

KINDS = ("nan", "signflip", "noise", "labelflip")


def parse_faults(spec: str, num_sites: int) -> dict[int, str]:
    """`0:signflip,2:noise:3` -> {0: "signflip", 2: "noise:3"}; empty spec -> {}."""
    faults: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        site, _, fault = item.partition(":")
        if not site.isdigit() or int(site) >= num_sites or fault.split(":")[0] not in KINDS:
            raise LeukError(f"bad fault {item!r}: use SITE:KIND with SITE < {num_sites} and KIND in {', '.join(KINDS)}"
                            " (noise and signflip take an optional :SCALE)")
        faults[int(site)] = fault
    return faults


def _scale(fault: str, default: float) -> float:
    parts = fault.split(":")
    return float(parts[1]) if len(parts) > 1 else default


def flip_labels(fault: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping: every label shifted to the next class."""
    return (labels + 1) % num_classes if fault.startswith("labelflip") else labels


def corrupt_update(fault: str, global_state: dict[str, torch.Tensor], new_state: dict[str, torch.Tensor],
                   seed: int) -> dict[str, torch.Tensor]:
    """What a broken or malicious site sends instead of its honest update."""
    kind = fault.split(":")[0]
    if kind not in ("nan", "signflip", "noise"):
        return new_state
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, new in new_state.items():
        if not new.is_floating_point():
            out[key] = new
        elif kind == "nan":
            out[key] = torch.full_like(new, float("nan"))
        elif kind == "signflip":
            old = global_state[key].to(new.dtype)
            out[key] = old - _scale(fault, 4.0) * (new - old)
        else:
            out[key] = new + _scale(fault, 1.0) * torch.randn(new.shape, generator=generator, dtype=new.dtype)
    return out

