"""fsr.py: the FSR module, its losses, the training strategies, the training loop and the CLI.

Everything runs on the CPU: smallcnn on 3x16x16 synthetic images for training runs; the paper
backbones are only built (and run on one or two images) where their sizes are checked.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attacks
import fsr
import run_support
from benchmarks.speed import count_flops
from models import count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *a: None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this file: the runs here are tiny, and on a 2-core machine shared
    with any other process, 2 OpenMP threads spin at every barrier (measured: 16 min instead of
    75 s for this file); on an idle machine one thread costs little."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(**kw):
    return fsr.build_network(fsr.resolve(fsr.Args(**kw)))


def tiny_args(tmp_path, **kw):
    """A training run that takes about a second (for checkpoint and CLI tests)."""
    settings = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=300, val_size=100, device="cpu",
                    strategy="natural", epochs=1, eval_every=1, eval_steps=1, log_interval=1e9, monitor_size=0,
                    runs_dir=str(tmp_path), run_name="tiny")
    settings.update(kw)
    return fsr.Args(**settings)


def log_softmax(logits):
    """By hand: z - log sum exp z."""
    return logits - logits.exp().sum(1, keepdim=True).log()


def ce(logits, y):
    return -log_softmax(logits)[torch.arange(len(y)), y].mean()


def fresh_fsr(channels=8, **kw):
    torch.manual_seed(0)
    return fsr.FSR(channels, 10, **kw).eval()


def feature(channels=8):
    torch.manual_seed(1)
    return torch.randn(4, channels, 5, 5)


def pooled(f):
    return f.mean((2, 3))


# =============================================================================================
# 1. Sizes (FSR Table 7)
# =============================================================================================

def fsr_delta(channels, classes=10, hidden=64):
    """Parameters one FSR module adds: S and R (bias-free convs, two BNs each) and the head."""
    conv_net = channels * hidden * 9 + 2 * hidden + hidden * hidden * 9 + 2 * hidden + hidden * channels * 9
    return 2 * conv_net + channels * classes + classes


def test_resnet18_with_fsr_has_12_43_m_parameters():
    net = build(model="resnet18")
    assert count_parameters(net) == 12_432_980 == 11_173_962 + fsr_delta(512)


def test_vgg16_with_fsr_has_16_51_m_parameters():
    # FSR Table 7 prints 16.52 M, but the official code's layers (bias-free S/R convs, one shared
    # Linear(512, 10) head; VGG16-BN with conv biases and a 512-512-10 classifier = 15,253,578)
    # add up to 16,512,596 = 16.51 M: the table rounds (or counts) differently.
    net = build(model="vgg16")
    assert count_parameters(net) == 16_512_596 == 15_253_578 + fsr_delta(512)
    assert list(net.inserted) == ["stage4"]


@pytest.mark.parametrize("model, plain", [("resnet18", 11_173_962), ("vgg16", 15_253_578)])
def test_no_fsr_leaves_the_vanilla_backbone(model, plain):
    net = build(model=model, no_fsr=True)
    assert count_parameters(net) == plain
    assert len(net.inserted) == 0


def test_wrn34_10_takes_fsr_at_the_final_640_channel_feature():
    net = build(model="wrn34_10")  # construction runs one 32x32 image; no further forward
    assert list(net.inserted) == ["final"]
    module = net.inserted["final"]
    assert module.head.in_features == 640 and module.separation[0].in_channels == 640
    delta = 2 * (640 * 64 * 9 + 64 + 64 + 64 * 64 * 9 + 64 + 64 + 64 * 640 * 9) + 640 * 10 + 10
    assert count_parameters(module) == delta
    assert count_parameters(net) == 46_160_474 + delta  # the WRN alone is checked in test_models.py


def test_resnet18_with_fsr_costs_1_1535_gflops():
    flops = count_flops(fsr.build_network(fsr.resolve(fsr.Args())), (3, 32, 32))
    assert flops / 1e9 == pytest.approx(1.1535, rel=0.01)  # FSR Table 7


# =============================================================================================
# 2-4. The mask and the module
# =============================================================================================

@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_eval_mask_is_deterministic_and_equals_sigmoid_r_over_tau(tau):
    module = fresh_fsr(tau=tau)
    r = 3 * feature()
    first, second = module.mask(r), module.mask(r)
    assert torch.equal(first, second)
    # The 1e-8 guards move log(s) and log(1 - s) by at most ~1e-8 / min(s, 1 - s); where that is
    # not negligible the sigmoid is saturated, so 1e-4 is ample.
    torch.testing.assert_close(first, torch.sigmoid(r / tau), atol=1e-4, rtol=0)


def test_train_mask_is_stochastic_and_in_the_unit_interval():
    module = fresh_fsr().train()
    r = 3 * feature()
    first, second = module.mask(r), module.mask(r)
    assert not torch.equal(first, second)
    for m in (first, second):
        assert m.min() >= 0 and m.max() <= 1


@pytest.mark.parametrize("r", [-1.0, 0.0, 0.7])
def test_train_mask_picks_the_robust_side_with_probability_sigmoid_r(r):
    # Gumbel-max: the first component wins (m > 0.5) with probability s = sigmoid(r).
    module = fresh_fsr().train()
    torch.manual_seed(0)
    m = module.mask(torch.full((200_000,), r))
    assert (m > 0.5).float().mean().item() == pytest.approx(torch.sigmoid(torch.tensor(r)).item(), abs=0.006)


def test_fsr_output_is_f_plus_masked_recalibration():
    module, f = fresh_fsr(), feature()
    with torch.no_grad():
        out, heads = module(f)
        m = module.mask(module.separation(f))
        recal = (1 - m) * f + (1 - m) * module.recalibration((1 - m) * f)
        torch.testing.assert_close(out, f + (1 - m) * module.recalibration((1 - m) * f))
        torch.testing.assert_close(heads["mask"], m)
        torch.testing.assert_close(heads["robust"], module.head(pooled(m * f)))
        torch.testing.assert_close(heads["non_robust"], module.head(pooled((1 - m) * f)))
        torch.testing.assert_close(heads["recalibrated"], module.head(pooled(recal)))
    assert out.shape == f.shape


# =============================================================================================
# 5-6. Losses against hand computations
# =============================================================================================

def test_top_wrong_class():
    logits = torch.tensor([[3.0, 1.0, 2.0],    # argmax = true class 0: the answer is the runner-up 2
                           [0.5, 4.0, 1.0]])   # argmax 1 is already wrong (y = 2): the answer is 1
    assert fsr.top_wrong_class(logits, torch.tensor([0, 2])).tolist() == [2, 1]


LOGITS_CLEAN = torch.tensor([[2.0, 0.5, -1.0], [0.2, 1.5, 0.3]])
LOGITS_ADV = torch.tensor([[0.5, 1.0, -0.2], [1.2, 0.4, 0.3]])
Y = torch.tensor([0, 1])


def test_trades_loss_by_hand():
    p_clean, p_adv = LOGITS_CLEAN.softmax(1), LOGITS_ADV.softmax(1)
    kl = (p_clean * (p_clean.log() - p_adv.log())).sum() / 2  # batchmean
    expected = ce(LOGITS_CLEAN, Y) + 6.0 * kl
    torch.testing.assert_close(fsr.trades_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 6.0), expected)


def test_mart_loss_by_hand():
    p_clean, p_adv = LOGITS_CLEAN.softmax(1), LOGITS_ADV.softmax(1)
    # Largest wrong adversarial probability: row 0 (y=0) -> class 1, row 1 (y=1) -> class 0.
    max_wrong = torch.stack([p_adv[0, 1], p_adv[1, 0]])
    boosted = ce(LOGITS_ADV, Y) - torch.log(1.0001 - max_wrong + 1e-12).mean()
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    true_clean = torch.stack([p_clean[0, 0], p_clean[1, 1]])
    expected = boosted + 5.0 * (kl * (1.0000001 - true_clean)).mean()
    torch.testing.assert_close(fsr.mart_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 5.0), expected)


@pytest.mark.parametrize("strategy", ["natural", "at", "fat"])
def test_classification_loss_is_plain_cross_entropy(strategy):
    args = fsr.Args(strategy=strategy)
    torch.testing.assert_close(fsr.classification_loss(strategy, LOGITS_ADV, Y, None, args), ce(LOGITS_ADV, Y))


def test_classification_loss_routes_trades_and_mart_with_their_betas():
    args = fsr.Args(trades_beta=2.0, mart_beta=3.0)
    torch.testing.assert_close(fsr.classification_loss("trades", LOGITS_ADV, Y, LOGITS_CLEAN, args),
                               fsr.trades_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 2.0))
    torch.testing.assert_close(fsr.classification_loss("mart", LOGITS_ADV, Y, LOGITS_CLEAN, args),
                               fsr.mart_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 3.0))


NON_ROBUST = torch.tensor([[0.3, -0.2, 1.1], [2.0, 0.1, -0.4]])
Y_WRONG = torch.tensor([2, 0])


@pytest.mark.parametrize("kind", ["mispredicted", "uniform", "entropy", "average"])
def test_non_robust_loss_variants_by_hand(kind):
    log_p = log_softmax(NON_ROBUST)
    expected = {
        "mispredicted": -torch.stack([log_p[0, 2], log_p[1, 0]]).mean(),
        "uniform": -(log_p.sum(1) / 3).mean(),                   # CE towards (1/3, 1/3, 1/3)
        "entropy": (log_p.exp() * log_p).sum(1).mean(),          # negative entropy
        "average": -torch.stack([(log_p[0, 1] + log_p[0, 2]) / 2,  # mean CE over the wrong classes
                                 (log_p[1, 0] + log_p[1, 2]) / 2]).mean(),
    }[kind]
    torch.testing.assert_close(fsr.non_robust_loss(NON_ROBUST, Y, Y_WRONG, kind), expected)


def heads_example(shift):
    return {"robust": LOGITS_CLEAN + shift, "non_robust": NON_ROBUST * (1 + shift),
            "recalibrated": LOGITS_ADV - shift, "mask": torch.zeros(1)}


def expected_fsr_terms(heads, y, y_wrong):
    sep = ce(heads["robust"], y) + ce(heads["non_robust"], y_wrong)
    return sep, ce(heads["recalibrated"], y)


# Final logits whose top wrong classes are [2, 0] for Y = [0, 1].
FINAL = torch.tensor([[1.0, -3.0, 0.5], [2.0, 1.0, 0.0]])


def test_fsr_loss_one_module_by_hand():
    heads = heads_example(0.0)
    sep, rec = expected_fsr_terms(heads, Y, torch.tensor([2, 0]))
    loss, parts = fsr.fsr_loss(FINAL, [heads], Y, lambda_sep=0.3, lambda_rec=2.5)
    torch.testing.assert_close(loss, 0.3 * sep + 2.5 * rec)
    torch.testing.assert_close(parts["sep"], sep)
    torch.testing.assert_close(parts["rec"], rec)


def test_fsr_loss_averages_over_two_modules():
    first, second = heads_example(0.0), heads_example(0.4)
    sep1, rec1 = expected_fsr_terms(first, Y, torch.tensor([2, 0]))
    sep2, rec2 = expected_fsr_terms(second, Y, torch.tensor([2, 0]))
    loss, _ = fsr.fsr_loss(FINAL, [first, second], Y, lambda_sep=0.7, lambda_rec=0.2)
    torch.testing.assert_close(loss, (0.7 * (sep1 + sep2) + 0.2 * (rec1 + rec2)) / 2)


def test_fsr_loss_uses_the_y_prime_variant():
    heads = heads_example(0.0)
    expected = ce(heads["robust"], Y) - (log_softmax(heads["non_robust"]).sum(1) / 3).mean()
    torch.testing.assert_close(fsr.fsr_loss(FINAL, [heads], Y, 1.0, 0.0, "uniform")[0], expected)


def test_fsr_loss_is_zero_for_the_vanilla_backbone():
    loss, parts = fsr.fsr_loss(FINAL, [], Y)
    assert loss.item() == 0 and parts == {}


# =============================================================================================
# 7. Ablation flags
# =============================================================================================

def test_no_separation_recalibrates_everything():
    module, f = fresh_fsr(separation=False), feature()
    with torch.no_grad():
        out, heads = module(f)
        torch.testing.assert_close(out, f + module.recalibration(f))
    assert "robust" not in heads and "non_robust" not in heads and "recalibrated" in heads
    assert torch.all(heads["mask"] == 0)


def test_no_recalibration_outputs_the_robust_part_only():
    module, f = fresh_fsr(recalibration=False), feature()
    with torch.no_grad():
        out, heads = module(f)
        torch.testing.assert_close(out, module.mask(module.separation(f)) * f)
    assert "recalibrated" not in heads and "robust" in heads and "non_robust" in heads


@pytest.mark.parametrize("training", [False, True])
def test_binary_mask_is_sigmoid_r_at_least_one_half(training):
    module = fresh_fsr(binary_mask=True).train(training)
    r = 3 * feature()
    m = module.mask(r)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, (torch.sigmoid(r) >= 0.5).float())


@pytest.mark.parametrize("flag, check", [
    ("no_separation", lambda m: m.separation is None and m.recalibration is not None),
    ("no_recalibration", lambda m: m.recalibration is None and m.separation is not None),
    ("binary_mask", lambda m: m.binary_mask),
])
def test_ablation_flags_reach_the_module(flag, check):
    net = build(dataset="synthetic", synthetic_shape="3,16,16", **{flag: True})
    (module,) = net.inserted.values()
    assert check(module)


def test_two_positions_give_two_modules_in_forward_order():
    net = build(model="resnet18", positions="layer3,layer4").eval()
    assert [m.head.in_features for m in net.inserted.values()] == [256, 512]
    with torch.no_grad():
        logits, emitted = net(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [tuple(e["mask"].shape) for e in emitted] == [(2, 256, 8, 8), (2, 512, 4, 4)]


# =============================================================================================
# 8. The training attack
# =============================================================================================

def attack_setup():
    args = fsr.resolve(fsr.Args(dataset="synthetic", synthetic_shape="3,16,16", strategy="at", attack_steps=3))
    torch.manual_seed(0)
    model = fsr.build_network(args)
    model.train()
    with torch.no_grad():  # give BatchNorm running statistics that differ from batch statistics
        for _ in range(3):
            model(torch.rand(32, 3, 16, 16) * 0.5 + 0.3)
    x, y = torch.rand(16, 3, 16, 16), torch.arange(16) % 10
    return args, model, x, y


def test_training_attack_uses_eval_mode_and_changes_nothing():
    args, model, x, y = attack_setup()
    results = []
    for training in (True, False):
        model.train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(123)
        results.append(fsr.craft_adversarial(model, x, y, args, 0, fsr.attack_loss(args)))
        assert all(m.training == training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(results[0], results[1])
    assert (results[0] - x).abs().max() <= args.epsilon + 1e-6


def test_training_attack_sees_the_deterministic_mask_and_final_logits_only():
    args, model, x, y = attack_setup()
    (module,) = model.inserted.values()
    seen = []
    hook = module.register_forward_hook(lambda mod, inputs, output: seen.append((inputs[0].detach(), output[1]["mask"].detach())))
    torch.manual_seed(5)
    x_adv = fsr.craft_adversarial(model, x, y, args, 0, fsr.attack_loss(args))
    hook.remove()
    assert len(seen) == args.attack_steps
    module.eval()
    with torch.no_grad():
        for f, mask in seen:
            torch.testing.assert_close(mask, torch.sigmoid(module.separation(f) / args.tau), atol=1e-4, rtol=0)
    model.eval()
    with torch.no_grad():
        loss_clean = F.cross_entropy(model(x)[0], y)
        loss_adv = F.cross_entropy(model(x_adv)[0], y)
    assert loss_adv > loss_clean


REFERENCE_ATTACKS = {  # each strategy's own attack, on a logits-only view (the auxiliary heads cannot enter)
    "natural": lambda model, x, y, a: x,
    "at": lambda model, x, y, a: attacks.pgd(model, x, y, a.epsilon, a.attack_step_size, a.attack_steps,
                                             random_start_kind="uniform"),
    "trades": lambda model, x, y, a: attacks.trades_attack(model, x, a.epsilon, a.attack_step_size, a.attack_steps),
    "mart": lambda model, x, y, a: attacks.pgd(model, x, y, a.epsilon, a.attack_step_size, a.attack_steps,
                                               random_start_kind="normal"),
    "fat": lambda model, x, y, a: attacks.fat_attack(model, x, y, a.epsilon, a.attack_step_size, a.attack_steps,
                                                     tau=2),
}


@pytest.mark.parametrize("strategy", list(REFERENCE_ATTACKS))
def test_training_attack_is_the_strategy_attack_on_the_final_logits(strategy):
    args, model, x, y = attack_setup()
    args = dataclasses.replace(args, strategy=strategy, epochs=4)
    torch.manual_seed(7)
    x_adv = fsr.craft_adversarial(model, x, y, args, 3, fsr.attack_loss(args))  # epoch 4 of 4: FAT's tau = 2
    torch.manual_seed(7)
    expected = REFERENCE_ATTACKS[strategy](attacks.LogitsOnly(model), x, y, args)
    assert torch.equal(x_adv, expected)


# =============================================================================================
# 9. Short runs learn
# =============================================================================================

@pytest.mark.parametrize("no_fsr", [False, True], ids=["fsr", "vanilla"])
@pytest.mark.parametrize("strategy", ["natural", "at", "trades", "mart", "fat"])
def test_short_run_learns_and_writes_its_files(tmp_path, strategy, no_fsr):
    # Epochs 1-2 at lr 0.05, epoch 3 at 0.005, epoch 4 at 0.0005 (milestones 2,3: MultiStepLR). In eval mode FSR's mask
    # sigmoid(r / 0.1) is a sharp threshold, so its accuracy needs BatchNorm running statistics
    # that match the final weights: the nearly frozen last epoch gives them (without it, eval-mode
    # accuracy of FSR runs swings between 0.2 and 1.0 from one epoch to the next).
    args = fsr.Args(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=800, val_size=100, device="cpu",
                    strategy=strategy, no_fsr=no_fsr, epochs=4, lr=0.05, milestones="2,3", batch_size=32,
                    attack_steps=2, eval_every=4, eval_steps=2, log_interval=1e9, runs_dir=str(tmp_path),
                    run_name="run", monitor_size=50)
    metrics = fsr.train(args, **QUIET)
    assert metrics["epoch"] == 4 and metrics["lr"] == pytest.approx(0.0005)
    assert metrics["val_clean"] > 0.5  # chance is 0.1; the runs reach about 0.97-1.0
    assert 0 <= metrics["monitor_robust"] <= metrics["monitor_clean"] <= 1
    run = tmp_path / "run"
    assert {"args.json", "metrics.jsonl", "last.pt", "best.pt"} <= set(os.listdir(run)) <= \
        {"args.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    saved = json.loads((run / "args.json").read_text())
    assert (saved["strategy"], saved["no_fsr"], saved["model"]) == (strategy, no_fsr, "smallcnn")
    checkpoint = run_support.load_checkpoint(str(run / "last.pt"), "fsr")
    assert any(key.startswith("inserted.") for key in checkpoint["model"]) != no_fsr


# =============================================================================================
# 10-12. Checkpoints, resume and refusals
# =============================================================================================

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The folder of a finished one-epoch run."""
    root = tmp_path_factory.mktemp("tiny")
    fsr.train(tiny_args(root), **QUIET)
    return root / "tiny"


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def interrupt_after_epoch(n):
    # The epoch summary line is logged after that epoch's last.pt and metrics line are written.
    def log(line):
        if line.startswith(f"epoch {n}/"):
            raise Interrupt
    return log


def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    # AT + FSR draws random numbers in the attack (random start) and in the train-mode mask.
    settings = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=250, val_size=50, device="cpu",
                    strategy="at", attack_steps=1, epochs=3, milestones="2", eval_every=2, eval_steps=1,
                    batch_size=50, log_interval=1e9, runs_dir=str(tmp_path), monitor_size=20)
    fsr.train(fsr.Args(run_name="a", **settings), **QUIET)
    with pytest.raises(Interrupt):
        fsr.train(fsr.Args(run_name="b", **settings), log=interrupt_after_epoch(2))
    assert run_support.load_checkpoint(str(tmp_path / "b" / "last.pt"), "fsr")["epoch"] == 2
    fsr.train(fsr.Args(resume=str(tmp_path / "b" / "last.pt"), device="cpu"), **QUIET)
    a = run_support.load_checkpoint(str(tmp_path / "a" / "last.pt"), "fsr")
    b = run_support.load_checkpoint(str(tmp_path / "b" / "last.pt"), "fsr")
    assert a["epoch"] == b["epoch"] == 3
    assert state_dicts_equal(a["model"], b["model"])
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_checkpoint_of_another_method_is_refused(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "last.pt", weights_only=True)
    checkpoint["method"] = "cifs"
    torch.save(checkpoint, tmp_path / "cifs.pt")
    with pytest.raises(run_support.CheckpointError, match="cifs"):
        run_support.load_checkpoint(str(tmp_path / "cifs.pt"), "fsr")
    with pytest.raises(SystemExit) as exit_info:
        fsr.main(["--resume", str(tmp_path / "cifs.pt")])
    assert str(exit_info.value.code).startswith("error:") and "cifs" in str(exit_info.value.code)


def test_truncated_checkpoint_is_refused_with_a_clear_message(tiny_run, tmp_path):
    data = (tiny_run / "last.pt").read_bytes()
    truncated = tmp_path / "last.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(run_support.CheckpointError, match="truncated|unreadable"):
        run_support.load_checkpoint(str(truncated), "fsr")
    with pytest.raises(SystemExit) as exit_info:
        fsr.main(["--resume", str(truncated)])
    assert str(exit_info.value.code).startswith("error:")


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_support.load_checkpoint(str(tmp_path / "nothing.pt"), "fsr")
    with pytest.raises(SystemExit) as exit_info:
        fsr.main(["--resume", str(tmp_path / "nothing.pt")])
    assert str(exit_info.value.code).startswith("error:")


def test_epsilon_in_pixel_units_is_refused(tmp_path):
    with pytest.raises(ValueError, match="8/255"):
        fsr.train(tiny_args(tmp_path, epsilon=8.0), **QUIET)
    with pytest.raises(SystemExit) as exit_info:
        fsr.main(["--dataset", "synthetic", "--device", "cpu", "--epsilon", "8", "--runs-dir", str(tmp_path)])
    assert str(exit_info.value.code).startswith("error:") and "8/255" in str(exit_info.value.code)
    assert list(tmp_path.iterdir()) == []  # refused before any run folder exists


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cifar11"], "--dataset: invalid choice: 'cifar11'"),
    (["--dataset", "synthetic", "--model", "resnet99"], "--model: invalid choice: 'resnet99'"),
])
def test_unknown_dataset_or_model_is_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        fsr.main(flags + ["--device", "cpu", "--runs-dir", str(tmp_path)])
    assert str(exit_info.value.code).startswith("error:") and message in str(exit_info.value.code)
    assert list(tmp_path.iterdir()) == []  # no half-made run folder


def test_new_run_in_a_folder_with_a_run_is_refused(tiny_run):
    before = {name: (tiny_run / name).read_bytes() for name in ("last.pt", "args.json", "metrics.jsonl")}
    with pytest.raises(FileExistsError):
        fsr.train(tiny_args(tiny_run.parent), **QUIET)
    assert {name: (tiny_run / name).read_bytes() for name in before} == before


# =============================================================================================
# 13. Command line and defaults
# =============================================================================================

def test_kebab_case_flags_map_to_fields():
    args = run_support.parse_args(fsr.Args, ["--no-fsr", "--lambda-sep", "0.5", "--lambda-rec", "2", "--y-prime", "uniform",
                           "--attack-step-size", "0.01", "--synthetic-shape", "1,8,8", "--no-separation"])
    assert args.no_fsr and args.no_separation and not args.no_recalibration
    assert (args.lambda_sep, args.lambda_rec, args.y_prime) == (0.5, 2.0, "uniform")
    assert (args.attack_step_size, args.synthetic_shape) == (0.01, "1,8,8")


def test_fp32_by_default_and_amp_opt_in():
    assert run_support.parse_args(fsr.Args, []).amp is False and fsr.device_settings(fsr.resolve(fsr.Args(device="cpu")))[1] is False
    assert run_support.parse_args(fsr.Args, ["--amp"]).amp is True


def test_no_flags_give_the_dataclass_defaults():
    assert run_support.parse_args(fsr.Args, []) == fsr.Args()


def test_cifar10_defaults():
    args = fsr.resolve(run_support.parse_args(fsr.Args, []))
    assert (args.model, args.epochs, args.lr, args.weight_decay, args.milestones) == ("resnet18", 100, 0.1, 5e-4, "74,89")
    assert (args.val_size, args.amp, args.random_start, args.positions) == (0, False, True, "layer4")
    assert (args.attack_steps, args.augment) == (10, "crop_flip")
    assert args.epsilon == pytest.approx(8 / 255) and args.attack_step_size == pytest.approx(2 / 255)
    assert list(fsr.build_network(args).inserted) == ["layer4_1"]  # after the last block


def test_svhn_defaults():
    args = fsr.resolve(run_support.parse_args(fsr.Args, ["--dataset", "svhn"]))
    assert (args.lr, args.augment) == (0.01, "none")
    assert args.attack_step_size == pytest.approx(1 / 255)  # eps / 8


def test_fmnist_defaults():
    args = fsr.resolve(run_support.parse_args(fsr.Args, ["--dataset", "fmnist"]))
    assert (args.model, args.attack_steps) == ("resnet10", 20)
    assert args.epsilon == pytest.approx(0.3) and args.attack_step_size == pytest.approx(0.02)


def test_vgg16_default_position_is_stage4():
    assert fsr.resolve(run_support.parse_args(fsr.Args, ["--model", "vgg16"])).positions == "stage4"


def test_explicit_flags_override_dataset_defaults():
    args = fsr.resolve(run_support.parse_args(fsr.Args, ["--dataset", "svhn", "--model", "vgg16", "--lr", "0.05", "--epochs", "7",
                                       "--augment", "crop_flip", "--epsilon", "0.02", "--attack-step-size", "0.004",
                                       "--attack-steps", "3", "--milestones", "5", "--positions", "stage3"]))
    assert (args.model, args.lr, args.epochs, args.augment) == ("vgg16", 0.05, 7, "crop_flip")
    assert (args.epsilon, args.attack_step_size, args.attack_steps) == (0.02, 0.004, 3)
    assert (args.milestones, args.positions) == ("5", "stage3")


def test_eps_relative_step_follows_an_explicit_epsilon():
    assert fsr.resolve(run_support.parse_args(fsr.Args, ["--epsilon", "0.04"])).attack_step_size == pytest.approx(0.01)


def official_fsr_learning_rate(epoch: int, lr: float = 0.1) -> float:
    """The official train.py's adjust_learning_rate, called with the 1-indexed epoch (re-written here)."""
    if epoch >= 90:
        return lr * 0.01
    if epoch >= 75:
        return lr * 0.1
    return lr


def test_learning_rate_of_every_epoch_is_the_official_fsr_rule():
    args = fsr.resolve(fsr.Args(dataset="cifar10"))
    ours = [fsr.learning_rate(args, epoch) for epoch in range(args.epochs)]
    # our 0-indexed epoch e is the official 1-indexed epoch e + 1
    assert ours == pytest.approx([official_fsr_learning_rate(epoch + 1) for epoch in range(100)])
    assert sum(lr == pytest.approx(0.1) for lr in ours) == 74  # FSR trains 74 epochs at 0.1
    assert sum(lr == pytest.approx(0.01) for lr in ours) == 15


# =============================================================================================
# 14-15. Import, --help
# =============================================================================================

def test_importing_fsr_runs_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", "import fsr"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_help_lists_kebab_case_flags(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "fsr.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for flag in ("--no-fsr", "--lambda-sep", "--y-prime", "--no-separation", "--binary-mask", "--runs-dir",
                 "--amp", "--resume", "--train-size", "--val-size", "--monitor-size"):
        assert flag in done.stdout
    assert "--no_fsr" not in done.stdout and "--lambda_sep" not in done.stdout
    assert "--benchmark" not in done.stdout  # timing lives in benchmarks/speed.py
    assert "(default: None)" not in done.stdout and "(default: False)" not in done.stdout
    assert "resnet18,resnet10,resnet50,vgg16,wrn34_10,wrn28_10,smallcnn" in done.stdout  # the valid backbones
