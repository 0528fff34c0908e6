"""What one hospital does in a patient federation (`--task patients`): no Flower.

The site reads its own patient folders (data-path with patients.csv), keeps a seeded, stratified share of
its patients for validation (its policy's patient-val-fraction and patient-split-seed: never the run's),
extracts frozen features once into its own feature cache (STATE/image-cache/patient-features-*.npz; never
sent; in memory only without an image cache), and answers three requests with aggregates only:
the moments of its training patients' cells, a local update of the head, and the logit histogram of its
validation patients under a given head."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leukfed.common.errors import LeukError, SiteRefusal
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.patient_federated import (Moments, federable_recipe, logit_histogram, moments, round_lr,
                                              split_patients)
from leukfed.common.patient_heads import PatientHead, continue_training, head_scores, make_head

FEATURES_FILE = "patient-features-{backbone}-{size}.npz"


@dataclass
class SitePatients:
    """A site's patients as bags of frozen cell features; `val` marks its validation patients."""

    class_names: tuple[str, ...]
    bags: list[np.ndarray]
    y: np.ndarray        # 1 = the run's positive diagnosis
    val: np.ndarray      # bool per patient

    def side(self, validation: bool) -> tuple[list[np.ndarray], np.ndarray]:
        idx = np.flatnonzero(self.val == validation)
        return [self.bags[i] for i in idx], self.y[idx]

    @property
    def num_train(self) -> int:
        return int((~self.val).sum())

    @property
    def num_val(self) -> int:
        return int(self.val.sum())


_LOADED: dict[tuple, SitePatients] = {}   # one process serves a site's tasks in turn (simulation, tests)


def feature_cache_file(site: SiteConfig, backbone: str, image_size: int) -> Path | None:
    """The site's own feature cache, in its image cache folder (STATE/image-cache); None when the site keeps
    no image cache (node config image-cache ""): its features then stay in memory, never on disk."""
    if not site.image_cache:
        return None
    return Path(site.image_cache) / FEATURES_FILE.format(backbone=backbone, size=image_size)


def load_site_patients(fed: FedConfig, site: SiteConfig, split: tuple[float, int]) -> SitePatients:
    """The site's patients, features from its cache when it matches the images (else extracted and cached);
    `split`: the site's own (validation fraction, seed) from its policy, never the run's (a run's seed or
    site-val-fraction would let a coordinator move one patient between two runs' training sides and read
    that patient's sums from the difference of their moments)."""
    from leukfed.common.patient_model import patient_bags, patient_cells
    from leukfed.common.site import check_site_classes, site_manifest

    recipe = federable_recipe(fed.patient_recipe)
    if not site.data_path:
        raise LeukError(f"site {site.name} has no data-path in its node config")
    fraction, seed = split
    key = (site.data_path, fed.patient_recipe, fed.positive, fraction, seed, fed.class_names)
    if key in _LOADED:
        return _LOADED[key]
    manifest = site_manifest(site)
    if not manifest.has_patients() or fed.positive not in manifest.class_names or len(manifest.class_names) != 2:
        raise SiteRefusal(f"site {site.name} refused: its data are not patient folders with two diagnoses, one of "
                          f"them {fed.positive!r}")
    check_site_classes(manifest.class_names, fed.classes, site.name)
    features = site_features(manifest, recipe.backbone, recipe.image_size,
                             feature_cache_file(site, recipe.backbone, recipe.image_size))
    bags, y = patient_bags(patient_cells(manifest), features, recipe, (), fed.positive)
    _LOADED[key] = SitePatients(manifest.class_names, bags, y, split_patients(y, fraction, seed))
    return _LOADED[key]


def site_features(manifest, backbone: str, image_size: int, cache: Path | None) -> np.ndarray:
    """Features of every cell of the manifest, in its order: from `cache` when it holds these exact images."""
    from leukfed.common.patient_features import (extract_features, feature_backbone, load_feature_cache,
                                                 save_feature_cache)

    paths = [s.path for s in manifest.samples]
    hashes = [s.sha256 for s in manifest.samples]
    if cache is not None and cache.is_file():
        try:
            return load_feature_cache(cache, paths, hashes)
        except LeukError:
            pass   # other or changed images: extract again and replace it
    model = feature_backbone(backbone, image_size)
    features = extract_features(model, [manifest.root / p for p in paths])
    if cache is not None:
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_feature_cache(cache, paths, hashes, features, backbone=backbone, image_size=image_size)
    return features


def require_training_patients(data: SitePatients, minimum: int, site_name: str, request: str) -> None:
    """Refuse (SiteRefusal) `request` when the site has fewer training patients than the run's
    min-metric-examples (at least 1): an aggregate over fewer would expose them."""
    if data.num_train < max(minimum, 1):
        raise SiteRefusal(f"site {site_name} refused the {request}: fewer training patients than the run's "
                          f"min-metric-examples ({max(minimum, 1)})")


def site_moments(data: SitePatients, minimum: int, site_name: str) -> Moments:
    """Moments of the training patients; refused when they are fewer than the run's min-metric-examples."""
    require_training_patients(data, minimum, site_name, "moments request")
    bags, y = data.side(False)
    return moments(bags, y)


def received_head(fed: FedConfig, state: dict[str, torch.Tensor], dim: int) -> PatientHead:
    """The head the server sent (layout already checked by the ClientApp's wire checks)."""
    head = make_head(federable_recipe(fed.patient_recipe).head, dim)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise LeukError(f"received head does not fit recipe {fed.patient_recipe}: {str(exc).splitlines()[0]}") from None
    return head.eval()


def site_train(fed: FedConfig, site: SiteConfig, data: SitePatients, state: dict[str, torch.Tensor],
               server_round: int, class_counts: tuple[int, int] | None) -> tuple[dict[str, torch.Tensor], int]:
    """The head trained `local-epochs` more passes over the training patients (continue_training, step size
    round_lr of this round); returns its state and the number of training patients (the FedAvg weight)."""
    bags, y = data.side(False)
    if not len(y):
        raise SiteRefusal(f"site {site.name} refused: it has no training patients")
    head = received_head(fed, state, bags[0].shape[1])
    r = max(server_round - 1, 0)
    salt = site.partition_id if site.partition_id >= 0 else zlib.crc32(site.name.encode()) % 1000
    trained = continue_training(head, bags, y, epochs=fed.local_epochs,
                                weight_decay=federable_recipe(fed.patient_recipe).weight_decay,
                                lr=round_lr(fed.lr, r, fed.rounds), batch=fed.batch_size,
                                seed=fed.seed * 100_000 + 1000 * r + salt, class_counts=class_counts)
    return {k: v.detach().cpu() for k, v in trained.state_dict().items()}, len(y)


def site_histogram(fed: FedConfig, data: SitePatients, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, int]:
    """(2, BINS) counts of the validation patients' logits under the received head, and how many there are."""
    bags, y = data.side(True)
    if not len(y):
        return np.zeros((2, 0), dtype=np.int64), 0
    logits, _ = head_scores(received_head(fed, state, bags[0].shape[1]), bags)
    return logit_histogram(logits, y), len(y)
