"""Transfer learning: torchvision architectures, pretrained weights from a file (made here: no
download), frozen backbones and the backbone's LR multiplier, on real CIFAR-10 images."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from onecycle.config import ConfigError, ModelConfig, parse_params
from onecycle.training import checkpoint, init_weights
from onecycle.training.model import ResNet9, ResNetConfig, build, head_keys
from onecycle.training.runtime import select_device
from onecycle.training.session import build_session

from .conftest import TINY

CPU = select_device("cpu", 0)


def params_with(model: dict, **train):
    return parse_params(
        {**TINY, "model": model, "train": {**TINY["train"], "batch_size": 32, **train}}
    )


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """An ImageNet-shaped ResNet-18 state dict (1000 classes), as torchvision saves its weights."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-test.pth"
    torch.save(state, path)
    return path, state


def session_for(params, data, weights):
    return build_session(params.model, params.train, data, CPU, 0, momentum=0.9, weights=weights)


def one_step(session, lr=0.1, momentum=0.9):
    x, y = next(session.stream())
    session.step(x, y, lr, momentum)


@pytest.mark.parametrize(
    "arch, head",
    [
        ("resnet9", {"fc.weight", "fc.bias"}),
        ("resnet18", {"fc.weight", "fc.bias"}),
        ("mobilenet_v3_small", {"classifier.3.weight", "classifier.3.bias"}),
        ("efficientnet_b0", {"classifier.1.weight", "classifier.1.bias"}),
        ("regnet_x_400mf", {"fc.weight", "fc.bias"}),  # built for real: meta tensors fail there
    ],
)
def test_the_head_is_what_follows_the_number_of_classes(arch, head):
    assert head_keys(arch, 7, width=4) == head
    net = build(arch, 7, width=4)
    assert {
        k: tuple(v.shape)[0]
        for k, v in net.state_dict().items()
        if k.endswith("weight") and k in head
    } == {k: 7 for k in head if k.endswith("weight")}


def test_pretrained_weights_from_a_file_fill_the_backbone_and_the_head_is_sized_for_the_data(
    resnet18_file, tiny_data
):
    path, state = resnet18_file
    params = params_with({"arch": "resnet18", "pretrained": str(path)})
    weights = init_weights.load(params.model)
    assert weights.digest and weights.inputs.mean == init_weights.IMAGENET_MEAN
    data = weights.normalize(tiny_data)
    assert data.mean == init_weights.IMAGENET_MEAN and tiny_data.mean != data.mean
    session = session_for(params, data, weights)
    loaded = session.model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert loaded["fc.weight"].shape == (len(tiny_data.classes), 512)
    assert {g["name"] for g in session.optimizer.param_groups} == {"backbone", "head"}
    one_step(session)  # trains: the 32x32 images go through ResNet-18


def test_a_frozen_backbone_gets_no_gradient_and_stays_as_loaded(resnet18_file, tiny_data):
    path, state = resnet18_file
    params = params_with({"arch": "resnet18", "pretrained": str(path), "freeze": "backbone"})
    weights = init_weights.load(params.model)
    session = session_for(params, weights.normalize(tiny_data), weights)
    model = session.model
    head_before = model.fc.weight.detach().clone()
    session.model.train()
    one_step(session)
    one_step(session)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    for k, v in state.items():  # parameters and BatchNorm statistics alike
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), k
    assert not torch.equal(model.fc.weight, head_before)  # the classifier did learn
    assert model.bn1.training is False and model.fc.training is True
    assert [g["name"] for g in session.optimizer.param_groups] == ["head"]


def test_the_backbone_multiplier_scales_the_backbone_lr_in_every_step(resnet18_file, tiny_data):
    path, _ = resnet18_file
    params = params_with(
        {"arch": "resnet18", "pretrained": str(path), "backbone_lr_mult": 0.1},
        weight_decay=0.0,
        nesterov=False,
    )
    weights = init_weights.load(params.model)
    session = session_for(params, weights.normalize(tiny_data), weights)
    conv, fc = session.model.conv1.weight, session.model.fc.weight
    before = conv.detach().clone(), fc.detach().clone()
    one_step(session, lr=0.05, momentum=0.0)  # plain SGD: the update is lr x grad
    lrs = {g["name"]: g["lr"] for g in session.optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 0.005, "head": 0.05})
    assert torch.allclose(before[0] - conv.detach(), 0.005 * conv.grad, atol=1e-7)
    assert torch.allclose(before[1] - fc.detach(), 0.05 * fc.grad, atol=1e-7)


def test_a_checkpoint_of_this_pipeline_starts_another_dataset_with_its_normalization(
    tmp_path, tiny_data
):
    source = build("resnet9", 6, width=4)
    inputs = {"image_size": 32, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    path = tmp_path / "animals.pt"
    src_cfg = parse_params({"model": {"width": 4}}).model
    checkpoint.save_weights(source, src_cfg, [f"c{i}" for i in range(6)], path, inputs)

    params = params_with({"width": 4, "pretrained": str(path)})
    weights = init_weights.load(params.model)
    assert weights.inputs.mean == (0.1, 0.2, 0.3) and "6 classes" in weights.inputs.source
    data = weights.normalize(tiny_data)
    session = session_for(params, data, weights)
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(session.model.state_dict()[k], v), k
    assert session.model.fc.weight.shape[0] == len(tiny_data.classes) == 10
    record = weights.record(data)
    assert record["normalization"].startswith("checkpoint animals.pt") and record["mean"] == [
        0.1,
        0.2,
        0.3,
    ]
    assert weights.warning(data) is None
    at_64 = init_weights.InitialWeights(None, init_weights.Inputs((0,), (1,), "x", 64), "w")
    assert "data.image_size: 64" in at_64.warning(data)

    wider = params_with({"width": 8, "pretrained": str(path)})
    with pytest.raises(init_weights.PretrainedError, match="width: 4 there, 8 here"):
        init_weights.load(wider.model)


def test_weights_of_another_architecture_stop_with_the_keys_listed(resnet18_file, tiny_data):
    path, _ = resnet18_file
    params = params_with({"arch": "resnet34", "pretrained": str(path)})
    weights = init_weights.load(params.model)
    with pytest.raises(init_weights.PretrainedError) as err:
        session_for(params, weights.normalize(tiny_data), weights)
    message = str(err.value)
    assert "missing" in message and "layer1.2.bn1.weight" in message and str(path) in message


def test_a_missing_or_foreign_weights_file_is_refused_by_name(tmp_path):
    missing = params_with({"arch": "resnet18", "pretrained": str(tmp_path / "nope.pt")})
    with pytest.raises(init_weights.PretrainedError, match="nope.pt not found"):
        init_weights.load(missing.model)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(init_weights.PretrainedError, match="junk.pt holds a list"):
        init_weights.load(params_with({"arch": "resnet18", "pretrained": str(junk)}).model)


def test_weights_holding_nan_are_refused_at_load_not_blamed_on_the_max_lr(tmp_path):
    """An all-NaN weights file used to train into a NaN loss that named train.max_lr."""
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in ResNet9(ResNetConfig(width=4)).state_dict().items()}  # fmt: skip
    floats = sum(v.is_floating_point() for v in state.values())
    bare, ours = tmp_path / "nan.pth", tmp_path / "model.pt"
    torch.save(state, bare)
    with pytest.raises(init_weights.PretrainedError) as err:
        init_weights.load(params_with({"pretrained": str(bare)}).model)
    assert f"holds weights that are NaN or infinite ({floats} of {floats} tensors, e.g." in str(
        err.value
    )
    classes = [f"c{i}" for i in range(10)]
    checkpoint.save_weights(ResNet9(ResNetConfig(width=4)), ModelConfig(width=4), classes, ours)
    ckpt = torch.load(ours, weights_only=True)
    ckpt["model"]["fc.bias"][0] = float("inf")
    torch.save(ckpt, ours)
    with pytest.raises(checkpoint.CheckpointError, match=r"\(1 of \d+ tensors, e.g. fc.bias\)"):
        checkpoint.read_weights(ours)
    with pytest.raises(init_weights.PretrainedError, match="e.g. fc.bias"):
        init_weights.load(params_with({"pretrained": str(ours)}).model)


def test_default_weights_offline_name_the_file_to_put_in_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # offline here whether or not the machine is (torchvision imports the function by name)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    params = params_with({"arch": "resnet18", "pretrained": "default"})
    where = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(init_weights.PretrainedError) as err:
        init_weights.load(params.model)
    assert str(where) in str(err.value) and "ResNet18_Weights.IMAGENET1K_V1" in str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)

    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(b"not the weights")  # a file put there by hand is checked too
    with pytest.raises(init_weights.PretrainedError, match="does not match torchvision's hash"):
        init_weights.load(params.model)


@pytest.mark.parametrize(
    "model, key, says",
    [
        ({"arch": "resnet81"}, "model.arch", "did you mean resnet18"),
        ({"pretrained": "default"}, "model.pretrained", "resnet9 has no published weights"),
        ({"freeze": "backbone"}, "model.freeze", "needs pretrained weights"),
        ({"backbone_lr_mult": 0}, "model.backbone_lr_mult", "greater than 0"),
    ],
)
def test_transfer_params_are_checked_with_the_key_named(model, key, says):
    with pytest.raises(ConfigError, match=f"(?s){key}.*{says}"):
        parse_params({"model": model})


def test_a_trained_torchvision_checkpoint_loads_back_for_evaluate_and_predict(tmp_path, tiny_data):
    from onecycle.commands.predict import load_checkpoint_model

    params = params_with({"arch": "mobilenet_v3_small"})
    session = session_for(params, tiny_data, init_weights.RANDOM)
    one_step(session)
    path = tmp_path / "model.pt"
    inputs = checkpoint.inputs_of(tiny_data)
    checkpoint.save_weights(session.model, params.model, tiny_data.classes, path, inputs)
    model, got = checkpoint.load_trained(path, params.model, tiny_data.classes, CPU)
    assert got == inputs and type(model).__name__ == "MobileNetV3"
    probs = load_checkpoint_model(path).probabilities(tiny_data.x_test[:3])
    assert probs.shape == (3, 10)
    with pytest.raises(checkpoint.CheckpointError, match="arch: checkpoint 'mobilenet_v3_small'"):
        checkpoint.load_trained(
            path, params_with({"arch": "resnet18"}).model, tiny_data.classes, CPU
        )
