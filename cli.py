"""The `leuk` command line: data checks, centralized training, evaluation, prediction, simulation."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import typer

from leukfed.common.cli_support import new_app, print_json, progress_bar, run_app
from leukfed.common.fedconfig import STRATEGY_HELP
from leukfed.common.settings import with_options

app = new_app("leukfed: federated learning for leukemia diagnosis from blood-smear images.")
data_app = new_app("Inspect datasets and make leak-free splits.")
app.add_typer(data_app, name="data")


def _mount_optional(module: str, attribute: str, name: str) -> None:
    """Sub-apps that live with their subsystem (certificates with the server, benchmarks with simulations)."""
    import importlib

    try:
        sub_app = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return
    app.add_typer(sub_app, name=name)


_mount_optional("leukfed.server.certs_cli", "certs_app", "certs")
_mount_optional("leukfed.simulations.bench", "bench_app", "bench")


@data_app.command("check")
def data_check(
    directory: Path = typer.Argument(..., help="Dataset folder (class folders, patient folders or C-NMC)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Count images per class and patient, list corrupt, non-image and duplicate files."""
    from leukfed.common.data_check import check_dataset, format_check_report

    report = check_dataset(directory)
    print_json(report) if as_json else typer.echo(format_check_report(report))


@data_app.command("split")
def data_split(
    directory: Path = typer.Argument(..., help="Dataset folder."),
    out: Path = typer.Option(..., "--out", help="Split JSON file to write."),
    val: float = typer.Option(0.15, help="Validation fraction."),
    test: float = typer.Option(0.15, help="Test fraction."),
    seed: int = typer.Option(0, help="Random seed."),
    by: str = typer.Option("auto", help="Grouping: auto (patient when known), image, patient, block:N."),
) -> None:
    """Make a stratified, duplicate- and patient-aware train/val/test split and save it."""
    from leukfed.common.data import scan_dataset
    from leukfed.common.splits import make_split, save_split, split_summary

    manifest = scan_dataset(directory)
    split = make_split(manifest, val_fraction=val, test_fraction=test, seed=seed, group_by=by)
    save_split(split, out)
    print_json(split_summary(split, manifest))


@app.command("models")
def models_list() -> None:
    """List the registered models with their default input size."""
    from leukfed.models import list_models, resolve_data_config

    for name in list_models():
        config = resolve_data_config(name)
        typer.echo(f"{name:22s} input {config.input_size[1]}px x{config.input_size[0]} (min {config.min_size})")


@app.command("train")
def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    model: str = typer.Option("dscnet", "--model", help="Model name (see `leuk models`)."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    epochs: int = typer.Option(20, help="Epochs."),
    batch_size: int = typer.Option(32, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd."),
    weight_decay: float = typer.Option(0.0, help="Weight decay."),
    loss: str = typer.Option("ce", help="ce (cross-entropy) or kl (KL-divergence, as DSCNet)."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing."),
    class_weights: bool = typer.Option(False, "--class-weights", help="Weight the loss by inverse class frequency of the training split."),
    image_size: Optional[int] = typer.Option(None, help="Input size in px (default: the model's)."),
    augment: str = typer.Option("paper002", help="paper002, flip or none."),
    pretrained: str = typer.Option("auto", help="auto (offline package weights when the model has them), none, hub, package, or a weights file."),
    weights: Optional[Path] = typer.Option(None, help="Start from this weights file (.safetensors/.pt)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same metrics)."),
    patience: int = typer.Option(0, help="Early stopping after this many epochs without a better validation loss (0: off)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split JSON from `leuk data split` (default: make one)."),
    group_by: str = typer.Option("auto", help="Split grouping when no --split: auto, image, patient, block:N."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images instead of refusing."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    bn_recalibration: int = typer.Option(0, help="After each epoch, recompute BatchNorm statistics over up to N "
                                               "training batches with the epoch's weights (0: off; steadies DSCNet)."),
) -> None:
    """Train one model centrally; writes model, metrics, history and plots to --out."""
    from leukfed.common.centralized import Callbacks, TrainConfig, train_centralized
    from leukfed.common.data import scan_dataset
    from leukfed.common.data_check import check_dataset
    from leukfed.common.errors import LeukError
    from leukfed.common.metrics import format_metrics_table

    cfg = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      weight_decay=weight_decay, loss=loss, label_smoothing=label_smoothing,
                      class_weights=class_weights, image_size=image_size, augment=augment,
                      pretrained=pretrained, weights=str(weights) if weights else None, seed=seed,
                      patience=patience, device=device, group_by=group_by, skip_bad=skip_bad,
                      bn_recalibration=bn_recalibration)
    report = check_dataset(data)
    if (report["unreadable"] or report["non_image_files"]) and not skip_bad:
        bad = report["unreadable"] + report["non_image_files"]
        raise LeukError(f"{len(bad)} unreadable or non-image files in {data} (e.g. {bad[0]}); "
                        "fix them or pass --skip-bad")
    with progress_bar() as progress:
        task = progress.add_task("epoch", total=None)

        def on_epoch_start(epoch: int, steps: int) -> None:
            progress.reset(task, total=None, description=f"epoch {epoch}/{epochs}")

        def on_epoch_end(row: dict) -> None:
            progress.console.print(
                f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
                f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  ({row['train_seconds']:.0f}s)")

        callbacks = Callbacks(on_epoch_start, lambda n: progress.advance(task, n), on_epoch_end)
        metrics = train_centralized(data, out, cfg, split_file=split, resume=resume, callbacks=callbacks,
                                    manifest=scan_dataset(data))
    typer.echo(format_metrics_table(metrics, title=f"{model} on the test split"))
    typer.echo(f"run saved to {out}")


@app.command("train-patients")
def train_patients_cmd(
    data: Path = typer.Option(..., "--data", help="Patient folders (Patient_XX/<cell type>/<image>) with patients.csv."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    recipe: str = typer.Option("lite0-meanprob", "--recipe", help="Patient recipe (see benchmarks/RESULTS.md, APL)."),
    positive: str = typer.Option("APL", "--positive", help="The diagnosis to detect."),
) -> None:
    """Train a patient-level model (frozen features + patient head; threshold and temperature from validation)."""
    from leukfed.common.patient_model import recipe_named, train_patient_model

    model = train_patient_model(data, out, recipe_named(recipe), positive=positive, progress=typer.echo)
    v = model.description["validation"]
    typer.echo(f"validation ({v['num_patients']} patients, out-of-fold): AUC {v['auc']:.3f}, sensitivity "
               f"{v['sensitivity']:.2f}, specificity {v['specificity']:.2f} at threshold {model.threshold:.4f}")
    typer.echo(f"run saved to {out} ({model.description['train_seconds']:.0f} s)")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., "--model", help="Run directory (from `leuk train`, leuk-server or `leuk simulate`)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    split: Optional[Path] = typer.Option(None, "--split", help="Score only this split's subset (default: all images)."),
    subset: str = typer.Option("test", help="With --split: train, val or test."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics JSON here (and the per-image "
                                       "predictions beside it, as <out>.predictions.npz)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write the per-image probabilities, "
                                               "labels and patient ids here (.npz or .json)."),
    bootstrap: int = typer.Option(0, "--bootstrap", help="95% confidence intervals from N bootstrap resamples "
                                  "(of patients when the data names them; 0: none)."),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="Seed of the bootstrap resampling."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Score a saved model: accuracy, sensitivity, specificity, F1, AUC, confusion matrix."""
    from leukfed.common.atomic import atomic_write_json
    from leukfed.common.errors import LeukError
    from leukfed.common.inference import evaluate_run
    from leukfed.common.metrics import format_intervals_table, format_metrics_table

    if subset not in ("train", "val", "test"):
        raise LeukError(f"--subset must be train, val or test, not {subset!r}")
    if bootstrap < 0:
        raise LeukError(f"--bootstrap must be >= 0, not {bootstrap}")
    if predictions is None and out is not None:
        predictions = out.with_name(f"{out.stem}.predictions.npz")
    metrics = evaluate_run(model, data, split_file=split, subset=subset, device=device, bootstrap=bootstrap,
                           bootstrap_seed=bootstrap_seed, predictions_file=predictions)
    levels = [(metrics, f"{model} on {data}")]
    if "patient_level" in metrics:
        levels.append((metrics["patient_level"], "per patient (mean cell probability)"))
    for number, (level, title) in enumerate(levels):
        typer.echo(("\n" if number else "") + format_metrics_table(level, title=title))
        if "ci" in level:
            about = metrics["bootstrap"]
            typer.echo("\n" + format_intervals_table(level, level["ci"], f"95% CI ({about['method']}, {about['resamples']} "
                                                      f"resamples of {about['unit']}s, seed {about['seed']})"))
    if predictions is not None:
        typer.echo(f"predictions written to {predictions}")
    from leukfed.common.calibration import evaluate_at_threshold, format_threshold_metrics

    if (at_threshold := evaluate_at_threshold(model, data, split_file=split, subset=subset, device=device)):
        metrics["at_threshold"] = at_threshold
        typer.echo(format_threshold_metrics(at_threshold))
    if out:
        atomic_write_json(out, metrics)
        typer.echo(f"metrics written to {out}")


@app.command("predict")
def predict_cmd(
    paths: list[Path] = typer.Argument(..., help="Image files, or folders (one patient each: mean over its images)."),
    model: Path = typer.Option(..., "--model", help="Run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="Write a PNG per patient of the cells that drove "
                                           "its prediction (by attention or cell probability) into this folder."),
    heatmap: bool = typer.Option(False, "--heatmap", help="With --gallery: also Grad-CAM overlays of those cells."),
    top: int = typer.Option(12, "--top", help="Cells per gallery."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Class probabilities (calibrated when the run has calibration.json) and the decision per image or
    patient folder, at the run's stored threshold when it has one."""
    from leukfed.common.inference import predict_paths

    rows = predict_paths(model, paths, device=device, gallery=gallery, heatmap=heatmap, top=top)
    if as_json:
        print_json(rows)
        return
    classes = list(rows[0]["probabilities"])
    if as_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        decided = ["threshold", "flagged"] if "decision" in rows[0] else []
        writer.writerow(["path", "kind", "num_images", "predicted", *classes, *decided])
        for r in rows:
            extra = [f"{r['decision']['threshold']:.6f}", r["decision"]["flagged"]] if decided else []
            writer.writerow([r["path"], r["kind"], r["num_images"], r["predicted"],
                             *(f"{r['probabilities'][c]:.6f}" for c in classes), *extra])
        typer.echo(buffer.getvalue().rstrip("\n"))
        return
    typer.echo(f"{'path':50s} {'predicted':>10s} " + " ".join(f"{c:>8s}" for c in classes))
    for r in rows:
        typer.echo(f"{r['path'][-50:]:50s} {r['predicted']:>10s} "
                   + " ".join(f"{r['probabilities'][c]:8.4f}" for c in classes))
    first = rows[0]
    if "decision" in first:
        d = first["decision"]
        typer.echo(f"calibrated (T={first['temperature']:.3f}); {d['positive']} when P({d['positive']}) >= "
                   f"{d['threshold']:.4f} (chosen on {d['chosen_on']} for >= {d['target_sensitivity']:.0%} sensitivity)")
    elif first["calibrated"]:
        typer.echo(f"calibrated (T={first['temperature']:.3f}); decision: the most probable class")
    for r in rows:
        for key in ("gallery", "heatmap"):
            if key in r:
                typer.echo(f"{key}: {r[key]}")


@app.command("calibrate")
def calibrate_cmd(
    model: Path = typer.Option(..., "--model", help="Run directory (from `leuk train` or leuk-server)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    split: Path = typer.Option(..., "--split", help="Split JSON; calibration uses its --subset only."),
    subset: str = typer.Option("val", help="train, val or test (val: never tune on test)."),
    positive: Optional[str] = typer.Option(None, "--positive", help="Positive class for an operating threshold (e.g. APL)."),
    target_sensitivity: float = typer.Option(0.9, "--target-sensitivity", help="With --positive: the highest threshold "
                                             "that flags at least this share of the subset's positives."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Temperature scaling and an operating threshold chosen on validation; writes calibration.json."""
    from leukfed.common.calibration import CALIBRATION_JSON, RELIABILITY_PNG, calibrate_run

    c = calibrate_run(model, data, split_file=split, subset=subset, positive=positive,
                      target_sensitivity=target_sensitivity, device=device)
    typer.echo(f"temperature {c.temperature:.4f} fitted on {c.num_samples} {c.level}s of {c.subset}; "
               f"ECE ({c.ece_bins} bins) {c.ece_before:.4f} -> {c.ece_after:.4f}")
    if c.threshold is not None:
        r = c.at_threshold
        typer.echo(f"threshold {c.threshold:.4f} on P({c.positive}): sensitivity {r['sensitivity']:.3f} "
                   f"(target {c.target_sensitivity:.2f}), specificity "
                   f"{'n/a' if r['specificity'] is None else format(r['specificity'], '.3f')} on {c.subset}")
    typer.echo(f"written: {model / CALIBRATION_JSON}, {model / RELIABILITY_PNG}")


@app.command("dashboard")
def dashboard_cmd(
    state: Path = typer.Argument(..., help="A leuk-server state folder (or a folder of them)."),
    listen: str = typer.Option("127.0.0.1:8050", "--listen", help="[HOST:]PORT (loopback by default)."),
) -> None:
    """The coordinator's read-only dashboard of a finished or running state folder, until Ctrl-C."""
    import time

    from leukfed.common.errors import LeukError
    from leukfed.server.dashboard import serve_dashboard

    if not state.is_dir():
        raise LeukError(f"{state} is not a folder")
    server = serve_dashboard(state, listen, say=typer.echo)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


def simulate_cmd(
    strategy: str = typer.Option("fedavg", "--strategy", help="One or more, comma-separated: " + STRATEGY_HELP + "."),
    **settings,
) -> None:
    """Virtual hospitals on this machine: federated vs centralized vs local-only, with a report."""
    from leukfed.common.cli_support import parse_csv_list
    from leukfed.simulations.report import method_table, seeds_table
    from leukfed.simulations.config import SimulateConfig
    from leukfed.simulations.simulate import simulate

    cfg = SimulateConfig(**settings, strategies=tuple(parse_csv_list(strategy)))
    from leukfed.server.tracking import check_tracking

    check_tracking(cfg.tracking)   # a missing library: refused before any training
    results = simulate(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo(seeds_table(results) if "seeds" in results else method_table(results))
    typer.echo(f"report: {Path(cfg.out) / 'report.md'}")
    typer.echo(f"html report: {Path(cfg.out) / 'report.html'}")


def _simulate_options() -> list:
    """`leuk simulate`'s options come from SimulateConfig, whose run settings come from FedConfig."""
    from leukfed.common.settings import cli_parameters
    from leukfed.simulations.config import SimulateConfig

    return cli_parameters(SimulateConfig, ("coordinator", "simulation"))


app.command("simulate")(with_options(simulate_cmd, _simulate_options()))
main = run_app(app)
