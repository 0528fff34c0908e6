"""One settings schema: every setting declared once; leuk-server's and leuk simulate's options derive from it."""
from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path

import click
import pytest
import typer

from leukfed.client.policy import SitePolicy
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.settings import WHO, declared, default_of, unknown_keys
from leukfed.simulations.config import SimulateConfig
from leukfed.simulations.loopback import ENV, cli

# `leuk train` options and the run setting each one is on leuk-server; the rest with why they are not.
TRAIN_TO_RUN = {"epochs": "local_epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer",
                "weight_decay": "weight_decay", "loss": "loss", "label_smoothing": "label_smoothing",
                "class_weights": "class_weights", "image_size": "image_size", "augment": "augment",
                "pretrained": "pretrained", "weights": "pretrained", "seed": "seed", "group_by": "site_group_by",
                "model": "model", "resume": "resume", "bn_recalibration": "bn_recalibration"}
NOT_FEDERATED = {"data": "each site's own folder (leuk-client --data)", "out": "leuk-server --state",
                 "device": "each site's own (leuk-client --device)", "split": "each site splits its own data",
                 "skip_bad": "a site refuses bad data (leuk-client checks it before joining)",
                 "patience": "early stopping on a pooled validation split does not exist in a federation"}


def options(app: typer.Typer, name: str | None = None) -> dict[str, click.Option]:
    command = typer.main.get_command(app)
    if name is not None:
        command = command.commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


@pytest.fixture(scope="module")
def server_options() -> dict[str, click.Option]:
    from leukfed.server.cli import app

    return options(app)


def test_every_setting_declares_its_type_default_help_and_owner() -> None:
    for cls in (FedConfig, SiteConfig, SitePolicy, SimulateConfig):
        for f in fields(cls):
            if f.name == "extra":
                continue
            assert f.metadata.get("who") in WHO and f.metadata.get("help"), (cls.__name__, f.name)
            assert str(f.type) in ("str", "int", "float", "bool", "tuple[str, ...]"), (cls.__name__, f.name)
    assert "partition_file" not in {f.name for f in fields(FedConfig)}  # the run cannot name a site's files
    assert {f.metadata["who"] for f in fields(SiteConfig) if f.name.startswith("partition")} == {"simulation"}


def test_every_coordinator_setting_is_a_leuk_server_option_with_the_same_default_and_help(server_options) -> None:
    for f in declared(FedConfig):
        assert f.metadata["who"] == "coordinator"
        if not f.metadata["cli"]:  # set by leuk-server itself (the registered sites), never by an option
            assert f.name not in server_options, f.name
            continue
        option = server_options[f.name]
        assert option.help == f.metadata["help"], f.name
        if f.metadata["required"]:
            assert option.required, f.name
        else:
            assert option.default == default_of(f), f.name


def test_every_federated_training_setting_of_leuk_train_can_be_set_on_leuk_server(server_options) -> None:
    from leukfed.cli import app

    train = options(app, "train")
    assert set(train) == set(TRAIN_TO_RUN) | set(NOT_FEDERATED), "a new `leuk train` option: map it or say why not"
    for option, setting in TRAIN_TO_RUN.items():
        assert setting in server_options, (option, setting)
        if option not in ("epochs", "image_size", "model", "weights"):  # different defaults on purpose
            assert train[option].default == server_options[setting].default, option


def test_leuk_simulate_shares_the_run_settings_defaults_and_help() -> None:
    from leukfed.cli import app

    simulate = options(app, "simulate")
    run = {f.name: f for f in declared(FedConfig)}
    shared = [f for f in declared(SimulateConfig) if f.name in run]
    assert {"augment", "rounds", "lr", "batch_size", "model", "dp_noise_multiplier"} <= {f.name for f in shared}
    for f in shared:
        assert default_of(f) == simulate[f.name].default, f.name
        # a simulation's own default is declared with inherit(default=), which keeps the run's default beside it
        assert f.metadata.get("inherited_default", default_of(f)) == default_of(run[f.name]), f.name
        assert f.metadata["help"] == run[f.name].metadata["help"] == simulate[f.name].help, f.name
    for f in declared(SimulateConfig):
        if f.metadata["cli"]:
            assert simulate[f.name].help == f.metadata["help"], f.name


def test_the_run_config_round_trips_and_unknown_keys_are_named() -> None:
    fed = FedConfig(model="resnet18", rounds=7, class_weights=True, dp_noise_multiplier=1.0)
    wire = fed.to_run_config()
    assert FedConfig.from_run_config(wire) == fed
    assert unknown_keys(FedConfig, {**wire, "partition-file": "/x", "sim": 1}) == ["partition-file", "sim"]
    with pytest.raises(LeukError, match="setting 'rounds' must be int"):
        FedConfig.from_run_config({"rounds": "many"})


def test_a_site_policy_file_round_trips_and_refuses_unknown_keys(tmp_path: Path) -> None:
    policy = SitePolicy(min_sites=4, models="tinycnn,resnet18", dp_delta=1e-6)
    (tmp_path / "policy.toml").write_text(policy.to_toml())
    assert SitePolicy.load(tmp_path / "policy.toml") == policy
    (tmp_path / "bad.toml").write_text('min-sites = 4\nmin-site = 1\n')
    with pytest.raises(LeukError, match="unknown setting 'min-site'"):
        SitePolicy.load(tmp_path / "bad.toml")


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--model", "resnet18", "--image-size", "8"], "model resnet18 needs input size >= "),
])
def test_leuk_server_refuses_an_impossible_model_before_starting(tmp_path: Path, args, message) -> None:
    result = subprocess.run([*cli("server.cli"), "--insecure", "--state", str(tmp_path / "state"), "--port", "1",
                             *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "SuperLink" not in result.stdout and not (tmp_path / "state" / "superlink").exists()


def test_leuk_client_policy_is_its_file_then_the_options_given(tmp_path: Path) -> None:
    from leukfed.client import cli as client_cli

    ctx = typer.main.get_command(client_cli.app).make_context("leuk-client", ["--min-sites", "4", "--dp-delta", "1e-6"])
    (tmp_path / "policy.toml").write_text("min-sites = 5\nmax-local-epochs = 3\n")
    names = {f.name for f in fields(SitePolicy)}
    written = client_cli._site_policy(ctx, tmp_path / "policy.toml",
                                      {k: v for k, v in ctx.params.items() if k in names}, tmp_path)
    assert SitePolicy.load(written) == SitePolicy(min_sites=4, max_local_epochs=3, dp_delta=1e-6)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "many", [3]])
def test_a_site_policy_number_that_is_not_one_is_refused_by_name(value) -> None:
    from leukfed.common.settings import from_mapping

    with pytest.raises(LeukError, match="setting 'max-local-epochs' must be int"):
        from_mapping(SitePolicy, {"max-local-epochs": value})
