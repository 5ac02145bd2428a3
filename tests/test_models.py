import pytest
import torch
from torch import nn

from rifle.models import block_names, build_model, bundled_lite0_state_dict, param_groups
from rifle.data.transforms import build_transform


@pytest.fixture(scope="module")
def imagenet_lite0():
    import timm
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(bundled_lite0_state_dict())
    return net.eval()


@pytest.mark.parametrize("photo,classes", [
    ("chelsea", {281, 282, 285}),   # tabby, tiger cat, Egyptian cat
    ("coffee", {967}),              # espresso
    ("rocket", {657}),              # missile
])
def test_bundled_weights_recognise_real_photographs(imagenet_lite0, photo, classes):
    """The package's weights mapped key-by-key onto timm's tf_efficientnet_lite0 are the ImageNet ones."""
    from PIL import Image
    from skimage import data
    image = Image.fromarray(getattr(data, photo)())
    x = build_transform(224, (0.5,) * 3, (0.5,) * 3, train=False)({"image": [image], "label": [0]})["pixel_values"][0]
    with torch.no_grad():
        top = imagenet_lite0(x[None]).softmax(1)[0].topk(3).indices.tolist()
    assert top[0] in classes, top


def test_head_replaced_and_param_groups_split():
    model = build_model("efficientnet_lite0", num_classes=7)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7 and model.head.in_features == 1280
    assert model.mean == (0.5, 0.5, 0.5)
    backbone, head = param_groups(model)
    assert head["params"] == [model.head.weight, model.head.bias]
    assert len(backbone["params"]) + 2 == len(list(model.parameters()))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    # ImageNet weights really are in the backbone (not a random init)
    ref = bundled_lite0_state_dict()
    assert torch.equal(model.backbone.conv_stem.weight, ref["conv_stem.weight"])


def test_torchvision_and_timm_backbones():
    resnet = build_model("torchvision:resnet18", num_classes=5, pretrained=False).eval()
    assert resnet.head.in_features == 512 and isinstance(resnet.backbone.fc, nn.Identity)
    assert block_names(resnet.backbone) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert resnet(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    tv_eff = build_model("torchvision:efficientnet_b0", num_classes=3, pretrained=False)
    assert block_names(tv_eff.backbone) == [f"features.{i}" for i in range(9)]
    t = build_model("timm:resnet10t", num_classes=4, pretrained=False).eval()
    assert t.head.in_features == t.backbone.num_features and t(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_lite0_blocks_from_input_to_head():
    model = build_model("efficientnet_lite0", num_classes=2, pretrained=False)
    assert block_names(model.backbone) == ["conv_stem", "bn1"] + [f"blocks.{i}" for i in range(7)] + ["conv_head", "bn2"]


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v2", "torchvision:efficientnet_b0"])
def test_backbone_dropout_and_stochastic_depth_off_unless_kept(spec):
    """torchvision's mobilenet_v2 / efficientnet_b0 carry classifier dropout (and StochasticDepth) inside
    the backbone: off by default, so every method starts from a plain network; kept on request."""
    from torchvision.ops import StochasticDepth
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for keep in (False, True):
        model = build_model(spec, num_classes=3, pretrained=False, backbone_dropout=keep).train()
        rates = [m.p for m in model.modules() if isinstance(m, (nn.modules.dropout._DropoutNd, StochasticDepth))]
        assert rates and (any(p > 0 for p in rates) if keep else all(p == 0 for p in rates)), rates
        with torch.no_grad():  # training mode: BatchNorm uses batch statistics, deterministic for one batch
            same = torch.equal(model(x), model(x))
        assert same != keep


def test_silence_dropout_on_timm_drop_rate_drop_path_and_attention():
    import timm

    from rifle.models import silence_dropout
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, kw in (("resnet10t", dict(drop_rate=0.5, drop_path_rate=0.3, drop_block_rate=0.2)),
                     ("vit_tiny_patch16_224", dict(img_size=32, drop_rate=0.3, attn_drop_rate=0.3,
                                                   proj_drop_rate=0.3, drop_path_rate=0.3, pos_drop_rate=0.3))):
        net = timm.create_model(name, pretrained=False, num_classes=0, **kw).train()
        with torch.no_grad():
            assert not torch.equal(net(x), net(x)), name
            silence_dropout(net)
            assert torch.equal(net(x), net(x)), name


def test_backbone_dropout_and_sync_bn_are_options_that_change_the_run():
    from rifle import config as C
    flat = C.build({}).flat()
    assert flat["backbone_dropout"] is False and flat["sync_bn"] is False  # logged as params, like every option
    assert "backbone_dropout" not in C.RUN_ONLY and "sync_bn" not in C.RUN_ONLY
    assert C.config_digest(C.build({"sync_bn": "true"})) != C.config_digest(C.build({}))


# ------------------------------------------------------------------------------------------------ --weights

def test_weights_resolve_to_full_names_from_the_registries_only():
    from rifle.models import resolve_weights
    assert resolve_weights("torchvision:resnet50") == "ResNet50_Weights.IMAGENET1K_V2"  # DEFAULT is V2
    assert resolve_weights("torchvision:resnet50", "DEFAULT") == "ResNet50_Weights.IMAGENET1K_V2"
    assert resolve_weights("torchvision:resnet50", "IMAGENET1K_V1") == "ResNet50_Weights.IMAGENET1K_V1"
    assert resolve_weights("timm:resnet50", "a1_in1k") == "resnet50.a1_in1k"
    assert resolve_weights("timm:resnet10t") == "resnet10t.c3_in1k"  # timm's default tag
    assert resolve_weights("efficientnet_lite0") == "efficientnet-lite0-57934424.pth"  # the bundled file
    assert resolve_weights("torchvision:resnet50", "", pretrained=False) == "none"


@pytest.mark.parametrize("spec,weights,pretrained,option,words", [
    ("torchvision:resnet50", "IMAGENET1K_V3", True, "weights", "allowed: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"),
    ("torchvision:resnet18", "a1_in1k", True, "weights", "allowed: IMAGENET1K_V1, DEFAULT"),
    ("timm:resnet50", "in1k", True, "weights", "allowed: a1_in1k, a1h_in1k,"),
    ("efficientnet_lite0", "IMAGENET1K_V1", True, "weights", "its bundled file: got 'IMAGENET1K_V1', allowed: ''"),
    ("torchvision:resnet18", "IMAGENET1K_V1", False, "weights", "--pretrained false"),
    ("torchvision:resnet5", "", True, "model", "torchvision has no model 'resnet5'"),
])
def test_bad_weights_fail_in_one_line_before_anything_loads(spec, weights, pretrained, option, words):
    from rifle import config as C
    from rifle.commands import train
    argv = ["--model", spec, "--pretrained", str(pretrained).lower()] + (["--weights", weights] if weights else [])
    with pytest.raises(C.ConfigError) as err:
        train.parse(argv)
    assert err.value.option == option and words in str(err.value) and "\n" not in str(err.value)


def save_fake_imagenet_weights(torch_home, member, builder):
    """Random weights of the architecture where torchvision caches `member`'s file: loaded without a download."""
    torch.manual_seed(11)
    state = builder().state_dict()
    target = torch_home / "hub" / "checkpoints" / member.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return state


def test_chosen_torchvision_weights_load_from_the_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    saved = save_fake_imagenet_weights(tmp_path / "torch", torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                                       torchvision.models.resnet18)
    model = build_model("torchvision:resnet18", num_classes=4, weights="IMAGENET1K_V1")
    assert model.weights_resolved == "ResNet18_Weights.IMAGENET1K_V1"
    state = model.backbone.state_dict()
    assert set(state) == set(saved) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(state[k], saved[k]) for k in state)


@pytest.mark.slow
def test_a_run_trains_from_the_weights_it_names(tmp_path, digits_folder, monkeypatch):
    """--model torchvision:resnet18 --weights IMAGENET1K_V1: the backbone starts from that file (a cached one,
    random here: no download) and the run logs its full name as weights_resolved."""
    import torchvision
    from conftest import mlflow_runs
    from helpers import tiny_config

    from rifle import trainer
    from rifle.commands import train
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    saved = save_fake_imagenet_weights(tmp_path / "torch", torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                                       torchvision.models.resnet18)
    built, make_model = {}, trainer.make_model

    def watched(cfg, acc, num_classes, out):  # the backbone as built, before any training step
        raw, tricks = make_model(cfg, acc, num_classes, out)
        built.update({k: v.clone() for k, v in raw.backbone.state_dict().items()})
        return raw, tricks

    monkeypatch.setattr(trainer, "make_model", watched)
    cfg = tiny_config(tmp_path, digits_folder, tricks="none", epochs=1, model="torchvision:resnet18",
                      weights="IMAGENET1K_V1")
    assert train.parse(["--model", "torchvision:resnet18", "--weights", "IMAGENET1K_V1"]).model.weights == \
        "IMAGENET1K_V1"
    trainer.fit(cfg)
    _, (run,) = mlflow_runs(cfg.run.tracking_uri)
    assert run.data.params["weights_resolved"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert run.data.params["weights"] == "IMAGENET1K_V1"
    assert set(built) == set(saved) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(built[k], saved[k]) for k in built)
