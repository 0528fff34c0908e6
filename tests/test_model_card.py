"""MODEL_CARD.md in every exported run directory: the federated export, `leuk train`, and what it states."""
from __future__ import annotations

from pathlib import Path

import pytest

from inprocess_federation import tracked_federation  # noqa: F401 - the shared federation fixture

from leukfed.common.fedconfig import FedConfig
from leukfed.common.model_card import MODEL_CARD, federated_card, metric_rows, render


@pytest.mark.slow   # the shared in-process federation (tests/inprocess_federation.py)
def test_the_federated_export_has_a_card_naming_sites_rounds_privacy_and_limits(tracked_federation) -> None:  # noqa: F811
    state, _, _ = tracked_federation
    card = (state / MODEL_CARD).read_text()
    assert [p.name for p in state.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"] == []   # atomic
    for text in ("# Model card: tinycnn (federated)", "| site-0 |", "| site-1 |", "2 federated round(s) of fedavg",
                 "trained from scratch", "No differential privacy", "Secure aggregation: off", "| accuracy |",
                 "not a diagnosis", "acute promyelocytic leukemia (APL)", "leuk-server --certs CERTS",
                 "--rounds 2", "--min-sites 2"):
        assert text in card, text
    assert "1017" not in card and "node" not in card.split("## Intended use")[0]   # sites by name; node ids stay out


def test_intervals_are_shown_where_the_metrics_carry_them() -> None:
    metrics = {"accuracy": 0.7, "accuracy_ci": [0.6, 0.8], "macro_f1": 0.5, "ci": {"macro_f1": {"low": 0.4, "high": 0.55}},
               "loss": 0.9, "patient_level": {"accuracy": 0.75, "ci": {"accuracy": [0.5, 0.9]}}}
    rows = metric_rows(metrics)
    assert rows[:3] == ["| accuracy | 0.7 | 0.6 – 0.8 |", "| macro_f1 | 0.5 | 0.4 – 0.55 |", "| loss | 0.9 | — |"]
    text = render(federated_card(FedConfig(), "none (random init)", ("a", "b"), [], metrics))
    assert "Per patient:" in text and "| accuracy | 0.75 | 0.5 – 0.9 |" in text


def test_privacy_settings_and_the_epsilon_reached_are_stated() -> None:
    fed = FedConfig(dp_noise_multiplier=1.1, dp_max_grad_norm=0.5, secure_aggregation=True, min_sites=3)
    history = [{"round": r, "sites": {"h1": {"node": 5, "train": {"num-examples": 40}, "evaluate": {}}},
                "privacy": {"max_epsilon": eps, "delta": 1e-5, "min_noise_multiplier": 1.1, "sites": 1}}
               for r, eps in ((1, 0.8), (2, 1.3))]
    text = render(federated_card(fed, "package:imagenet (classifier head randomly initialised)", ("a", "b"),
                                 history, {"accuracy": 0.5}))
    assert "noise multiplier 1.1, per-example clipping 0.5, delta 1e-05" in text
    assert "the largest epsilon any site reported: 1.3 at delta 1e-05" in text
    assert "Secure aggregation: on" in text and "| h1 | 40 | — |" in text and "ImageNet weights shipped" in text
    assert "--dp-noise-multiplier 1.1" in text and "--secure-aggregation" in text


def test_leuk_train_writes_a_card(tmp_path: Path) -> None:
    from leukfed.common.centralized import TrainConfig, train_centralized
    from leukfed.common.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", per_class=6, size=24, seed=1)
    cfg = TrainConfig(model="tinycnn", epochs=1, batch_size=8, image_size=24, pretrained="none", seed=2)
    train_centralized(data, tmp_path / "run", cfg)
    card = (tmp_path / "run" / MODEL_CARD).read_text()
    for text in ("# Model card: tinycnn (centralized)", "1 epoch(s) of centralized training", "test images",
                 "No differential privacy", "not a diagnosis", "leuk train --data", "--epochs 1", "--pretrained none",
                 "--model tinycnn"):
        assert text in card, text
