"""`leuk-server`: the coordinator's SuperLink plus one federated run, checkpointed every round."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import typer

from leukfed.common.cli_support import err_console, new_app, run_app
from leukfed.common.fedconfig import FedConfig
from leukfed.common.settings import cli_parameters, with_options

app = new_app("Coordinate a federated run across hospitals (Flower SuperLink + leukfed ServerApp).")
DEFAULT_PORT = 9092


def _say(text: str) -> None:
    typer.echo(text, err=False)


def _check_state(state: Path, resume: bool, fed) -> None:
    from leukfed.common.errors import LeukError
    from leukfed.server.state import checkpoint_path, resume_difference

    has_checkpoint = checkpoint_path(state).exists()
    if resume and not has_checkpoint:
        raise LeukError(f"--resume given but {state} holds no checkpoint")
    if has_checkpoint and not resume:
        raise LeukError(f"{state} already holds a run; pass --resume to continue it or choose another --state")
    if resume:
        differences = resume_difference(state, fed)
        if differences:
            raise LeukError("cannot resume: the config differs from the checkpoint's: " + "; ".join(differences))


STATUS_EVERY_S = 20.0


def _follow(link, run_id: int, state: Path, total_rounds: int) -> str:
    """Print each completed round as the ServerApp records it; return the final run status."""
    from leukfed.server.state import read_history

    printed = len(read_history(state))
    asked = -STATUS_EVERY_S
    while True:
        history = read_history(state)
        for row in history[printed:]:
            _print_round(row, total_rounds)
        printed = len(history)
        # A status query takes ~20 ms in this process, but falls back to a `flwr` process (~2 s of CPU,
        # taken from the sites when they share the machine): ask rarely while rounds remain (to notice
        # a failed run), often once the last is in.
        if printed >= total_rounds or time.monotonic() - asked >= STATUS_EVERY_S:
            asked, status = time.monotonic(), link.status(run_id)
            if status.startswith("finished"):
                return status
        time.sleep(1.0)


def _print_round(row: dict, total_rounds: int) -> None:
    sites = ", ".join(sorted(row["sites"])) or "none"   # by site name (history.json keys)
    metrics = row["server_evaluate"] or row["evaluate"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "seconds" not in k)
    _say(f"round {row['round']}/{total_rounds}: {row['sites_replied']}/{row['sites_sampled']} sites replied "
         f"({sites}); {shown or 'no metrics'}; {row['round_seconds']:.1f}s; "
         f"sent {row['bytes_sent'] / 1e6:.1f} MB, received {row['bytes_received'] / 1e6:.1f} MB")
    from leukfed.server.registered_sites import describe

    for failure in row["failures"]:
        reason = (failure["reason"] or "").strip().splitlines()
        _say(f"  {describe(failure['site'], failure['node'])} failed in {failure['phase']}: "
             f"{reason[-1] if reason else '?'}")
    for rejected in row["rejected"]:
        _say(f"  {describe(rejected['site'], rejected['node'])} update rejected: {rejected['reason']}")


def serve(
    certs: Optional[Path] = typer.Option(None, "--certs", help="Folder from `leuk certs init` (CA, server certificate and key, site public keys)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="The one port sites connect to."),
    admin_port: Optional[int] = typer.Option(None, "--admin-port", help="Loopback port of the SuperLink's control "
                                             "plane (default: a free one); sites never reach it."),
    admin_allow: str = typer.Option("", "--admin-allow", help="IP[,IP]: clients that may also use the control "
                                    "plane on --host/--port (default: none)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no site authentication (testing only)."),
    dashboard: str = typer.Option("", "--dashboard", help="[HOST:]PORT: serve the read-only dashboard of the run "
                                  "there while it runs (HOST defaults to 127.0.0.1). Off unless given."),
    **settings,
) -> None:
    """Start the SuperLink, register the sites' keys, run the rounds and export the final model."""
    from leukfed.common.errors import LeukError
    from leukfed.server.certs import CertsLayout
    from leukfed.common.fab import write_app_dir, write_run_config
    from leukfed.server.registered_sites import RegisteredSites
    from leukfed.server.run_status import write_status
    from leukfed.server.superlink import SuperLink

    fed = run_settings(settings)
    state, resume, rounds = Path(fed.state_dir), fed.resume, fed.rounds
    _check_state(state, resume, fed)
    if insecure:
        err_console.print("WARNING: --insecure: no TLS and no site authentication; updates travel in clear text "
                          "and any machine can join. Use only for local tests.", markup=False)
        layout = None
    elif certs is None:
        raise LeukError("--certs DIR is required (create it with `leuk certs init`), or --insecure for local tests")
    else:
        layout = CertsLayout.at(certs)
        layout.require_server_files()
    if dashboard:
        from leukfed.server.dashboard import serve_dashboard

        serve_dashboard(state, dashboard, say=_say)
    link = SuperLink()
    link.start(state / "superlink", host=host, port=port, insecure=insecure, supernode_auth=not insecure,
               certs=None if layout is None else (layout.ca_cert, layout.server_cert, layout.server_key),
               admin_port=admin_port, admin_allow=[ip.strip() for ip in admin_allow.split(",") if ip.strip()])
    try:
        _say(f"SuperLink listening on {host}:{port} ({'insecure' if insecure else 'TLS, registered sites only'})")
        if layout is not None:
            registered = link.register_sites({name: files.public_key for name, files in layout.sites().items()})
            for name, node_id in registered.items():
                _say(f"registered site {name} (node {node_id})")
            # The ServerApp sends to, waits for and accepts replies from these nodes only.
            fed = dataclasses.replace(fed, registered_sites=RegisteredSites.format(registered))
        app_dir = write_app_dir(state / "app")
        write_status(state, phase="submitting", total_rounds=rounds)
        run_id = link.submit(app_dir, write_run_config(state / "run_config.toml", fed))
        what = f"FedAvg over the {fed.patient_recipe} patient head" if fed.task == "patients" else fed.strategy
        _say(f"run {run_id} submitted: {rounds} rounds of {what}, waiting for {fed.min_sites} sites")
        status = _follow(link, run_id, state, rounds)
        if status != "finished:completed":
            write_status(state, phase=f"ended {status}")
            details = str(link.run_info(run_id).get("status-details", "")).strip()
            raise LeukError(f"the run ended {status}: {details.splitlines()[-1] if details else 'see ' + str(link.log_path)}")
        if fed.task == "patients":
            _say(f"finished: patient model exported to {state / 'patient-model'} (patient_model.json, "
                 f"heads.safetensors, MODEL_CARD.md; `leuk evaluate --model {state / 'patient-model'} --data DIR`)")
            return
        metrics = json.loads((state / "metrics.json").read_text()) if (state / "metrics.json").exists() else {}
        _say(f"finished: model exported to {state} (model.safetensors, model.json, metrics.json, history.json, "
             "MODEL_CARD.md)")
        if metrics:
            _say("final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    finally:
        link.terminate()


def run_settings(settings: dict) -> "FedConfig":
    """The run's FedConfig from the options; a model or image size no site could build is refused here,
    before the SuperLink starts or any site is waited for."""
    from leukfed.common.fedconfig import FedConfig
    from leukfed.models import resolve_data_config

    values = dict(settings)
    values["state_dir"] = str(Path(values["state_dir"]).expanduser().resolve())
    if values.get("eval_data"):
        values["eval_data"] = str(Path(values["eval_data"]).expanduser().resolve())
    fed = FedConfig(**values)
    resolve_data_config(fed.model, fed.image_size or None)  # LeukError: unknown model, impossible size
    from leukfed.server.tracking import check_tracking

    check_tracking(fed.tracking)   # a missing library: refused before the SuperLink starts
    return fed


# Every coordinator setting of FedConfig is an option, with the schema's default and help.
app.command()(with_options(serve, cli_parameters(FedConfig, "coordinator")))
main = run_app(app)
