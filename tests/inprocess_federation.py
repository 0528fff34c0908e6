"""The product ServerApp's `main` run in this process against the simulation's virtual sites (the real
ClientApp, every message through protobuf): history, logs, tracking and model card in seconds."""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from leukfed.common.flower.inprocess import QueuedGrid, run_client_app

RUN_ID = 7


def run_federation(out: Path, monkeypatch, *, sites: int = 2, rounds: int = 2, tracking: str = "",
                   contexts_out: dict | None = None, strategy: str = "fedavg", resume: bool = False,
                   **extra) -> tuple[Path, list[str]]:
    """`leuk simulate`'s data and federated run settings, the ServerApp's main in-process; returns the
    state dir and the ServerApp's log lines (and fills `contexts_out` with each site's Flower Context)."""
    from leukfed.server import server_app
    from leukfed.simulations import client_app as simulation_app
    from leukfed.simulations.config import SimulateConfig
    from leukfed.common.site import use_share_source
    from leukfed.simulations.simulate import fed_config, prepare_data, simulation_sites

    # The simulation's ClientApp points this process's sites at its partition (only on its import);
    # tests/conftest.py points them back at a hospital's own folder after each test.
    use_share_source(simulation_app.partition_share)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    lines: list[str] = []
    monkeypatch.setattr(server_app, "log", lambda message: lines.append(message))
    cfg = SimulateConfig(out=str(out), sites=sites, rounds=rounds, model="tinycnn", image_size=24, batch_size=16,
                         synthetic_per_class=8, baselines=False, tracking=tracking, **extra)
    prep = prepare_data(cfg, out, lambda line: None)
    fed = dataclasses.replace(fed_config(cfg, prep, out, strategy), resume=resume)
    run_config = {**fed.to_run_config(), **simulation_sites(out)}
    nodes = {1000 + 17 * k: k for k in range(sites)}           # Flower node ids; partition K is site-K
    contexts = {n: Context(RUN_ID, n, {"partition-id": k}, RecordDict(), run_config) for n, k in nodes.items()}
    if contexts_out is not None:
        contexts_out.update(contexts)
    grid = QueuedGrid({n: partial(run_client_app, simulation_app.app, context=contexts[n]) for n in nodes},
                      run_id=RUN_ID)
    server_app.main(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
    return Path(fed.state_dir), lines


@pytest.fixture(scope="session")
def tracked_federation(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """One 2-site, 2-round federation for the site-name, tracking and model-card tests: (state dir, the
    ServerApp's log lines, the TensorBoard folder it wrote)."""
    root = tmp_path_factory.mktemp("federation")
    with pytest.MonkeyPatch.context() as monkeypatch:
        state, lines = run_federation(root / "out", monkeypatch, tracking=f"tensorboard:{root / 'tensorboard'}")
    return state, lines, root / "tensorboard"
