"""cifs.py as a training script: per-dataset defaults, where the CIFS
modules go, the losses of every strategy by hand, the training attack, the training step, short
learning runs on synthetic data, warm start, resume, errors and the command line.

The module itself (relevance, masks, labels mechanism, cifs_loss) is tested in test_cifs_module.py.
Everything runs on the CPU: smallcnn on 3x16x16 synthetic images.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cifs
import data
import models
import run_support

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NO_AUTOCAST = contextlib.nullcontext  # training_step's `autocast` factory on the CPU


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is about as fast, and two threads slow down by an order of magnitude
    when another process shares the 2-core machine (oversubscribed OpenMP)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_args(runs_dir, **overrides) -> cifs.Args:
    """A tiny synthetic CPU run; override what a test is about."""
    settings = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=200, val_size=40,
                    batch_size=32, epochs=1, attack_steps=2, eval_steps=2, eval_every=1, device="cpu",
                    log_interval=1e9, runs_dir=str(runs_dir), monitor_size=0)
    settings.update(overrides)
    return cifs.Args(**settings)


def quiet(*_args):
    pass


def ce(logits, y):
    """Per-example cross-entropy by hand: logsumexp - true logit."""
    return torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)


def softmax(logits):
    return torch.exp(logits - torch.logsumexp(logits, 1, keepdim=True))


def cifs_modules(net):
    return [m for m in net.modules() if isinstance(m, cifs.CIFS)]


# The module's mechanics at two positions, as the paper's backbones have them (smallcnn's own default is
# conv3 alone at scale 128: test_the_cpu_scale_network_has_defaults_that_train).
TWO_POSITIONS = dict(positions="conv2,conv3", probes="mlp,linear", softmax_scale=1.0)


def synthetic_net(**overrides):
    torch.manual_seed(0)
    settings = {**TWO_POSITIONS, **overrides}
    return cifs.build_network(cifs.resolve(cifs.Args(dataset="synthetic", synthetic_shape="3,16,16", **settings)))


def synthetic_batch(n=16, seed=0):
    split = data.make_synthetic(10, (3, 16, 16), n, seed=seed, train=True)
    return split.images.float() / 255, split.labels


# =============================================================================================
# 1. Defaults per dataset (CIFS appendices B-D)
# =============================================================================================


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_defaults(dataset):
    a = cifs.resolve(cifs.Args(dataset=dataset))
    assert a.model == "resnet18"
    assert a.epochs == 120 and a.lr == 0.1 and a.weight_decay == 2e-4 and a.milestones == "75,90"
    assert a.momentum == 0.9 and a.batch_size == 128
    assert a.epsilon == pytest.approx(8 / 255)
    assert a.attack_steps == 10 and a.attack_step_size == pytest.approx(8 / 255 / 4)
    assert a.positions == "layer4.0,layer4.1" and a.probes == "mlp,linear" and a.hidden == 128
    assert a.augment == "crop_flip"
    assert a.beta == 2.0 and a.mask_fn == "softmax" and a.top_k == 2
    assert a.softmax_scale == 2.0  # the ResNet-18 models behind the published tables multiply the softmax by 2
    assert a.official_scale is False and a.init_from is None and a.no_cifs is False
    assert a.val_size == 0 and a.amp is False and a.random_start is True and a.fat_omega == 0.001


def test_fmnist_defaults():
    a = cifs.resolve(cifs.Args(dataset="fmnist"))
    assert a.model == "resnet10" and a.epochs == 120 and a.lr == 0.1 and a.weight_decay == 2e-4
    assert a.epsilon == pytest.approx(0.3)
    assert a.attack_steps == 20 and a.attack_step_size == pytest.approx(0.02)
    assert a.milestones == "45,75,90"
    assert a.positions == "layer3,layer4" and a.probes == "mlp,linear" and a.hidden == 128
    assert a.augment == "none" and a.softmax_scale == 2.0  # ResNet-10: the paper-era factor 2


def test_svhn_defaults():
    a = cifs.resolve(cifs.Args(dataset="svhn"))
    assert a.model == "resnet18" and a.weight_decay == 5e-4 and a.lr == 0.01
    assert a.epochs == 120 and a.milestones == "75,90"
    assert a.attack_steps == 10 and a.attack_step_size == pytest.approx(8 / 255 / 4)  # CIFS: eps/4
    assert a.augment == "none"  # a decision of ours, as FSR's train.py
    assert a.positions == "layer4.0,layer4.1"


def test_wrn28_10_defaults():
    a = cifs.resolve(cifs.Args(dataset="cifar10", model="wrn28_10"))
    assert a.epochs == 110 and a.weight_decay == 5e-4 and a.hidden == 240
    assert a.positions == "block3.3.branch,final" and a.probes == "mlp,linear"
    assert a.lr == 0.1 and a.milestones == "75,90"
    assert a.softmax_scale == 1.0  # the WRN-28-10 module does not multiply by 2


def test_explicit_softmax_scale_overrides_the_backbone_default():
    assert cifs.resolve(cifs.Args(softmax_scale=1.0)).softmax_scale == 1.0
    assert cifs.resolve(cifs.Args(model="wrn28_10", softmax_scale=2.0)).softmax_scale == 2.0
    assert cifs.resolve(cifs.Args(model="vgg16")).softmax_scale == 1.0  # not in the paper
    assert cifs.resolve(cifs.Args(dataset="synthetic", softmax_scale=1.0)).softmax_scale == 1.0


def test_the_cpu_scale_network_has_defaults_that_train():
    """smallcnn is ours: CIFS on conv3 only, linear probe, scale 128 (its channel count: the mask averages 1),
    on every dataset (docs/cifs.md, "CIFS on the CPU-scale network"); the paper's backbones keep theirs."""
    for dataset in ("synthetic", "fmnist", "cifar10"):
        a = cifs.resolve(cifs.Args(dataset=dataset, model="smallcnn"))
        assert (a.positions, a.probes, a.softmax_scale) == ("conv3", "linear", 128.0)
        net = cifs.build_network(a)
        modules = [m for m in net.modules() if isinstance(m, cifs.CIFS)]
        assert len(modules) == 1 and modules[0].softmax_scale == net.feature_shapes["conv3"][0] == 128
    assert cifs.resolve(cifs.Args(dataset="fmnist")).positions == "layer3,layer4"  # ResNet-10, published


def test_explicit_flags_override_every_default():
    explicit = dict(model="wrn28_10", epochs=7, lr=0.3, weight_decay=1e-3, milestones="2,5", augment="none",
                    epsilon=0.05, attack_steps=3, attack_step_size=0.01, hidden=17, positions="final",
                    probes="mlp")
    a = cifs.resolve(cifs.Args(dataset="cifar10", **explicit))
    assert {k: getattr(a, k) for k in explicit} == explicit
    # also the per-dataset values of fmnist and svhn
    b = cifs.resolve(cifs.Args(dataset="fmnist", model="resnet18", epsilon=0.1, attack_step_size=0.05,
                               milestones="1", lr=0.2, weight_decay=0.0))
    assert (b.model, b.epsilon, b.attack_step_size, b.milestones, b.lr, b.weight_decay) == \
        ("resnet18", 0.1, 0.05, "1", 0.2, 0.0)
    assert b.positions == "layer4.0,layer4.1"  # the chosen backbone's layout, not fmnist's
    # an explicit epsilon scales the default step (eps/4), explicit probes survive default positions
    c = cifs.resolve(cifs.Args(dataset="cifar10", epsilon=0.1, probes="linear,linear"))
    assert c.attack_step_size == pytest.approx(0.025)
    assert c.positions == "layer4.0,layer4.1" and c.probes == "linear,linear"


# =============================================================================================
# 2. Hosting: where the modules go (CIFS appendix E.3; official resnet_CIFS.py, wide_resnet_CIFS.py)
# =============================================================================================


def inserted(net):
    """{slot: (probe kind, channels, classes, hidden or None)} for every CIFS module."""
    out = {}
    for key, module in net.inserted.items():
        assert isinstance(module, cifs.CIFS)
        linears = [layer for layer in module.head if isinstance(layer, torch.nn.Linear)]
        hidden = linears[0].out_features if len(linears) == 2 else None
        out[key] = (module.probe, linears[0].in_features, linears[-1].out_features, hidden)
    return out


def forward_order(net, x, y=None, train=False):
    """Run a forward; return (logits, emitted, slot names in the order their modules ran)."""
    order = []
    handles = [m.register_forward_hook(lambda mod, inp, out, key=key: order.append((key, out[1])))
               for key, m in net.inserted.items()]
    net.train(train)
    try:
        if train:
            logits, emitted = net(x, y)
        else:
            with torch.no_grad():
                logits, emitted = net(x)
    finally:
        for h in handles:
            h.remove()
    assert len(emitted) == len(order) and all(e is hooked for e, (_, hooked) in zip(emitted, order))
    return logits, emitted, [key for key, _ in order]


def test_resnet18_default_hosting():
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar10")))
    assert inserted(net) == {"layer4_0": ("mlp", 512, 10, 128), "layer4_1": ("linear", 512, 10, None)}
    assert isinstance(net.inserted["layer4_0"].head[1], torch.nn.Softplus)
    assert net.inserted["layer4_0"].head[1].beta == 5
    # 11,173,962 + MLP probe (512*128+128 + 128*10+10) + linear probe (512*10+10)
    assert models.count_parameters(net) == 11_173_962 + 66_954 + 5_130
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 8])
    for train in (True, False):
        logits, emitted, order = forward_order(net, x, y, train)
        assert logits.shape == (2, 10) and order == ["layer4_0", "layer4_1"]  # P2 then P1
        assert all(set(e) == {"probe"} and e["probe"].shape == (2, 10) for e in emitted)


def test_resnet10_fmnist_hosting():
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="fmnist")))
    assert net.input_shape == (1, 28, 28)
    assert net.feature_shapes["layer3"] == (256, 7, 7) and net.feature_shapes["layer4"] == (512, 4, 4)
    assert inserted(net) == {"layer3_0": ("mlp", 256, 10, 128), "layer4_0": ("linear", 512, 10, None)}
    logits, emitted, order = forward_order(net, torch.rand(2, 1, 28, 28), torch.tensor([0, 9]), train=True)
    assert logits.shape == (2, 10) and order == ["layer3_0", "layer4_0"]
    assert [e["probe"].shape for e in emitted] == [(2, 10), (2, 10)]


@pytest.mark.parametrize("positions, probes, expected", [
    ("layer4.1", "linear", {"layer4_1": ("linear", 512, 10, None)}),  # P1 only
    ("layer4.0", "mlp", {"layer4_0": ("mlp", 512, 10, 128)}),  # P2 only
    ("layer4.0,layer4.1", "linear,linear", {"layer4_0": ("linear", 512, 10, None),
                                             "layer4_1": ("linear", 512, 10, None)}),
])
def test_table_e2_position_variants(positions, probes, expected):
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar10", positions=positions, probes=probes)))
    assert inserted(net) == expected
    _, emitted, _ = forward_order(net, torch.rand(2, 3, 32, 32))
    assert len(emitted) == len(expected)


def test_wrn_layout_through_build_network(monkeypatch):
    # Same layout as WRN-28-10 at width 1 (0.37 M parameters instead of 36.5 M).
    monkeypatch.setitem(models.MODELS, "wrn28_10", lambda **kw: models.WideResNet(28, 1, **kw))
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar10", model="wrn28_10")))
    assert isinstance(net, models.WideResNet)
    assert inserted(net) == {"block3_3_branch": ("mlp", 64, 10, 240), "final": ("linear", 64, 10, None)}
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([2, 5])
    for train in (True, False):
        logits, emitted, order = forward_order(net, x, y, train)
        assert logits.shape == (2, 10)
        assert order == ["block3_3_branch", "final"]  # P2 (inside the last block) before P1
        assert [e["probe"].shape for e in emitted] == [(2, 10), (2, 10)]
    assert all(not hasattr(m, "labels") for m in cifs_modules(net))


def test_wrn_branch_and_final_positions_with_cifs_modules():
    torch.manual_seed(0)
    net = models.WideResNet(16, 1)
    net.insert("block3.1.branch", cifs.CIFS(64, 10, "mlp", hidden=240))
    net.insert("final", cifs.CIFS(64, 10, "linear"))
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 4, 9])
    for train in (True, False):
        logits, emitted, order = forward_order(net, x, y, train)
        assert logits.shape == (3, 10) and order == ["block3_1_branch", "final"]


def test_any_number_of_classes():
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar100")))
    assert inserted(net) == {"layer4_0": ("mlp", 512, 100, 128), "layer4_1": ("linear", 512, 100, None)}
    logits, emitted, _ = forward_order(net, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 100) and all(e["probe"].shape == (2, 100) for e in emitted)


def test_probe_count_must_match_positions():
    with pytest.raises(ValueError, match="--probes"):
        cifs.check_method_args(cifs.resolve(cifs.Args(dataset="cifar10", positions="layer4.0,layer4.1",
                                                      probes="linear")))
    with pytest.raises(ValueError, match="--probes"):
        cifs.check_method_args(cifs.resolve(cifs.Args(dataset="cifar10", probes="mlp,linear,linear")))
    with pytest.raises(ValueError, match="--probes"):
        cifs.check_method_args(cifs.resolve(cifs.Args(dataset="cifar10", probes="mlp,conv")))
    assert cifs.resolve(cifs.Args(positions="layer3,layer4.0,layer4.1")).probes == "mlp,mlp,linear"


def test_no_cifs_is_the_plain_backbone():
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="cifar10", no_cifs=True)))
    assert models.count_parameters(net) == 11_173_962
    assert len(net.inserted) == 0 and not cifs_modules(net)
    logits, emitted = net.eval()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and emitted == []


# =============================================================================================
# 3. The ablation flags reach the modules (CIFS appendix E)
# =============================================================================================


def masked_io(net, key, x):
    """(input feature, output feature) of the module at `key` in an eval forward."""
    seen = {}
    handle = net.inserted[key].register_forward_hook(lambda mod, inp, out: seen.update(z=inp[0], out=out[0]))
    net.eval()
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen["z"], seen["out"]


@pytest.mark.parametrize("mask_fn, scale, top_k", [("softmax", 2.0, 3), ("sigmoid", 1.0, 3),
                                                   ("softplus", 1.0, 1), ("softmax", 1.0, 2)])
def test_mask_flags_reach_the_modules(mask_fn, scale, top_k):
    net = synthetic_net(mask_fn=mask_fn, softmax_scale=scale, top_k=top_k)
    modules = cifs_modules(net)
    assert len(modules) == 2
    assert all((m.mask_fn, m.softmax_scale, m.top_k) == (mask_fn, scale, top_k) for m in modules)
    # By hand at the linear probe (smallcnn's last unit, 128 channels): g = sum of the weight rows
    # of the probe's top-k classes, mask = IMGF(g).
    x, _ = synthetic_batch(4)
    z, out = masked_io(net, "conv3", x)
    u = z.mean((2, 3))
    weight, bias = net.inserted["conv3"].head[0].weight, net.inserted["conv3"].head[0].bias
    top = (u @ weight.T + bias).topk(top_k, 1).indices
    g = weight[top].sum(1)
    expected = {"softmax": lambda: scale * softmax(g), "sigmoid": lambda: 1 / (1 + torch.exp(-10 * g)),
                "softplus": lambda: torch.log1p(torch.exp(5 * g)) / 5}[mask_fn]()
    torch.testing.assert_close(out, z * expected[:, :, None, None])


def test_hidden_flag_reaches_the_mlp_probe():
    net = synthetic_net(hidden=9)
    assert inserted(net)["conv2"] == ("mlp", 64, 10, 9)


# =============================================================================================
# 4. Losses of every strategy by hand (CIFS Eq. 3)
# =============================================================================================


LOGITS = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.5, 1.5, 0.0, -2.0], [0.0, 0.0, 3.0, 1.0]])
ADV = torch.tensor([[0.5, 1.0, -1.0, 0.0], [1.5, 0.5, 0.5, -1.0], [2.0, 0.0, 1.0, 1.0]])
P1 = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0], [0.5, -0.5, 0.0, 2.0]])
P2 = torch.tensor([[0.0, 2.0, 1.0, 0.0], [1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.5]])
Y = torch.tensor([0, 2, 1])


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5])
@pytest.mark.parametrize("official", [False, True])
def test_objective_by_hand(beta, official):
    args = cifs.Args(beta=beta, official_scale=official)
    loss_cls = torch.tensor(0.7)
    emitted = [{"probe": P1}, {"probe": P2}]
    paper = 0.7 + beta * (ce(P1, Y).mean() + ce(P2, Y).mean()) / 2
    expected = paper * 3 / (beta + 1) if official else paper
    loss, parts = cifs.objective(loss_cls, LOGITS, emitted, Y, args)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["probe"], (ce(P1, Y).mean() + ce(P2, Y).mean()) / 2)
    if official and beta == 1.0:
        torch.testing.assert_close(loss, 1.5 * paper)
    # one probe: (beta / 1) * CE
    loss1, _ = cifs.objective(loss_cls, LOGITS, [{"probe": P1}], Y, args)
    torch.testing.assert_close(loss1, (0.7 + beta * ce(P1, Y).mean()) * (3 / (beta + 1) if official else 1))


def test_objective_without_probes_is_the_classification_loss():
    loss_cls = torch.tensor(1.25)
    loss, parts = cifs.objective(loss_cls, LOGITS, [], Y, cifs.Args())
    torch.testing.assert_close(loss, loss_cls)
    assert parts == {}
    probe = cifs.probe_loss([], Y)
    assert probe.shape == () and float(probe) == 0.0


def test_probe_loss_is_the_mean_over_layers():
    torch.testing.assert_close(cifs.probe_loss([{"probe": P1}, {"probe": P2}], Y),
                               (ce(P1, Y).mean() + ce(P2, Y).mean()) / 2)


def explicit_trades(clean, adv, y, beta):
    p = softmax(clean)
    log_p = clean - torch.logsumexp(clean, 1, keepdim=True)
    log_q = adv - torch.logsumexp(adv, 1, keepdim=True)
    kl = (p * (log_p - log_q)).sum() / len(y)  # batchmean
    return ce(clean, y).mean() + beta * kl


def explicit_mart(clean, adv, y, beta):
    p, q = softmax(clean), softmax(adv)
    wrong = torch.stack([max(q[i, k] for k in range(q.shape[1]) if k != y[i]) for i in range(len(y))])
    boosted = ce(adv, y).mean() - torch.log(1.0001 - wrong + 1e-12).mean()
    kl = (p * (torch.log(p + 1e-12) - torch.log(q + 1e-12))).sum(1)
    true = torch.stack([p[i, y[i]] for i in range(len(y))])
    return boosted + beta * (kl * (1.0000001 - true)).mean()


def test_trades_loss_by_hand():
    torch.testing.assert_close(cifs.trades_loss(LOGITS, ADV, Y, 6.0), explicit_trades(LOGITS, ADV, Y, 6.0))
    torch.testing.assert_close(cifs.trades_loss(LOGITS, LOGITS, Y, 6.0), ce(LOGITS, Y).mean())
    # the clean distribution is not detached: the KL term sends gradient to the clean logits too
    clean = LOGITS.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cifs.trades_loss(clean, ADV, Y, 6.0), clean)
    clean2 = LOGITS.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(explicit_trades(clean2, ADV, Y, 6.0), clean2)
    torch.testing.assert_close(grad, expected)


def test_mart_loss_by_hand():
    torch.testing.assert_close(cifs.mart_loss(LOGITS, ADV, Y, 6.0), explicit_mart(LOGITS, ADV, Y, 6.0))
    torch.testing.assert_close(cifs.mart_loss(LOGITS, ADV, Y, 5.0), explicit_mart(LOGITS, ADV, Y, 5.0))
    # a confident wrong adversarial class: the 1e-12 guard keeps the log finite
    confident = torch.tensor([[0.0, 200.0, 0.0, 0.0]])  # softmax underflows to exact zeros
    value = cifs.mart_loss(confident, confident, torch.tensor([0]), 6.0)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, explicit_mart(confident, confident, torch.tensor([0]), 6.0))


def test_classification_loss_per_strategy():
    args = cifs.Args(trades_beta=6.0, mart_beta=5.0)
    for strategy in ("natural", "at", "fat"):
        torch.testing.assert_close(cifs.classification_loss(strategy, ADV, Y, None, args), ce(ADV, Y).mean())
    # logits are the training batch (adversarial), logits_clean the clean batch
    torch.testing.assert_close(cifs.classification_loss("trades", ADV, Y, LOGITS, args),
                               explicit_trades(LOGITS, ADV, Y, 6.0))
    torch.testing.assert_close(cifs.classification_loss("mart", ADV, Y, LOGITS, args),
                               explicit_mart(LOGITS, ADV, Y, 5.0))


def official_adjust_tau(epoch: int) -> int:
    """FAT's adjust_tau (Zhang et al. 2020) with dynamic tau, for its 1-indexed epoch (re-written here)."""
    if epoch <= 50:
        return 0
    if epoch <= 90:
        return 1
    return 2


def test_fat_tau_schedule_is_fats_adjust_tau_for_every_epoch():
    assert [cifs.fat_tau(e, 120) for e in range(120)] == [official_adjust_tau(e + 1) for e in range(120)]
    assert [cifs.fat_tau(e, 120) for e in range(120)].count(0) == 50
    # other lengths scale the switches (50 and 90 of 120): 24 epochs switch after 10 and 18
    assert [cifs.fat_tau(e, 24) for e in range(24)] == [0] * 10 + [1] * 8 + [2] * 6


# =============================================================================================
# 5. The training attack: the joint loss, in eval mode (official CIFAR10_Res18_CIFS.py)
# =============================================================================================


def test_attack_loss_is_the_joint_loss_per_example():
    x, y = synthetic_batch(8)
    for beta in (2.0, 0.5):
        net = synthetic_net(beta=beta).eval()
        args = cifs.resolve(cifs.Args(dataset="synthetic", synthetic_shape="3,16,16", beta=beta))
        with torch.no_grad():
            output = net(x)
            got = cifs.attack_loss(args)(output, y)
        logits, emitted = output
        assert len(emitted) == 2 and got.shape == (8,)
        expected = ce(logits, y) + (beta / 2) * (ce(emitted[0]["probe"], y) + ce(emitted[1]["probe"], y))
        torch.testing.assert_close(got, expected)
    plain = synthetic_net(no_cifs=True).eval()
    with torch.no_grad():
        output = plain(x)
    torch.testing.assert_close(cifs.attack_loss(cifs.Args(no_cifs=True))(output, y), ce(output[0], y))


def snapshot(net):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [(name, m.training) for name, m in net.named_modules()],
            [(name, p.requires_grad) for name, p in net.named_parameters()])


def test_training_attack_runs_in_eval_mode_on_the_joint_loss():
    args = cifs.resolve(cifs.Args(dataset="synthetic", synthetic_shape="3,16,16", strategy="at", attack_steps=3))
    net = synthetic_net()
    x, y = synthetic_batch(16)
    # give the BatchNorm layers non-default statistics first
    net.train()
    with torch.no_grad():
        net(x, y)
    net.classifier.bias.requires_grad_(False)  # an unusual requires_grad must survive too
    loss_fn = cifs.attack_loss(args)

    results = []
    for train in (True, False):
        net.train(train)
        net.inserted["conv2"].train(not train)  # a mixed mode must be restored exactly
        before = snapshot(net)
        torch.manual_seed(123)
        x_adv = cifs.craft_adversarial(net, x, y, args, 0, loss_fn)
        after = snapshot(net)
        assert all(torch.equal(v, after[0][k]) for k, v in before[0].items()), "BatchNorm statistics changed"
        assert before[1] == after[1] and before[2] == after[2]
        assert all(not hasattr(m, "labels") for m in cifs_modules(net))
        results.append(x_adv)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)

    x_adv = results[1]
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= args.epsilon + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    net.eval()
    with torch.no_grad():
        assert loss_fn(net(x_adv), y).mean() > loss_fn(net(x), y).mean()
    # the probes are part of what is attacked: plain CE gives another x_adv
    torch.manual_seed(123)
    x_ce = cifs.craft_adversarial(net, x, y, args, 0, cifs.joint_attack_loss(beta=0.0))
    assert not torch.equal(x_ce, x_adv)


def test_training_step_attacks_the_joint_loss(monkeypatch):
    args = cifs.resolve(cifs.Args(dataset="synthetic", synthetic_shape="3,16,16", strategy="at", attack_steps=1,
                                  beta=3.0))
    net = synthetic_net()
    x, y = synthetic_batch(8)
    seen = []
    original = cifs.craft_adversarial

    def spy(model, x_, y_, args_, epoch, attack_loss):
        seen.append(attack_loss)
        return original(model, x_, y_, args_, epoch, attack_loss)

    monkeypatch.setattr(cifs, "craft_adversarial", spy)
    cifs.training_step(net, x, y, args, 0, NO_AUTOCAST)
    assert len(seen) == 1
    net.eval()
    with torch.no_grad():
        logits, emitted = net(x)
    expected = ce(logits, y) + 1.5 * (ce(emitted[0]["probe"], y) + ce(emitted[1]["probe"], y))
    torch.testing.assert_close(seen[0]((logits, emitted), y), expected)


# =============================================================================================
# 6. The training step: labels for the update forward(s) only
# =============================================================================================


STRATEGIES = ["natural", "at", "trades", "mart", "fat"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_step_sets_labels_for_the_update_forward_only(strategy):
    args = cifs.resolve(cifs.Args(dataset="synthetic", synthetic_shape="3,16,16", strategy=strategy,
                                  attack_steps=2, epochs=4))
    net = synthetic_net()
    x, y = synthetic_batch(8)
    calls = {key: [] for key in net.inserted}
    for key, module in net.inserted.items():
        module.register_forward_pre_hook(lambda mod, inp, key=key: calls[key].append((mod.training, inp[1])))
    net.train()
    loss, parts, logits = cifs.training_step(net, x, y, args, 0, NO_AUTOCAST)

    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    assert logits.shape == (8, 10) and set(parts) == {"cls", "probe"}
    for key, log in calls.items():
        update = [labels for training, labels in log if training]
        attack = [labels for training, labels in log if not training]
        assert len(update) == (2 if strategy in ("trades", "mart") else 1), key
        assert all(labels is not None and torch.equal(labels, y) for labels in update), key
        assert (len(attack) > 0) == (strategy != "natural"), key
        assert all(labels is None for labels in attack), key  # the attack's forwards get no labels
    assert all(not hasattr(m, "labels") for m in cifs_modules(net))
    assert all(m.training for m in net.modules())
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_training_step_without_cifs():
    args = cifs.resolve(cifs.Args(dataset="synthetic", synthetic_shape="3,16,16", strategy="trades",
                                  attack_steps=1, no_cifs=True))
    net = synthetic_net(no_cifs=True)
    x, y = synthetic_batch(8)
    loss, parts, _ = cifs.training_step(net, x, y, args, 0, NO_AUTOCAST)
    assert set(parts) == {"cls"}
    torch.testing.assert_close(loss, parts["cls"])


# =============================================================================================
# 7. Short runs learn, for every strategy, with and without CIFS
# =============================================================================================


@pytest.mark.parametrize("no_cifs", [False, True], ids=["cifs", "vanilla"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_short_run_learns(tmp_path, strategy, no_cifs):
    # smallcnn's CIFS defaults (conv3 alone, softmax scale 128) start as fast as the vanilla network: the
    # same short schedule for both. eps 4/255: the synthetic signal has only ~20/255 contrast, and at 8/255
    # the BatchNorm running statistics (a mixture of clean and adversarial batches) make short runs erratic.
    args = small_args(tmp_path, strategy=strategy, no_cifs=no_cifs, run_name="run", synthetic_size=1200,
                      val_size=200, batch_size=32, epsilon=4 / 255, attack_steps=2, eval_every=1000,
                      eval_steps=1, epochs=3, milestones="1")
    metrics = cifs.train(args, log=quiet)
    assert metrics["val_clean"] > 0.5, metrics
    run = tmp_path / "run"
    assert set(os.listdir(run)) - {"curves.png"} == {"args.json", "best.pt", "last.pt", "metrics.jsonl"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, args.epochs + 1))
    lr, milestone = cifs.resolve(args).lr, int(args.milestones)  # epochs run at lr before the drop
    assert [line["lr"] for line in lines] == pytest.approx(
        [lr * (0.1 if epoch >= milestone else 1) for epoch in range(args.epochs)])
    assert lines[-1]["val_clean"] == metrics["val_clean"]
    saved = json.loads((run / "args.json").read_text())
    assert saved["strategy"] == strategy and saved["no_cifs"] == no_cifs and saved["model"] == "smallcnn"
    checkpoint = run_support.load_checkpoint(str(run / "last.pt"), "cifs")
    assert checkpoint["method"] == "cifs" and checkpoint["epoch"] == args.epochs
    assert any("inserted" in k for k in checkpoint["model"]) != no_cifs


# =============================================================================================
# 8. Warm start (--init-from), 9. resume, 10. errors
# =============================================================================================


@pytest.fixture(scope="module")
def natural_run(tmp_path_factory):
    """A tiny natural CIFS run (the authors' warm start): its folder."""
    runs = tmp_path_factory.mktemp("runs")
    cifs.train(small_args(runs, strategy="natural", run_name="natural"), log=quiet)
    return runs / "natural"


def parameters_of(checkpoint_model, net):
    names = {name for name, _ in net.named_parameters()}
    return {k: v for k, v in checkpoint_model.items() if k in names}


def test_init_from_warm_starts_the_weights(natural_run, tmp_path):
    natural = torch.load(natural_run / "last.pt", weights_only=True)["model"]
    fresh = synthetic_net(positions=None, probes=None, softmax_scale=None)  # the AT run without --init-from
    assert any(not torch.equal(v, natural[k]) for k, v in parameters_of(fresh.state_dict(), fresh).items())

    cifs.main(["--dataset", "synthetic", "--synthetic-shape", "3,16,16", "--synthetic-size", "200",
               "--val-size", "40", "--batch-size", "32", "--strategy", "at", "--attack-steps", "2",
               "--epochs", "1", "--lr", "1e-30", "--momentum", "0", "--weight-decay", "0", "--monitor-size", "0",
               "--init-from", str(natural_run / "last.pt"), "--runs-dir", str(tmp_path), "--run-name", "warm",
               "--device", "cpu", "--log-interval", "1e9", "--eval-steps", "1"])
    warm = run_support.load_checkpoint(str(tmp_path / "warm" / "last.pt"), "cifs")
    assert warm["epoch"] == 1 and warm["args"]["strategy"] == "at" and warm["args"]["init_from"]
    params = parameters_of(warm["model"], fresh)
    assert params.keys() == parameters_of(natural, fresh).keys() and len(params) == len(list(fresh.parameters()))
    for name, value in params.items():
        assert torch.equal(value, natural[name]), name


def relabelled_as_fsr(run, path):
    """A copy of the run's last.pt that claims to be an fsr.py checkpoint."""
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["method"] = "fsr"
    torch.save(checkpoint, path)
    return path


def test_init_from_refuses_another_method(natural_run, tmp_path):
    fsr_like = relabelled_as_fsr(natural_run, tmp_path / "fsr.pt")
    with pytest.raises(run_support.CheckpointError, match="fsr"):
        cifs.train(small_args(tmp_path, init_from=str(fsr_like), run_name="warm"), log=quiet)
    assert not (tmp_path / "warm" / "last.pt").exists()


class Interrupted(Exception):
    pass


def interrupt_at(prefix):
    def log(line):
        if line.startswith(prefix):
            raise Interrupted(line)
    return log


def test_resume_is_bitwise_equivalent(tmp_path):
    settings = dict(strategy="at", epochs=3, synthetic_size=160, val_size=32, batch_size=32, eval_every=2)
    cifs.train(small_args(tmp_path, run_name="a", **settings), log=quiet)
    with pytest.raises(Interrupted):
        cifs.train(small_args(tmp_path, run_name="b", **settings), log=interrupt_at("epoch 2/3"))
    b = tmp_path / "b"
    assert run_support.load_checkpoint(str(b / "last.pt"), "cifs")["epoch"] == 2  # saved before the summary line
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 2

    resumed = []
    cifs.train(cifs.Args(resume=str(b / "last.pt"), device="cpu"), log=resumed.append)
    assert any(line.startswith("resumed") for line in resumed)

    final_a = run_support.load_checkpoint(str(tmp_path / "a" / "last.pt"), "cifs")
    final_b = run_support.load_checkpoint(str(b / "last.pt"), "cifs")
    assert final_a["epoch"] == final_b["epoch"] == 3
    assert final_a["model"].keys() == final_b["model"].keys()
    for name, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][name]), name
    for index, state in final_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, final_b["optimizer"]["state"][index][name]), (index, name)
    assert len(final_a["rng"]) == 1 and torch.equal(final_a["rng"][0][0], final_b["rng"][0][0])
    assert final_a["best_robust"] == final_b["best_robust"]

    def comparable(path):
        timing = {"images_per_second", "epoch_seconds"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in path.read_text().splitlines()]
    assert comparable(b / "metrics.jsonl") == comparable(tmp_path / "a" / "metrics.jsonl")
    assert len(comparable(b / "metrics.jsonl")) == 3


def test_checkpoint_of_another_method_is_refused(natural_run, tmp_path):
    path = relabelled_as_fsr(natural_run, tmp_path / "last.pt")
    with pytest.raises(run_support.CheckpointError, match="fsr"):
        run_support.load_checkpoint(str(path), "cifs")
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--resume", str(path), "--device", "cpu"])
    assert str(exit_info.value.code).startswith("error:") and "fsr" in str(exit_info.value.code)


def test_truncated_checkpoint_is_refused(natural_run, tmp_path):
    data = (natural_run / "last.pt").read_bytes()
    truncated = tmp_path / "last.pt"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(run_support.CheckpointError, match="unreadable|truncated"):
        run_support.load_checkpoint(str(truncated), "cifs")
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--resume", str(truncated)])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and ("unreadable" in message or "truncated" in message)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--resume", str(tmp_path / "nothing.pt")])
    assert str(exit_info.value.code).startswith("error:")


def test_epsilon_in_pixel_units_is_refused(tmp_path):
    with pytest.raises(ValueError, match="8/255"):
        cifs.train(small_args(tmp_path, epsilon=8.0), log=quiet)
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--dataset", "synthetic", "--epsilon", "8", "--runs-dir", str(tmp_path), "--device", "cpu"])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "8/255" in message
    assert os.listdir(tmp_path) == []  # refused before anything was written


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cifar11"], "--dataset: invalid choice: 'cifar11'"),
    (["--dataset", "synthetic", "--model", "resnet99"], "--model: invalid choice: 'resnet99'"),
    (["--dataset", "synthetic", "--positions", "conv9"], "unknown position 'conv9'"),
])
def test_unknown_dataset_model_or_position_is_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(flags + ["--device", "cpu", "--runs-dir", str(tmp_path)])
    assert str(exit_info.value.code).startswith("error:") and message in str(exit_info.value.code)


def test_new_run_into_an_existing_run_folder_is_refused(natural_run):
    last, args_json = natural_run / "last.pt", natural_run / "args.json"
    before = last.read_bytes(), args_json.read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        cifs.train(small_args(natural_run.parent, strategy="natural", run_name="natural"), log=quiet)
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--dataset", "synthetic", "--synthetic-shape", "3,16,16", "--runs-dir", str(natural_run.parent),
                   "--run-name", "natural", "--device", "cpu"])
    assert str(exit_info.value.code).startswith("error:")
    assert (last.read_bytes(), args_json.read_bytes()) == before


# =============================================================================================
# 11-12. Import, the command line
# =============================================================================================


def test_import_runs_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PYTHON, "-c", "import cifs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # a guard against hangs only
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert os.listdir(tmp_path) == []


def test_help_lists_the_flags(tmp_path):
    done = subprocess.run([PYTHON, str(ROOT / "cifs.py"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)  # a guard against hangs only
    assert done.returncode == 0, done.stderr
    for flag in ("--no-cifs", "--init-from", "--mask-fn", "--softmax-scale", "--official-scale", "--top-k",
                 "--positions", "--probes", "--beta", "--resume", "--strategy"):
        assert flag in done.stdout, flag
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dataset", ["cifar10", "fmnist"])
def test_learning_rate_of_every_epoch_is_the_official_multisteplr(dataset):
    # The official code: MultiStepLR(milestones) stepped once after each epoch.
    args = cifs.resolve(cifs.Args(dataset=dataset))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(m) for m in args.milestones.split(",")])
    official = []
    for _ in range(args.epochs):
        official.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [cifs.learning_rate(args, epoch) for epoch in range(args.epochs)] == pytest.approx(official)
    if dataset == "cifar10":  # 75 epochs at 0.1 (the authors' log: 0-indexed epoch 74 at 0.1, 75 at 0.01)
        assert official[74] == pytest.approx(0.1) and official[75] == pytest.approx(0.01)


def test_fp32_by_default_amp_opt_in_channels_last_tri_state():
    assert run_support.parse_args(cifs.Args, []).amp is False and run_support.parse_args(cifs.Args, []).channels_last is None
    assert run_support.parse_args(cifs.Args, ["--amp", "--no-channels-last"]).amp is True
    assert run_support.parse_args(cifs.Args, ["--no-channels-last"]).channels_last is False


def test_parse_args_round_trip():
    a = run_support.parse_args(cifs.Args, ["--dataset", "fmnist", "--no-cifs", "--mask-fn", "sigmoid", "--softmax-scale", "2",
                         "--top-k", "3", "--official-scale", "--init-from", "x.pt", "--probes", "linear,linear"])
    assert (a.dataset, a.no_cifs, a.mask_fn, a.softmax_scale, a.top_k, a.official_scale, a.init_from, a.probes) == \
        ("fmnist", True, "sigmoid", 2.0, 3, True, "x.pt", "linear,linear")
    assert a.epochs is None and a.positions is None  # left for resolve
    assert run_support.parse_args(cifs.Args, []) == cifs.Args()
