"""`leuk-server`: the coordinator's SuperLink plus one federated run, checkpointed every round."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from leukfed.common.cli_support import err_console, new_app, run_app

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
    sites = ", ".join(sorted(row["sites"])) or "none"
    metrics = row["server_evaluate"] or row["evaluate"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "seconds" not in k)
    _say(f"round {row['round']}/{total_rounds}: {row['sites_replied']}/{row['sites_sampled']} sites replied "
         f"(nodes {sites}); {shown or 'no metrics'}; {row['round_seconds']:.1f}s; "
         f"sent {row['bytes_sent'] / 1e6:.1f} MB, received {row['bytes_received'] / 1e6:.1f} MB")
    for failure in row["failures"]:
        _say(f"  node {failure['node']} failed in {failure['phase']}: {failure['reason'].strip().splitlines()[-1]}")
    for rejected in row["rejected"]:
        _say(f"  node {rejected['node']} update rejected: {rejected['reason']}")


@app.command()
def serve(
    certs: Optional[Path] = typer.Option(None, "--certs", help="Folder from `leuk certs init` (CA, server certificate and key, site public keys)."),
    model: str = typer.Option(..., "--model", help="Model name (see `leuk models`)."),
    rounds: int = typer.Option(..., "--rounds", help="Federated rounds."),
    min_sites: int = typer.Option(2, "--min-sites", help="Sites needed before a round starts (and to keep going)."),
    state: Path = typer.Option(..., "--state", help="State directory: checkpoints, history, final model."),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg or krum."),
    local_epochs: int = typer.Option(1, "--local-epochs", help="Local epochs per round."),
    local_steps: int = typer.Option(0, "--local-steps", help="Local batches per round instead of epochs (0: use epochs)."),
    lr: float = typer.Option(1e-3, "--lr", help="Local learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Local batch size."),
    image_size: int = typer.Option(0, "--image-size", help="Input size in px (0: the model's default)."),
    classes: str = typer.Option("", "--classes", help="Comma-separated class names (default: asked from the sites)."),
    pretrained: str = typer.Option("auto", "--pretrained", help="Initial weights: auto, none, hub, package or a file."),
    proximal_mu: float = typer.Option(0.01, "--proximal-mu", help="FedProx mu."),
    server_lr: float = typer.Option(0.01, "--server-lr", help="FedAdam/FedYogi server learning rate."),
    transfer_dtype: str = typer.Option("float32", "--transfer-dtype", help="float32, float16 or bfloat16 updates."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Optional held-out data at the coordinator."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="The one port sites connect to."),
    admin_port: Optional[int] = typer.Option(None, "--admin-port", help="Loopback port of the SuperLink's control "
                                             "plane (default: a free one); sites never reach it."),
    admin_allow: str = typer.Option("", "--admin-allow", help="IP[,IP]: clients that may also use the control "
                                    "plane on --host/--port (default: none)."),
    round_timeout: float = typer.Option(600.0, "--round-timeout", help="Seconds to wait for sites in a round."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last completed round in --state."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no site authentication (testing only)."),
    evaluate_every: int = typer.Option(1, "--evaluate-every", help="Sites score the global model every N rounds "
                                       "and after the last (0: after the last only)."),
    evaluate_separately: bool = typer.Option(False, "--evaluate-separately", help="Send the model again in an "
                                             "evaluation message of its own each round (default: the sites score "
                                             "it at the start of the next round's training; the last round alone)."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation", help="Masked updates: the server sees only "
                                            "the sum of the sites' updates (fedavg, fedprox, fedadam, fedyogi)."),
    secagg_threshold: int = typer.Option(0, "--secagg-threshold", help="Sites needed to unmask (0: a majority, at least 2)."),
    dp_noise: float = typer.Option(0.0, "--dp-noise-multiplier", help="> 0: sites train with DP-SGD at this noise multiplier."),
    dp_max_grad_norm: float = typer.Option(1.0, "--dp-max-grad-norm", help="DP-SGD per-example clipping bound."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="Delta at which sites report epsilon."),
    dp_min_noise: float = typer.Option(0.0, "--dp-min-noise-multiplier", help="Refuse updates trained with less noise."),
) -> None:
    """Start the SuperLink, register the sites' keys, run the rounds and export the final model."""
    from leukfed.common.errors import LeukError
    from leukfed.common.fedconfig import FedConfig
    from leukfed.server.certs import CertsLayout
    from leukfed.server.flwr_app import write_app_dir, write_run_config
    from leukfed.server.superlink import SuperLink

    state = state.expanduser().resolve()
    fed = FedConfig(model=model, class_names=classes, image_size=image_size, pretrained=pretrained, rounds=rounds,
                    strategy=strategy, local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
                    lr=lr, proximal_mu=proximal_mu, server_lr=server_lr, min_sites=min_sites,
                    round_timeout=round_timeout, transfer_dtype=transfer_dtype, seed=seed, state_dir=str(state),
                    resume=resume, eval_data=str(eval_data.resolve()) if eval_data else "",
                    evaluate_every=evaluate_every, evaluate_with_train=not evaluate_separately,
                    secure_aggregation=secure_aggregation, secagg_threshold=secagg_threshold, dp_noise_multiplier=dp_noise, dp_max_grad_norm=dp_max_grad_norm,
                    dp_delta=dp_delta, dp_min_noise_multiplier=dp_min_noise)
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
        app_dir = write_app_dir(state / "app")
        run_id = link.submit(app_dir, write_run_config(state / "run_config.toml", fed))
        _say(f"run {run_id} submitted: {rounds} rounds of {strategy}, waiting for {min_sites} sites")
        status = _follow(link, run_id, state, rounds)
        if status != "finished:completed":
            details = str(link.run_info(run_id).get("status-details", "")).strip()
            raise LeukError(f"the run ended {status}: {details.splitlines()[-1] if details else 'see ' + str(link.log_path)}")
        metrics = json.loads((state / "metrics.json").read_text()) if (state / "metrics.json").exists() else {}
        _say(f"finished: model exported to {state} (model.safetensors, model.json, metrics.json, history.json)")
        if metrics:
            _say("final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    finally:
        link.terminate()


main = run_app(app)
