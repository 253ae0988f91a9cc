"""The lean training step: CIFS compiles whole, the bf16 attack casts each weight once, and the
attack's state contract holds (issue #26). CPU, seconds; op and graph counts, never wall-clock time."""

import contextlib

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import attacks
import cifs
import fsr
import run_support

VARIANTS = {"plain": (fsr, dict(no_fsr=True)), "fsr": (fsr, {}), "cifs": (cifs, {})}


def step_setup(name, **kw):
    script, extra = VARIANTS[name]
    args = script.resolve(script.Args(dataset="synthetic", synthetic_shape="3,16,16", device="cpu", strategy="at",
                                      attack_steps=2, **extra, **kw))
    torch.manual_seed(0)
    return script, args, script.build_network(args), torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])


def compiled_step(name):
    """(graphs, graph breaks) of one compiled training step (attack, update passes, backward), aot_eager."""
    script, args, model, x, y = step_setup(name)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    loss, _, _ = script.training_step(torch.compile(model, backend=backend), x, y, args, 0, contextlib.nullcontext)
    loss.backward()
    graphs, breaks = backend.frame_count, sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return graphs, breaks


def test_cifs_compiles_whole_like_plain_and_fsr():
    """The closed-form relevance (no autograd.grad, no torch.compiler.disable in any forward):
    no graph break, and no more graphs for CIFS than for the plain network (eval + train mode)."""
    counts = {name: compiled_step(name) for name in VARIANTS}
    assert all(breaks == 0 for _, breaks in counts.values()), counts
    assert counts["cifs"][0] <= counts["plain"][0] and counts["fsr"][0] <= counts["plain"][0], counts


class Casts(TorchDispatchMode):
    """Records the input of every `_to_copy` (a dtype cast)."""

    def __init__(self):
        super().__init__()
        self.sources = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.sources.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["plain", "fsr", "cifs"])
def test_attack_under_autocast_casts_each_weight_once_and_leaves_the_model_as_found(name):
    _, args, model, x, y = step_setup(name)
    model.train()
    loss_fn = cifs.joint_attack_loss(2.0) if name == "cifs" else attacks.cross_entropy_loss
    weights = {p.data_ptr() for p in model.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    casts = {}
    for steps in (1, 4):
        with Casts() as recorder, torch.autocast("cpu", torch.bfloat16):
            attacks.pgd(model, x, y, args.epsilon, args.attack_step_size, steps, loss_fn=loss_fn)
        weight_casts = [ptr for ptr in recorder.sources if ptr in weights]
        assert weight_casts and len(weight_casts) == len(set(weight_casts)), steps  # each weight at most once
        casts[steps] = len(recorder.sources), len(weight_casts)
    assert casts[4][1] == casts[1][1]  # no weight re-cast after the first forward
    assert casts[4][0] - casts[1][0] == 3 * (casts[1][0] - casts[1][1])  # later passes cast activations only
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # no weight gradient
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights, BatchNorm buffers


def test_buffer_broadcast_is_one_coalesced_collective_and_none_under_sync_bn(monkeypatch):
    """Under torchrun: one broadcast per step of every BatchNorm running statistic (not num_batches_tracked,
    equal everywhere), rank 0's values copied into every buffer; none with --sync-bn (already equal).
    tests/distributed_worker.py checks every rank's buffers against rank 0's after each real step."""
    _, _, model, x, y = step_setup("fsr")
    model(x, y)  # train mode: the statistics move away from their initial values
    sent = []
    monkeypatch.setattr(run_support.dist, "broadcast", lambda tensor, src: sent.append(src) or tensor.fill_(0.5))
    before = {name: b.clone() for name, b in model.named_buffers()}
    run_support.broadcast_buffers(model, sync_bn=True)
    assert sent == [] and all(torch.equal(before[name], b) for name, b in model.named_buffers())
    run_support.broadcast_buffers(model)
    assert sent == [0]
    for name, buffer in model.named_buffers():
        expected = before[name] if name.endswith("num_batches_tracked") else torch.full_like(buffer, 0.5)
        assert torch.equal(buffer, expected), name
