"""The CIFS module, its labels mechanism and losses (CIFS §3, Eq. 3). CPU, a few seconds."""

import pytest
import torch
import torch.nn.functional as F

import attacks
import models
import cifs
from cifs import CIFS, cifs_loss, joint_attack_loss, relevance_mask, select_classes


def feature(batch=4, channels=6, size=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g, dtype=dtype) + 0.1  # > 0: m = out / z


def relevance_of(module, u, labels=None):
    """CIFS.relevance with the classes and hidden activation its forward would pass."""
    hidden = module.head[0](u) if module.probe == "mlp" else None
    q = module.head(u).detach()
    return module.relevance(u, select_classes(q, module.top_k, labels if module.training else None), hidden)


def autograd_forward(module, z, labels=None):
    """The official form of CIFS.forward: Eq. 2 by torch.autograd.grad of S on u, the graph kept
    (create_graph) in train mode (on a detached u) and through the mask (on u itself)."""
    u = z.mean((2, 3))
    p = module.head(u)
    with torch.enable_grad():
        if module.differentiable_mask and u.requires_grad:
            v, create_graph = u, True
        else:
            v, create_graph = u.detach().requires_grad_(True), module.training
        q = module.head(v)
        classes = select_classes(q.detach(), module.top_k, labels if module.training else None)
        (g,) = torch.autograd.grad(q.gather(1, classes).sum(), v, create_graph=create_graph)
    m = relevance_mask(g, module.mask_fn, module.softmax_scale).to(z.dtype)
    return z * m[:, :, None, None], {"probe": p}


def linear_rows(module, classes):
    """Hand relevance for a linear probe: dS/du = sum of the weight rows of the selected classes."""
    weight = module.head[0].weight.detach()
    return weight[classes].sum(1)


# --- class selection --------------------------------------------------------------------------


def test_eval_selects_top_k_and_train_selects_label_then_ranks_2_to_k():
    q = torch.tensor([[0.0, 5.0, 3.0, 1.0, 4.0]])  # ranking: 1, 4, 2, 3, 0
    assert select_classes(q, 2).tolist() == [[1, 4]]
    assert select_classes(q, 3).tolist() == [[1, 4, 2]]
    # y = 0 is not the argmax: y plus the rank-2 class (4), rank 1 skipped (official behaviour).
    assert select_classes(q, 2, torch.tensor([0])).tolist() == [[0, 4]]
    # y is rank 2: selected twice.
    assert select_classes(q, 2, torch.tensor([4])).tolist() == [[4, 4]]
    # y is rank 1: y and rank 2, as in eval mode.
    assert select_classes(q, 2, torch.tensor([1])).tolist() == [[1, 4]]
    assert select_classes(q, 1, torch.tensor([3])).tolist() == [[3]]
    assert select_classes(q, 3, torch.tensor([0])).tolist() == [[0, 4, 2]]


# --- relevance --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [3, 10, 200])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_linear_relevance_is_the_sum_of_selected_weight_rows(num_classes, top_k):
    torch.manual_seed(0)
    module = CIFS(6, num_classes, "linear", top_k=top_k)
    z = feature()
    u = z.mean((2, 3))
    q = module.head(u).detach()

    module.eval()
    expected = linear_rows(module, q.topk(top_k, 1).indices)
    torch.testing.assert_close(relevance_of(module, u), expected)

    module.train()
    y = q.argmin(1)  # never the argmax
    expected = linear_rows(module, torch.cat([y[:, None], q.topk(top_k, 1).indices[:, 1:]], 1))
    torch.testing.assert_close(relevance_of(module, u, y), expected)

    # Through the full forward: the mask is IMGF of that relevance, applied per channel.
    out, emitted = module(z, y)
    torch.testing.assert_close(out, z * F.softmax(expected, 1)[:, :, None, None])
    assert emitted["probe"].shape == (4, num_classes)


def test_linear_relevance_with_label_at_rank_2_counts_it_twice():
    torch.manual_seed(0)
    module = CIFS(6, 5, "linear").train()
    u = feature().mean((2, 3))
    q = module.head(u).detach()
    y = q.topk(2, 1).indices[:, 1]
    torch.testing.assert_close(relevance_of(module, u, y), 2 * module.head[0].weight.detach()[y])


def test_mlp_relevance_matches_finite_differences():
    torch.manual_seed(0)
    module = CIFS(5, 4, "mlp", hidden=7).double().eval()
    u = torch.randn(3, 5, dtype=torch.float64)
    classes = select_classes(module.head(u), 2)
    h = 1e-6
    numeric = torch.zeros_like(u)
    with torch.no_grad():
        for c in range(5):
            step = torch.zeros_like(u)
            step[:, c] = h
            plus = module.head(u + step).gather(1, classes).sum(1)
            minus = module.head(u - step).gather(1, classes).sum(1)
            numeric[:, c] = (plus - minus) / (2 * h)
    torch.testing.assert_close(relevance_of(module, u), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("probe", ["linear", "mlp"])
@pytest.mark.parametrize("mode", ["train", "eval", "through the mask"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_closed_form_relevance_equals_the_autograd_form_with_every_gradient(dtype, tolerance, probe, mode, top_k):
    """Eq. 2 in closed form = the official torch.autograd.grad form: outputs, probe logits, and the
    gradients of a random functional of both to every parameter (the probe learns through the mask in
    train mode) and to the input (through the mask). Large features put some 5 h above Softplus's
    threshold 20, where its derivative is exactly 1."""
    torch.manual_seed(0)
    module = CIFS(6, 5, probe, hidden=7, top_k=top_k).to(dtype).train(mode == "train")
    module.differentiable_mask = mode == "through the mask"
    z = (40 * torch.randn(6, 6, 3, 3, dtype=dtype)).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    weights = torch.randn(6, 6, 3, 3, dtype=dtype), torch.randn(6, 5, dtype=dtype)
    results = []
    for forward in (module.forward, lambda z, y: autograd_forward(module, z, y)):
        out, emitted = forward(z, y)
        objective = (out * weights[0]).sum() + (emitted["probe"] * weights[1]).sum()
        grads = torch.autograd.grad(objective, [z, *module.parameters()])
        results.append([out, emitted["probe"], *grads])
    for closed, reference in zip(*results):
        assert (closed - reference).abs().max() <= tolerance * max(1.0, reference.abs().max())
    if probe == "mlp":
        assert (5 * module.head[0](z.mean((2, 3)))).abs().max() > 20  # the threshold is exercised


# --- masks ------------------------------------------------------------------------------------


def test_mask_functions():
    g = torch.randn(4, 9)
    torch.testing.assert_close(relevance_mask(g, "softmax").sum(1), torch.ones(4))
    torch.testing.assert_close(relevance_mask(g, "softmax", 2.0).sum(1), torch.full((4,), 2.0))
    torch.testing.assert_close(relevance_mask(g, "sigmoid"), 1 / (1 + torch.exp(-10 * g)))
    torch.testing.assert_close(relevance_mask(g, "softplus"), torch.log1p(torch.exp(5 * g)) / 5)
    with pytest.raises(ValueError, match="mask function"):
        relevance_mask(g, "relu")


@pytest.mark.parametrize("mask_fn", ["softmax", "sigmoid", "softplus"])
def test_forward_applies_the_mask_per_channel(mask_fn):
    torch.manual_seed(0)
    module = CIFS(6, 4, "mlp", hidden=8, mask_fn=mask_fn, softmax_scale=2.0).eval()
    z = feature()
    out, _ = module(z)
    m = relevance_mask(relevance_of(module, z.mean((2, 3))), mask_fn, 2.0)
    torch.testing.assert_close(out, z * m[:, :, None, None])


def test_eval_forward_is_the_same_under_no_grad():
    torch.manual_seed(0)
    module = CIFS(6, 4, "mlp", hidden=8).eval()
    z = feature()
    out, emitted = module(z)
    with torch.no_grad():
        out_ng, emitted_ng = module(z)
    torch.testing.assert_close(out_ng, out)
    torch.testing.assert_close(emitted_ng["probe"], emitted["probe"])
    assert not out_ng.requires_grad


# --- gradient paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_mask_gives_no_gradient_path_to_the_input(train):
    torch.manual_seed(0)
    module = CIFS(6, 4, "mlp", hidden=8).train(train)
    z = feature().requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    v = torch.randn(4, 6, 3, 3)
    out, _ = module(z, y)
    m = out.detach() / z.detach()  # per-channel constant mask
    (grad,) = torch.autograd.grad((out * v).sum(), z)
    torch.testing.assert_close(grad, m * v)


def test_probe_learns_through_the_mask_in_train_mode_only():
    torch.manual_seed(0)
    for probe in ("linear", "mlp"):
        module = CIFS(6, 4, probe, hidden=8).train()
        out, _ = module(feature(), torch.tensor([0, 1, 2, 3]))
        (out * torch.randn_like(out)).sum().backward()  # a loss on the masked output only, not on p
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.head.parameters()
                   if p.dim() == 2), probe  # every weight matrix feeds the relevance

        module.zero_grad(set_to_none=True)
        module.eval()  # eval: constant mask, no second-order graph
        out, _ = module(feature().requires_grad_(True))
        out.sum().backward()
        assert all(p.grad is None for p in module.head.parameters())


# --- labels mechanism -------------------------------------------------------------------------


def test_train_mode_without_labels_raises():
    module = CIFS(6, 4).train()
    with pytest.raises(ValueError, match=r"model\(x, y\)"):
        module(feature())
    with pytest.raises(ValueError, match="expected"):
        module(feature(batch=4), torch.tensor([0, 1]))  # wrong batch size
    module.eval()
    module(feature())  # eval mode needs no labels


def test_labels_reach_every_module_through_the_network_and_are_kept_nowhere():
    """The labels are an argument (the official forward(x, y=None)): Network.forward passes them to
    every inserted module, the WRN branch position included; train mode uses them, eval mode ignores
    them, and nothing of them is stored on the modules or in the state dict."""
    torch.manual_seed(0)
    net = cifs.build_network(cifs.resolve(cifs.Args(dataset="synthetic", model="wrn28_10", synthetic_shape="3,8,8")))
    seen = []
    for module in net.inserted.values():
        module.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[1]))
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    net.train()(x, y)
    assert len(seen) == 2 and all(labels is y for labels in seen)  # block3.3.branch and final
    with pytest.raises(ValueError, match="true labels"):
        net(x)
    seen.clear()
    with torch.no_grad():
        eval_logits = net.eval()(x)[0]
        assert torch.equal(net(x, y)[0], eval_logits)  # eval mode: top-k masks whatever the labels
    assert all(labels is None for labels in seen[:2])
    assert all(not any(torch.is_tensor(v) for v in vars(m).values()) for m in net.inserted.values())
    assert "labels" not in str(list(net.state_dict()))


def test_constructor_validates():
    with pytest.raises(ValueError, match="probe"):
        CIFS(6, 4, probe="conv")
    with pytest.raises(ValueError, match="mask function"):
        CIFS(6, 4, mask_fn="tanh")
    with pytest.raises(ValueError, match="top_k"):
        CIFS(6, 3, top_k=4)


# --- losses -----------------------------------------------------------------------------------


def ce(logits, y):
    """Per-example CE by hand: logsumexp - true logit."""
    return torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)


def test_cifs_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    p1 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    p2 = torch.tensor([[0.0, 2.0, 1.0], [1.0, -1.0, 0.0]])
    y = torch.tensor([0, 2])
    emitted = [{"probe": p1}, {"probe": p2}]
    paper = ce(logits, y).mean() + (2.0 / 2) * (ce(p1, y).mean() + ce(p2, y).mean())
    loss, parts = cifs_loss(logits, emitted, y, beta=2.0)
    torch.testing.assert_close(loss, paper)
    torch.testing.assert_close(parts["cls"], ce(logits, y).mean())
    torch.testing.assert_close(parts["probe"], (ce(p1, y).mean() + ce(p2, y).mean()) / 2)
    torch.testing.assert_close(cifs_loss(logits, emitted, y, 2.0, official_scale=True)[0], paper)  # 3/3

    paper_b1 = ce(logits, y).mean() + 0.5 * (ce(p1, y).mean() + ce(p2, y).mean())
    torch.testing.assert_close(cifs_loss(logits, emitted, y, beta=1.0, official_scale=True)[0], 1.5 * paper_b1)
    torch.testing.assert_close(cifs_loss(logits, [], y)[0], ce(logits, y).mean())


def test_joint_attack_loss_by_hand():
    torch.manual_seed(0)
    logits, p1, p2 = torch.randn(3, 5, 4).unbind(0)
    y = torch.tensor([0, 1, 2, 3, 3])
    expected = ce(logits, y) + (0.5 / 2) * (ce(p1, y) + ce(p2, y))
    got = joint_attack_loss(beta=0.5)((logits, [{"probe": p1}, {"probe": p2}]), y)
    assert got.shape == (5,)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(joint_attack_loss()((logits, []), y), ce(logits, y))


# --- integration with models.Network and attacks ----------------------------------------------


def cifs_resnet18(num_classes=10):
    torch.manual_seed(0)
    net = models.build_model("resnet18", num_classes)
    net.insert("layer4.0", CIFS(512, num_classes, "mlp", hidden=128))  # P2
    net.insert("layer4.1", CIFS(512, num_classes, "linear"))  # P1
    return net


def test_cifs_resnet18_forward_loss_attack():
    net = cifs_resnet18()
    # 11,173,962 (ResNet-18) + P2 MLP probe (512*128 + 128 + 128*10 + 10 = 66,954)
    # + P1 linear probe (512*10 + 10 = 5,130) = 11,246,046.
    assert 512 * 128 + 128 + 128 * 10 + 10 == 66_954 and 512 * 10 + 10 == 5_130
    assert models.count_parameters(net) == 11_173_962 + 66_954 + 5_130 == 11_246_046

    order = []
    for name, module in net.inserted.items():
        module.register_forward_hook(lambda mod, inp, out, name=name: order.append((name, out[1])))
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 7])

    net.train()
    logits, emitted = net(x, y)
    assert logits.shape == (2, 10) and len(emitted) == 2
    assert [name for name, _ in order] == ["layer4_0", "layer4_1"]
    assert all(e is hooked for e, (_, hooked) in zip(emitted, order))
    assert all(e["probe"].shape == (2, 10) for e in emitted)
    loss, _ = cifs_loss(logits, emitted, y)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(not hasattr(m, "labels") for m in net.inserted.values())

    net.eval()
    with torch.no_grad():
        eval_logits, eval_emitted = net(x)
    assert eval_logits.shape == (2, 10) and len(eval_emitted) == 2

    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x_adv = attacks.pgd(net, x, y, 8 / 255, 2 / 255, steps=2, loss_fn=joint_attack_loss(2.0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
