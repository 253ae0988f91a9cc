"""Backbones and the insertion mechanism of models.py."""

import pytest
import torch
import torch.nn as nn

from benchmarks.speed import count_flops
from models import MODELS, WideResNet, build_model, count_parameters


# --- sizes against the papers ----------------------------------------------------------------

@pytest.mark.parametrize("name, millions", [("resnet18", 11.17), ("vgg16", 15.25)])
def test_parameter_counts_match_fsr_table7(name, millions):
    assert round(count_parameters(build_model(name, 10)) / 1e6, 2) == millions


@pytest.mark.parametrize("name, exact", [
    ("wrn34_10", 46_160_474), ("wrn28_10", 36_479_194), ("resnet50", 23_520_842)])
def test_parameter_counts_match_the_usual_cifar_implementations(name, exact):
    # Counts of the TRADES WRN and the widely used CIFAR ResNet-50 (not given in either paper).
    assert count_parameters(build_model(name, 10)) == exact


@pytest.mark.parametrize("name, gflops", [("resnet18", 1.1133), ("vgg16", 0.6299)])
def test_forward_flops_match_fsr_table7(name, gflops):
    # FSR Table 7 counts a few elementwise ops too; convs and matmuls agree to within 1 %.
    assert count_flops(build_model(name, 10), (3, 32, 32)) / 1e9 == pytest.approx(gflops, rel=0.01)


def test_count_flops_leaves_the_model_untouched():
    model = build_model("smallcnn", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, (3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- shapes and names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, classes", [
    ("resnet18", (3, 32, 32), 10), ("resnet18", (3, 64, 64), 200), ("resnet10", (1, 28, 28), 10),
    ("vgg16", (3, 32, 32), 100), ("vgg16", (3, 64, 64), 200), ("smallcnn", (1, 28, 28), 10)])
def test_backbones_return_logits_and_empty_emits(name, shape, classes):
    model = build_model(name, classes, shape).eval()
    logits, emitted = model(torch.rand(2, *shape))
    assert logits.shape == (2, classes) and emitted == []


def test_resnet10_takes_one_channel_and_has_the_cifs_feature_shapes():
    model = build_model("resnet10", 10, (1, 28, 28))
    assert model.stem[0].in_channels == 1
    assert model.feature_shapes["layer3"] == (256, 7, 7)  # CIFS P2 on Fashion-MNIST (official ResNet10_3_4)
    assert model.feature_shapes["layer4"] == (512, 4, 4)  # CIFS P1


def test_insertion_points_of_both_papers_have_the_documented_shapes():
    assert build_model("resnet18").feature_shapes["layer4"] == (512, 4, 4)      # FSR
    assert build_model("resnet18").feature_shapes["layer4.0"] == (512, 4, 4)    # CIFS P2
    assert build_model("vgg16").feature_shapes["stage4"] == (512, 4, 4)         # FSR, before pool4
    wrn = WideResNet(10, 2)  # small WRN with the same layout as 28-10 / 34-10
    assert wrn.feature_shapes["final"] == (128, 8, 8)
    assert wrn.feature_shapes["block3.0.branch"] == (64, 16, 16)  # the block's input


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="known models: .*resnet18"):
        build_model("resnet19")
    assert "smallcnn" in MODELS


# --- insertion --------------------------------------------------------------------------------

class Scale(nn.Module):
    """Multiplies the feature by a constant and emits (a tag, the input it saw)."""

    def __init__(self, factor, tag):
        super().__init__()
        self.factor, self.tag = factor, tag

    def forward(self, feature, labels=None):
        return feature * self.factor, (self.tag, feature)


def test_inserted_module_replaces_the_feature_and_emits_in_forward_order():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.rand(2, 3, 32, 32)
    plain, _ = model(x)
    model.insert("layer4.1", Scale(1.0, "second"))
    model.insert("layer4.0", Scale(1.0, "first"))
    same, emitted = model(x)
    assert torch.allclose(same, plain, atol=1e-5)
    assert [tag for tag, _ in emitted] == ["first", "second"]
    assert emitted[1][1].shape == (2, 512, 4, 4)
    model.inserted["layer4_1"].factor = 0.0  # zeroing the final feature leaves only the bias
    zeroed, _ = model(x)
    assert torch.allclose(zeroed, model.classifier.bias.expand(2, -1))


def test_stage_alias_resolves_to_its_last_unit_and_positions_are_checked():
    model = build_model("resnet18")
    model.insert("layer4", Scale(1.0, "a"))
    assert list(model.inserted.keys()) == ["layer4_1"]
    with pytest.raises(ValueError, match="already inserted"):
        model.insert("layer4.1", Scale(1.0, "b"))
    with pytest.raises(ValueError, match="unknown position 'layer5'.*layer4.0"):
        model.insert("layer5", Scale(1.0, "c"))


def test_inserted_parameters_are_part_of_the_model():
    model = build_model("smallcnn")
    before = count_parameters(model)
    model.insert("conv2", nn.Sequential())  # no parameters
    head = nn.Linear(64, 10)
    model.inserted["extra"] = head
    assert count_parameters(model) == before + 64 * 10 + 10
    assert any(k.startswith("inserted.extra") for k in model.state_dict())


def test_wrn_branch_position_masks_the_branch_only():
    torch.manual_seed(0)
    model = WideResNet(16, 1).eval()  # two blocks per group: block3.1 is an identity block
    model.insert("block3.1.branch", Scale(0.0, "p2"))
    seen = {}
    model.block3[0].register_forward_hook(lambda module, inputs, output: seen.setdefault("x", output))
    _, emitted = model(torch.rand(2, 3, 32, 32))
    block, x = model.block3[1], seen["x"]
    # The module saw the pre-activated branch input relu(bn1(x)) ...
    assert emitted[0][0] == "p2"
    assert torch.allclose(emitted[0][1], torch.relu(block.bn1(x)))
    # ... and with the branch input zeroed the identity shortcut still adds the UNMASKED x.
    zero_branch = block.conv2(torch.relu(block.bn2(block.conv1(torch.zeros_like(x)))))
    out, _ = block(x, branch_module=model.inserted["block3_1_branch"])
    assert torch.allclose(out, x + zero_branch, atol=1e-6)


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.rand(2, 3, 32, 32)
    reference, _ = model(x)
    fast, _ = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(reference, fast, atol=1e-4)
