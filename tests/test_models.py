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
