"""Site policies for tests that run site tasks in-process on tiny data."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def lenient_policy() -> dict[str, str]:
    """Node config for in-process tasks on tiny data: a site policy that lets metrics on one example out
    (the safe default floor is 10)."""
    from leukfed.client.policy import SitePolicy

    path = Path(tempfile.gettempdir()) / f"leukfed-lenient-policy-{os.getpid()}.toml"
    if not path.exists():
        path.write_text(SitePolicy(min_metric_examples=1).to_toml())
    return {"site-policy": str(path)}
