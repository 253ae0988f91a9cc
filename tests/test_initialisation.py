"""Initial weights as the official code of each backbone, inserted modules included.

The official WRNs (FSR's WRN-34-10, CIFS's WRN-28-10) end their constructors with one loop: conv
N(0, sqrt(2 / (k*k*C_out))), BatchNorm 1 / 0, Linear bias 0; the official FSR VGG16 re-initialises
convs Kaiming-normal fan-out (the same std) with bias 0 and Linear N(0, 0.01) with bias 0; the
official ResNets keep PyTorch's defaults. Each check below is shown to fail on PyTorch's defaults.
"""

import math

import pytest
import torch
import torch.nn as nn

import cifs
import fsr
from models import build_model


def he_std(conv: nn.Conv2d) -> float:
    """sqrt(2 / (k_h * k_w * C_out)): the official WRN loop, and Kaiming-normal fan-out with ReLU gain."""
    return math.sqrt(2 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))


def looks_normal(weight: torch.Tensor, std: float) -> bool:
    """True when `weight` looks like i.i.d. N(0, std^2) draws: sample std and mean within 6 standard
    errors, and, for 10,000 values or more, a kurtosis near 3 (PyTorch's uniform default has 1.8)."""
    w = weight.detach().double().flatten()
    n = w.numel()
    if abs(w.std().item() / std - 1) > 6 / math.sqrt(2 * n) or abs(w.mean().item()) > 6 * std / math.sqrt(n):
        return False
    if n >= 10_000:
        centred = w - w.mean()
        kurtosis = (centred ** 4).mean() / (centred ** 2).mean() ** 2
        return abs(kurtosis.item() - 3) < 0.2  # 4 standard errors at n = 10,000
    return True


def pytorch_default(linear_or_conv: nn.Module) -> bool:
    """True when the weight looks like PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    w = linear_or_conv.weight.detach().double().flatten()
    bound = 1 / math.sqrt(linear_or_conv.weight[0].numel())
    return w.abs().max().item() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 6 / math.sqrt(2 * w.numel())


def of_type(module: nn.Module, kind) -> list:
    return [m for m in module.modules() if isinstance(m, kind)]


def assert_batchnorm_one_zero(module: nn.Module):
    for bn in of_type(module, nn.BatchNorm2d):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def assert_wrn_init(module: nn.Module):
    """The official WRN loop on `module`: convs N(0, he_std), BN 1/0, Linear bias 0, Linear weight default."""
    convs, linears = of_type(module, nn.Conv2d), of_type(module, nn.Linear)
    assert convs or linears
    for conv in convs:
        assert looks_normal(conv.weight, he_std(conv)), conv
    assert_batchnorm_one_zero(module)
    for linear in linears:
        assert torch.all(linear.bias == 0) and pytorch_default(linear), linear


def assert_vgg_init(module: nn.Module):
    """The official FSR VGG loop on `module`: convs Kaiming fan-out (bias 0), BN 1/0, Linear N(0, 0.01) (bias 0)."""
    convs, linears = of_type(module, nn.Conv2d), of_type(module, nn.Linear)
    assert convs and linears
    for conv in convs:
        assert looks_normal(conv.weight, he_std(conv)), conv
        assert conv.bias is None or torch.all(conv.bias == 0)
    assert_batchnorm_one_zero(module)
    for linear in linears:
        assert looks_normal(linear.weight, 0.01) and torch.all(linear.bias == 0), linear


# --- the checks can fail --------------------------------------------------------------------------

def test_the_checks_reject_pytorch_default_initialisation():
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(160, 160, 3), nn.Linear(512, 512)
    assert not looks_normal(conv.weight, he_std(conv))   # U(+-1/sqrt(fan_in)): std 0.015, not 0.037
    assert not looks_normal(linear.weight, 0.01)         # std 0.026, not 0.01
    assert pytorch_default(conv) and pytorch_default(linear)
    assert not torch.all(conv.bias == 0)
    # A uniform draw with the right std is still refused: its kurtosis is 1.8, not 3.
    uniform = torch.empty(160, 160, 3, 3).uniform_(-1, 1) * he_std(conv) * math.sqrt(3)
    assert not looks_normal(uniform, he_std(conv))
    with pytest.raises(AssertionError):
        assert_wrn_init(nn.Sequential(conv))
    with pytest.raises(AssertionError):
        assert_wrn_init(nn.Sequential(linear))  # a default Linear bias is not 0
    with pytest.raises(AssertionError):
        assert_vgg_init(nn.Sequential(conv, linear))


# --- backbones --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["wrn34_10", "wrn28_10"])
def test_wrn_backbones_initialise_as_the_official_wrns(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    assert len(of_type(model, nn.Conv2d)) == {"wrn34_10": 34, "wrn28_10": 28}[name]  # convs + 1x1 shortcuts
    assert_wrn_init(model)


def test_vgg16_initialises_as_the_official_fsr_vgg():
    torch.manual_seed(0)
    model = build_model("vgg16", 10)
    assert len(of_type(model, nn.Conv2d)) == 13 and len(of_type(model, nn.Linear)) == 3
    assert_vgg_init(model)


@pytest.mark.parametrize("name", ["resnet18", "resnet10", "smallcnn"])
def test_resnets_keep_pytorch_defaults_as_the_official_resnets(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    assert all(pytorch_default(m) for m in of_type(model, (nn.Conv2d, nn.Linear)))
    assert not torch.all(model.classifier.bias == 0)


# --- inserted modules ---------------------------------------------------------------------------

def fsr_module(model):
    net = fsr.build_network(fsr.resolve(fsr.Args(dataset="cifar10", model=model)))
    (module,) = net.inserted.values()
    return module


def test_fsr_in_the_wrn_is_covered_by_the_wrn_loop():
    torch.manual_seed(0)
    module = fsr_module("wrn34_10")  # S, R: 3 convs and 2 BN each; the head: Linear(640, 10)
    assert len(of_type(module, nn.Conv2d)) == 6 and module.head.in_features == 640
    assert_wrn_init(module)


def test_fsr_in_vgg16_is_covered_by_the_vgg_loop():
    torch.manual_seed(0)
    module = fsr_module("vgg16")
    assert len(of_type(module, nn.Conv2d)) == 6
    assert_vgg_init(module)


def test_fsr_in_resnet18_keeps_pytorch_defaults():
    torch.manual_seed(0)
    module = fsr_module("resnet18")
    assert all(pytorch_default(m) for m in of_type(module, (nn.Conv2d, nn.Linear)))
    assert not torch.all(module.head.bias == 0)


def test_cifs_probes_in_wrn28_10_are_covered_by_the_wrn_loop():
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar10", model="wrn28_10", positions="block3.3.branch,final",
                                                    probes="mlp,linear", hidden=240)))
    assert list(net.inserted) == ["block3_3_branch", "final"]
    linears = of_type(net.inserted, nn.Linear)
    assert [tuple(m.weight.shape) for m in linears] == [(240, 640), (10, 240), (10, 640)]
    assert_wrn_init(net.inserted)


def test_cifs_probes_in_resnet18_keep_pytorch_defaults():
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar10", positions="layer4.0,layer4.1", probes="mlp,linear")))
    linears = of_type(net.inserted, nn.Linear)
    assert len(linears) == 3 and all(pytorch_default(m) and not torch.all(m.bias == 0) for m in linears)
