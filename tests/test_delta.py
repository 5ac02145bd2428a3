"""DELTA against its reference: the authors' code (github.com/lixingjian/DELTA: train.py's `reg_att_fea_map`
and channel weights, channel_eval.py's `train_classifier` and `feature_weight`), transliterated below and run
side by side with rifle.tricks.delta on tiny ResNet-like networks (torchvision's own blocks, a few channels,
32 px); then the channel-attention cache, at the trick and through the trainer."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock, Bottleneck

from rifle import config as C
from rifle import probes
from rifle.models import Classifier
from rifle.tricks import build_tricks
from rifle.tricks import delta as D
from rifle.tricks.base import FitContext

NUM_CLASSES = 5


# ---------------------------------------------------------------- the reference, transliterated

def ref_channel_weights(filter_weight):
    """train.py: per layer js = (js - mean) / np.std(js); softmax(js / 5) in float32."""
    out = []
    for js in filter_weight:
        js = np.array(js)
        js = (js - np.mean(js)) / np.std(js)
        out.append(F.softmax(torch.from_numpy(js).float() / 5, dim=0))
    return out


def ref_reg_att_fea_map(layer_outputs_source, layer_outputs_target, channel_weights):
    """train.py's reg_att_fea_map, on feature maps captured by forward hooks."""
    fea_loss = torch.tensor(0.)
    for i, (fm_src, fm_tgt) in enumerate(zip(layer_outputs_source, layer_outputs_target)):
        b, c, h, w = fm_src.shape
        fm_src = fm_src.reshape(b, c, h * w)
        fm_tgt = fm_tgt.reshape(b, c, h * w)
        distance = torch.norm(fm_tgt - fm_src.detach(), 2, 2)
        distance = c * torch.mul(channel_weights[i], distance ** 2) / (h * w)
        fea_loss += 0.5 * torch.sum(distance)
    return fea_loss


def ref_reg_classifier(fc):
    """train.py's reg_classifier: sum of 1/2 ||param||^2 over the new classifier."""
    return sum(0.5 * torch.norm(p) ** 2 for p in fc.parameters())


def ref_train_classifier(fc, feature_batches, lr, num_epochs=10, decay_epochs=6):
    """channel_eval.py's train_classifier on fixed features: SGD(lr, momentum 0.9, weight_decay 1e-4),
    ExponentialLR(exp(log(0.1) / decay_epochs)) stepped at each epoch's start, which in the PyTorch 0.4 the
    code was written for gives epoch e the rate lr * gamma^e."""
    optimizer = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    gamma = math.exp(math.log(0.1) / decay_epochs)
    for epoch in range(num_epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * gamma ** epoch
        for inputs, labels in feature_batches:
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(fc(inputs), labels)
            loss.backward()
            optimizer.step()
    return fc


class RefModel(nn.Module):
    """The authors' model: the network with its `fc` (here the classifier fitted on the frozen features)."""

    def __init__(self, backbone, fc):
        super().__init__()
        self.backbone, self.fc = backbone, fc

    def forward(self, x):
        return self.fc(self.backbone(x))


def ref_feature_weight(model, hook_layers, batches):
    """channel_eval.py's feature_weight: zero filter j of each hooked conv in the state dict, the loss rise,
    a running mean over the batches."""
    filter_weight = []
    for i in range(len(hook_layers)):
        channel = model.state_dict()[hook_layers[i] + '.weight'].shape[0]
        filter_weight.append([0] * channel)
    criterion = nn.CrossEntropyLoss()
    model.eval()
    with torch.no_grad():
        for i, (inputs, labels) in enumerate(batches):
            outputs = model(inputs)
            loss0 = criterion(outputs, labels)
            for name, module in model.named_modules():
                if name not in hook_layers:
                    continue
                layer_id = hook_layers.index(name)
                channel = model.state_dict()[name + '.weight'].shape[0]
                for j in range(channel):
                    tmp = model.state_dict()[name + '.weight'][j, :, :, :].clone()
                    model.state_dict()[name + '.weight'][j, :, :, :] = 0
                    outputs = model(inputs)
                    loss1 = criterion(outputs, labels)
                    diff = (loss1 - loss0).detach().cpu().numpy().item()
                    hist = filter_weight[layer_id][j]
                    filter_weight[layer_id][j] = 1.0 * (i * hist + diff) / (i + 1)
                    model.state_dict()[name + '.weight'][j, :, :, :] = tmp
    return filter_weight


# ---------------------------------------------------------------- tiny networks

class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..layer4 of torchvision's BasicBlock or Bottleneck,
    pooled features) at a few channels per stage."""

    def __init__(self, block, planes=(4, 5, 6, 8), depth=(2, 2, 3, 2)):
        super().__init__()
        self.inplanes = 4
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        for i, (p, d) in enumerate(zip(planes, depth)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, p, d, stride=1 if i == 0 else 2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.width = self.inplanes

    def _make_layer(self, block, planes, blocks, stride):
        out = planes * block.expansion
        down = None
        if stride != 1 or self.inplanes != out:
            down = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = out
        layers += [block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.pool(x)


class BiasedConvNet(nn.Module):
    """Convolutions with biases (a removed filter leaves its bias), no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.width = 8

    def forward(self, x):
        return self.pool(self.stage(self.stem(x)))


def pretrained_net(kind="bottleneck", seed=0) -> nn.Module:
    """A 'pretrained' network: random weights and BatchNorm statistics far from a fresh batch's, so that
    evaluation mode (running statistics) and training mode (batch statistics) differ."""
    torch.manual_seed(seed)
    net = {"bottleneck": lambda: TinyResNet(Bottleneck), "basic": lambda: TinyResNet(BasicBlock),
           "biased": BiasedConvNet}[kind]()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return net.eval()


def images(n=6, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def labels(n=6, seed=2):
    return torch.randint(NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def make_context(model, cfg, source_fn, loader, fingerprint=""):
    from rifle.models import param_groups
    opt = torch.optim.SGD(param_groups(model), lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    return FitContext(model, opt, None, NUM_CLASSES, probes.snapshot(model.backbone), source_fn, loader,
                      data_fingerprint=fingerprint)


def capture(module, names):
    out = []
    handles = [module.get_submodule(n).register_forward_hook(lambda m, a, o: out.append(o)) for n in names]
    return out, handles


# ---------------------------------------------------------------- layers

def test_default_layers_are_the_authors_for_resnets():
    import timm
    import torchvision
    assert D.default_layers(torchvision.models.resnet50(weights=None)) == [
        "layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"]  # train.py, resnet50
    assert D.default_layers(torchvision.models.resnet101(weights=None)) == [
        "layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3", "layer4.2.conv3"]  # train.py, resnet101
    assert D.default_layers(torchvision.models.resnet18(weights=None)) == [
        "layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]
    assert D.default_layers(TinyResNet(Bottleneck)) == ["layer1.1.conv3", "layer2.1.conv3", "layer3.2.conv3",
                                                        "layer4.1.conv3"]
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    assert D.default_layers(lite0) == ["blocks.1.1.conv_pwl", "blocks.2.1.conv_pwl", "blocks.4.2.conv_pwl",
                                       "blocks.6.0.conv_pwl"]
    assert D.default_layers(timm.create_model("convnext_atto", pretrained=False, num_classes=0)) == [
        "stages.0", "stages.1", "stages.2", "stages.3"]  # no projection conv: the stage outputs
    with pytest.raises(C.ConfigError, match="delta_layers"):
        D.default_layers(BiasedConvNet())


# ---------------------------------------------------------------- parity with the reference

@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("moved", [0.0, 0.05])  # at the starting point; after the weights moved
def test_penalty_matches_the_reference(kind, moved):
    pre = pretrained_net(kind)
    cfg = C.build({"tricks": "delta", "delta_alpha": "0.01", "delta_beta": "0.01"})
    model = Classifier(copy.deepcopy(pre), pre.width, NUM_CLASSES)
    (trick,) = build_tricks(cfg)
    trick.prepare_model(model)
    layers = trick.layers
    assert layers == D.default_layers(pre) and all(n.endswith("conv3" if kind == "bottleneck" else "conv2")
                                                   for n in layers)
    trick.on_fit_start(make_context(model, cfg, lambda: copy.deepcopy(pre), [(images(), labels())]))
    torch.manual_seed(5)
    with torch.no_grad():  # as after some fine-tuning steps
        for p in model.parameters():
            p.add_(moved * torch.randn_like(p))
    rng = np.random.default_rng(0)
    widths = [pre.get_submodule(n).out_channels for n in layers]
    filter_weight = [rng.normal(0.01, 0.02, w).tolist() for w in widths]
    weights = ref_channel_weights(filter_weight)
    trick.load_state_dict({"layers": layers, "attention": [w.tolist() for w in weights]})

    x = images()
    model.train()
    targets, handles = capture(model.backbone, layers)
    model(x)
    ours = trick.penalty(model, x)
    for h in handles:
        h.remove()
    source = copy.deepcopy(pre).eval()  # train.py: model_source.eval(), frozen
    sources, _ = capture(source, layers)
    with torch.no_grad():
        source(x)
    ref = (0.01 * ref_reg_att_fea_map(sources, targets, weights) + 0.01 * ref_reg_classifier(model.head)).detach()
    assert float(ref) > 0.0
    assert float(ours.detach()) == pytest.approx(float(ref), rel=1e-5)
    # and not the batch-statistics source of the previous implementation: that one is 0 at the start
    assert not any(m.training for m in trick.source.modules())


@pytest.mark.parametrize("kind", ["bottleneck", "basic", "biased"])
def test_channel_evaluation_and_attention_match_the_reference(kind):
    pre = pretrained_net(kind).double()
    layers = ["stem.0", "stage.0"] if kind == "biased" else D.default_layers(pre)
    torch.manual_seed(3)
    probe = nn.Linear(pre.width, NUM_CLASSES).double()
    batches = [(images(4, seed=10 + i, size=16).double(), labels(4, seed=20 + i)) for i in range(3)]
    ours = D.measure_loss_increase(pre, probe, layers, batches)
    ref = ref_feature_weight(RefModel(copy.deepcopy(pre), copy.deepcopy(probe)), [f"backbone.{n}" for n in layers],
                             batches)
    for o, r in zip(ours, ref, strict=True):
        assert torch.allclose(o, torch.tensor(r, dtype=torch.float64), rtol=1e-9, atol=1e-12)
        assert o.abs().max() > 0
    for o, w in zip(ours, ref_channel_weights(ref), strict=True):
        assert torch.allclose(D.channel_attention(o), w, rtol=1e-5, atol=0)


def test_channel_evaluation_in_float32_agrees_with_one_forward_per_channel():
    pre = pretrained_net("bottleneck")
    torch.manual_seed(3)
    probe = nn.Linear(pre.width, NUM_CLASSES)
    layers = D.default_layers(pre) + ["layer2"]  # in residual blocks, and a stage output
    batches = [(images(5, seed=7), labels(5, seed=8))]
    ours = D.measure_loss_increase(pre, probe, layers, batches)
    ref = ref_feature_weight(RefModel(copy.deepcopy(pre), copy.deepcopy(probe)),
                             [f"backbone.{n}" for n in layers[:-1]], batches)
    for o, r in zip(ours, ref):
        assert torch.allclose(o, torch.tensor(r, dtype=torch.float64), atol=2e-6)
    with torch.no_grad():  # the stage output: channel j zeroed there
        base = F.cross_entropy(probe(pre(batches[0][0])), batches[0][1])
        stage = pre.get_submodule("layer2")
        for j in (0, 7, 15):
            h = stage.register_forward_hook(lambda m, a, o, j=j: o.index_fill(1, torch.tensor([j]), 0.0))
            rise = F.cross_entropy(probe(pre(batches[0][0])), batches[0][1]) - base
            h.remove()
            assert float(ours[-1][j]) == pytest.approx(float(rise), abs=2e-6)


def test_attention_classifier_is_trained_as_the_reference():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(NUM_CLASSES, (8,), generator=g)) for _ in range(3)]
    ours = D.fit_classifier(lambda: iter(batches), 6, NUM_CLASSES, epochs=10, lr=0.05, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fc = nn.Linear(6, NUM_CLASSES)  # the same initial classifier
    ref = ref_train_classifier(fc, batches, lr=0.05)
    assert torch.allclose(ours.weight, ref.weight, atol=1e-6) and torch.allclose(ours.bias, ref.bias, atol=1e-6)
    assert not torch.equal(ours.weight, nn.Linear(6, NUM_CLASSES).weight)


# ---------------------------------------------------------------- the cache

def loader(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(NUM_CLASSES, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True)


def started_trick(values, tmp_path, pre=None, fingerprint="fp-0", data=None):
    pre = pre if pre is not None else pretrained_net("basic")
    cfg = C.build({"tricks": "delta", "delta_attention_epochs": "2", "delta_attention_batches": "2",
                   "batch_size": "8", "delta_cache_dir": str(tmp_path / "cache")} | values)
    model = Classifier(copy.deepcopy(pre), pre.width, NUM_CLASSES)
    (trick,) = build_tricks(cfg)
    trick.prepare_model(model)
    trick.on_fit_start(make_context(model, cfg, lambda: copy.deepcopy(pre), data or loader(), fingerprint))
    return trick


def test_attention_is_cached_reused_and_missed_when_an_input_changes(tmp_path, monkeypatch):
    calls = []
    measure = D.Delta.measure

    def counted(self):
        calls.append(self.options)
        return measure(self)
    monkeypatch.setattr(D.Delta, "measure", counted)

    first = started_trick({}, tmp_path)
    rng = torch.get_rng_state()
    first.on_epoch_start(0)
    assert torch.equal(rng, torch.get_rng_state())  # training randomness does not depend on a cache hit
    assert len(calls) == 1 and first.cache_hit is False and first.cache_file.is_file()
    assert not [p for p in first.cache_file.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    stored = json.loads(first.cache_file.read_text())
    assert stored["key"]["layers"] == first.layers and stored["key"]["data_fingerprint"] == "fp-0"
    assert stored["attention"] == first.attention
    assert [len(a) for a in first.attention] == [first.source.get_submodule(n).out_channels for n in first.layers]
    assert all(sum(a) == pytest.approx(1.0) for a in first.attention)
    assert json.loads(first.artifacts()[D.ARTIFACT])["cache_hit"] is False

    assert stored["key"]["torch"] == torch.__version__ and stored["key"]["device"]  # the CPU's model name here
    assert stored["key"]["delta_attention_batch_size"] == 32  # the authors' measurement batch, not training's

    # Another training seed, learning rate, alpha and training batch: the same measurement, no attention pass.
    again = started_trick({"seed": "7", "lr": "0.05", "delta_alpha": "0.1", "batch_size": "16"}, tmp_path)
    again.on_epoch_start(0)
    assert len(calls) == 1 and again.cache_hit is True and again.attention == first.attention
    assert json.loads(again.artifacts()[D.ARTIFACT])["cache_hit"] is True

    # Each input the attention depends on misses the cache (measured by a stand-in from here: the lookup is tested).
    monkeypatch.setattr(D.Delta, "measure", lambda self: calls.append(None) or [
        torch.zeros(self.source.get_submodule(n).out_channels, dtype=torch.float64) for n in self.layers])
    other_weights, environment = pretrained_net("basic", seed=1), D.environment
    for values, kw in [({"split_seed": "1"}, {}), ({"delta_attention_epochs": "3"}, {}),
                       ({"delta_attention_lr": "0.02"}, {}), ({"delta_layers": "layer3.1.conv2,layer4.1.conv2"}, {}),
                       ({"image_size": "48"}, {}), ({}, {"fingerprint": "fp-1"}), ({}, {"pre": other_weights}),
                       ({"num_workers": "1"}, {}), ({"delta_attention_batch_size": "16"}, {}), ({}, {"torch": "9.9"})]:
        monkeypatch.setattr(D, "environment", lambda device, v=kw.pop("torch", None): (
            environment(device) | ({"env.torch": v} if v else {})))
        before = len(calls)
        miss = started_trick(values, tmp_path, **kw)
        miss.on_epoch_start(0)
        assert len(calls) == before + 1 and miss.cache_hit is False, (values, kw)
        assert miss.cache_file != first.cache_file

    # A corrupt entry is measured again and rewritten.
    monkeypatch.setattr(D, "environment", environment)
    monkeypatch.setattr(D.Delta, "measure", counted)
    first.cache_file.write_text("{not json")
    redo = started_trick({}, tmp_path)
    redo.on_epoch_start(0)
    assert redo.cache_hit is False and redo.attention == first.attention  # the measurement is deterministic
    assert json.loads(first.cache_file.read_text())["attention"] == first.attention


def test_without_a_dataset_fingerprint_nothing_is_cached(tmp_path):
    trick = started_trick({}, tmp_path, fingerprint="")
    trick.on_epoch_start(0)
    assert trick.cache_file is None and trick.cache_hit is None and not (tmp_path / "cache").exists()
    assert len(trick.attention) == 4


def test_resumed_trick_needs_neither_cache_nor_measurement(tmp_path, monkeypatch):
    first = started_trick({}, tmp_path)
    first.on_epoch_start(0)
    state = json.loads(json.dumps(first.state_dict()))
    monkeypatch.setattr(D.Delta, "measure", lambda self: pytest.fail("measured again"))
    first.cache_file.unlink()
    resumed = started_trick({}, tmp_path)
    resumed.load_state_dict(state)
    resumed.on_epoch_start(1)
    assert resumed.attention == first.attention
    assert json.loads(resumed.artifacts()[D.ARTIFACT])["loss_increase"] == first.record["loss_increase"]


@pytest.mark.slow
def test_trainer_logs_the_attention_and_a_second_run_reuses_it(tmp_path, monkeypatch):
    """Two runs through the trainer (digits, the bundled EfficientNet-Lite0 at 48 px): the first measures and
    caches, the second (another training seed) only reads; both log the attention as an MLflow artifact."""
    import mlflow

    from rifle.trainer import fit
    calls = []
    measure = D.Delta.measure
    monkeypatch.setattr(D.Delta, "measure", lambda self: calls.append(1) or measure(self))
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = {"image_size": "48", "train_per_class": "2", "batch_size": "16", "val_fraction": "0.1", "epochs": "1",
            "tricks": "delta", "delta_attention_epochs": "1", "delta_attention_batches": "1",
            "delta_layers": "blocks.5.3.conv_pwl,blocks.6.0.conv_pwl", "delta_cache_dir": str(tmp_path / "cache"),
            "tracking_uri": uri, "log_weights": "false"}
    runs = [fit(C.build(base | {"seed": str(seed), "output_dir": str(tmp_path / f"run{seed}")})) for seed in (0, 1)]
    assert len(calls) == 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    logged = [json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=r["run_id"], artifact_path=D.ARTIFACT, dst_path=str(tmp_path / r["run_id"]), tracking_uri=uri)).read())
        for r in runs]
    assert [x["cache_hit"] for x in logged] == [False, True]
    assert logged[0]["attention"] == logged[1]["attention"]
    assert [len(a) for a in logged[0]["attention"]] == [192, 320]
