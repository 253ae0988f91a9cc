"""Properties of every attack in attacks.py; each test can fail."""

import math

import pytest
import torch
import torch.nn.functional as F

import attacks
from conftest import EPS, SHAPE, accuracy
from models import build_model

STEP = EPS / 4


def every_attack(model, x, y, eps=EPS):
    """name -> x_adv for every attack of attacks.py, with small settings."""
    return {
        "fgsm": attacks.fgsm(model, x, y, eps),
        "pgd": attacks.pgd(model, x, y, eps, STEP, 5),
        "pgd_restarts": attacks.pgd(model, x, y, eps, STEP, 3, restarts=2),
        "pgd_cw": attacks.pgd(model, x, y, eps, STEP, 5, loss_fn=attacks.cw_loss, random_start_kind=None),
        "trades": attacks.trades_attack(model, x, eps, STEP, 5),
        "mart": attacks.mart_attack(model, x, y, eps, STEP, 5),
        "fat": attacks.fat_attack(model, x, y, eps, STEP, 5, tau=1),
        "fat_kl": attacks.fat_attack(model, x, y, eps, STEP, 5, tau=2, loss="kl", random_start_kind="normal"),
        "ti_fgsm": attacks.ti_fgsm(model, x, y, eps),
        "ti_i_fgsm": attacks.ti_i_fgsm(model, x, y, eps, steps=3),
        "di_fgsm": attacks.di_fgsm(model, x, y, eps, steps=3, prob=1.0),
        "di_fgsm_shrink": attacks.di_fgsm(model, x, y, eps, steps=3, prob=1.0, resize_rate=attacks.DI_SHRINK_RATE,
                                          interpolation="bilinear"),
        "nattack": attacks.nattack(model, x, y, eps, max_queries=200, population=20)[0],
        "autoattack": attacks.autoattack(model, x, y, eps, version="custom", attacks=["apgd-ce"])[0],
        "autoattack_cifs": attacks.autoattack_cifs(model, x, y, eps, attacks.cross_entropy_loss, n_restarts=1,
                                                   n_iter=3, n_queries=10)[0],
    }


def model_state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


# --- the threat model -------------------------------------------------------------------------

def test_every_attack_stays_in_the_ball_and_the_image_box(robust_model, synthetic):
    x, y = synthetic[2][:32], synthetic[3][:32]
    for name, x_adv in every_attack(robust_model, x, y).items():
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, name
        assert (x_adv - x).abs().max() <= EPS + 1e-6, name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name
        assert not x_adv.requires_grad, name


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_every_attack_leaves_modes_bn_statistics_and_requires_grad_untouched(robust_model, synthetic, mode):
    model = robust_model.train() if mode != "eval" else robust_model.eval()
    if mode == "mixed":
        model.conv2.eval()  # a per-module mode that a plain model.train() afterwards would lose
        model.classifier.weight.requires_grad_(False)
    before = model_state(model)
    every_attack(model, synthetic[2][:16], synthetic[3][:16])
    after = model_state(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert before[2].keys() == after[2].keys()
    for key in before[2]:  # BatchNorm running_mean / running_var / num_batches_tracked, weights
        assert torch.equal(before[2][key], after[2][key]), key
    assert all(p.grad is None for p in model.parameters())  # input-only gradients


def test_attack_mode_restores_state_after_an_exception(robust_model):
    robust_model.train()
    with pytest.raises(RuntimeError):
        with attacks.attack_mode(robust_model):
            assert not robust_model.training
            assert not any(p.requires_grad for p in robust_model.parameters())
            raise RuntimeError
    assert robust_model.training and all(p.requires_grad for p in robust_model.parameters())


def test_epsilon_in_pixel_units_is_refused(robust_model, synthetic):
    with pytest.raises(ValueError, match="8/255"):
        attacks.pgd(robust_model, synthetic[2][:2], synthetic[3][:2], 8, 2, 10)


# --- closed forms and determinism ---------------------------------------------------------------

def test_fgsm_equals_its_closed_form(robust_model, synthetic):
    x, y = synthetic[2][:32], synthetic[3][:32]
    robust_model.eval()
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(robust_model(x_req)[0], y, reduction="sum"), x_req)
    expected = (x + EPS * grad.sign()).clamp(0, 1)
    assert torch.equal(attacks.fgsm(robust_model, x, y, EPS), expected)


def test_cw_margin_matches_a_hand_computation():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 5.0, -1.0]])
    y = torch.tensor([0, 2])
    # example 0: -(3 - 2.5 + 50); example 1: -(-1 - 5 + 50)
    assert torch.allclose(attacks.cw_margin(logits, y), torch.tensor([-50.5, -44.0]))
    assert torch.allclose(attacks.cw_margin(logits, y, kappa=0.0), torch.tensor([-0.5, 0.0]))


def test_pgd_without_random_start_is_deterministic(robust_model, synthetic):
    x, y = synthetic[2][:32], synthetic[3][:32]
    first = attacks.pgd(robust_model, x, y, EPS, EPS / 10, 10, random_start_kind=None)
    torch.manual_seed(123)  # the global RNG must not matter
    second = attacks.pgd(robust_model, x, y, EPS, EPS / 10, 10, random_start_kind=None)
    assert torch.equal(first, second)


def test_loss_rises_along_pgd(robust_model, synthetic):
    x, y = synthetic[2][:200], synthetic[3][:200]
    losses = []
    for steps in (0, 1, 2, 5, 10, 20):
        x_adv = attacks.pgd(robust_model, x, y, EPS, EPS / 10, steps, random_start_kind=None)
        with torch.no_grad():
            losses.append(F.cross_entropy(robust_model(x_adv)[0], y).item())
    assert all(later > earlier for earlier, later in zip(losses, losses[1:])), losses


def test_restarts_keep_the_worst_case_per_example(robust_model, synthetic):
    x, y = synthetic[2][:64], synthetic[3][:64]
    torch.manual_seed(7)
    combined = attacks.pgd(robust_model, x, y, EPS, STEP, 2, restarts=3)
    torch.manual_seed(7)  # the same random starts, one restart at a time
    runs = [attacks.pgd(robust_model, x, y, EPS, STEP, 2) for _ in range(3)]
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(robust_model(r)[0], y, reduction="none") for r in runs])
        fooled = torch.stack([robust_model(r)[0].argmax(1) != y for r in runs])
        final_fooled = robust_model(combined)[0].argmax(1) != y
        final_loss = F.cross_entropy(robust_model(combined)[0], y, reduction="none")
    assert torch.equal(final_fooled, fooled.any(0))
    # Among the restarts with the best fooled-status, the kept one has the highest loss.
    best_loss = torch.where(fooled == final_fooled, losses, torch.full_like(losses, -math.inf)).amax(0)
    assert torch.allclose(final_loss, best_loss, atol=1e-5)
    assert fooled.float().sum(1).max() <= final_fooled.sum()


def test_attack_under_bf16_autocast_keeps_the_threat_model(robust_model, synthetic):
    x, y = synthetic[2][:32], synthetic[3][:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attacks.pgd(robust_model, x, y, EPS, STEP, 5)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert accuracy(robust_model, x_adv, y) < accuracy(robust_model, x, y)


# --- an adversarially trained model behaves as robustness theory says ---------------------------

def test_robust_model_learned_and_loses_accuracy_under_pgd(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    clean = accuracy(robust_model, x, y)
    pgd = accuracy(robust_model, attacks.pgd(robust_model, x, y, EPS, EPS / 10, 20, random_start_kind=None), y)
    assert clean > 0.6, clean  # chance is 0.1
    assert 0.0 < pgd < clean - 0.05, (clean, pgd)


def test_more_steps_and_larger_eps_hurt_more(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    def robust_accuracy(eps, steps):
        x_adv = attacks.pgd(robust_model, x, y, eps, eps / 4, steps, random_start_kind=None)
        return accuracy(robust_model, x_adv, y)
    by_steps = [robust_accuracy(EPS, steps) for steps in (1, 3, 10)]
    by_eps = [robust_accuracy(eps, 10) for eps in (2 / 255, 8 / 255, 16 / 255, 32 / 255)]
    assert by_steps[0] > by_steps[1] >= by_steps[2], by_steps
    assert all(a > b for a, b in zip(by_eps, by_eps[1:]) if a > 0), by_eps


def test_unbounded_attack_reaches_zero_accuracy(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    x_adv = attacks.pgd(robust_model, x, y, 1.0, 0.05, 50, random_start_kind=None)
    assert accuracy(robust_model, x_adv, y) == 0.0


def test_one_step_does_not_beat_iterative(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    fgsm = accuracy(robust_model, attacks.fgsm(robust_model, x, y, EPS), y)
    pgd = accuracy(robust_model, attacks.pgd(robust_model, x, y, EPS, EPS / 10, 20, random_start_kind=None), y)
    assert pgd <= fgsm


def test_autoattack_is_at_least_as_strong_as_pgd20(robust_model, synthetic):
    # AutoAttack's two white-box attacks (APGD-CE, APGD-T) on 40 points, as a 'custom' run: the
    # standard version adds FAB-T and Square on the points still robust, which can only lower its
    # accuracy further, and costs minutes of Square queries on the CPU.
    x, y = synthetic[2][:40], synthetic[3][:40]
    x_aa, warnings = attacks.autoattack(robust_model, x, y, EPS, version="custom", attacks=["apgd-ce", "apgd-t"],
                                        seed=0)
    x_pgd = attacks.pgd(robust_model, x, y, EPS, EPS / 10, 20, random_start_kind=None)
    aa, pgd = accuracy(robust_model, x_aa, y), accuracy(robust_model, x_pgd, y)
    assert (x_aa - x).abs().max() <= EPS + 1e-6
    assert aa <= pgd, (aa, pgd)
    assert aa < accuracy(robust_model, x, y)
    assert isinstance(warnings, list)


def test_autoattack_dynamic_flag_belongs_to_the_model_at_hand(robust_model, synthetic):
    """pyautoattack's dynamic-defence check counts gradient calls in a module-level counter it never
    resets: without attacks.reset_dynamic_check, a plain model checked after one that takes a gradient
    in its forward (as CIFS did before its relevance had a closed form) is flagged."""
    class GradientInForward(torch.nn.Module):
        def forward(self, z, labels=None):
            with torch.enable_grad():
                v = z.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(v.square().sum(), v)
            return z + 0 * g, {}

    cifs_model = build_model("smallcnn", 10, SHAPE)
    cifs_model.insert("conv3", GradientInForward())
    cifs_model.eval()
    x = synthetic[2][:4]

    def flags(model):  # wrong labels: no point is robust, so AutoAttack runs its checks and stops
        with torch.no_grad():
            wrong = (model(x)[0].argmax(1) + 1) % 10
        warnings = attacks.autoattack(model, x, wrong, EPS, version="custom", attacks=["apgd-ce"])[1]
        return any("dynamic defense" in w for w in warnings)

    assert [flags(robust_model), flags(cifs_model), flags(robust_model)] == [False, True, False]


def test_autoattack_view_sees_logits_only(robust_model):
    view = attacks.LogitsOnly(robust_model)
    out = view(torch.rand(3, 3, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)


# --- the training attacks ---------------------------------------------------------------------

def test_trades_attack_increases_the_kl_to_the_clean_prediction(robust_model, synthetic):
    x = synthetic[2][:100]
    with torch.no_grad():
        clean = F.softmax(robust_model(x)[0], 1)
    def kl(inputs):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(robust_model(inputs)[0], 1), clean, reduction="batchmean").item()
    torch.manual_seed(0)
    start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    assert kl(attacks.trades_attack(robust_model, x, EPS, STEP, 10)) > 10 * kl(start)


def saturated(x: torch.Tensor) -> torch.Tensor:
    """Images with exact 0 and exact 1 pixels (a dark top band, a white bottom band), as CIFAR-10 and SVHN have."""
    x = x.clone()
    x[:, :, :3, :] = 0.0
    x[:, :, -3:, :] = 1.0
    return x


def official_trades_mart_attack(model, x, y, eps, step, steps, loss):
    """The inner loop of yaodongyu/TRADES trades.py and YisenWang/MART mart.py, written out:
    x_adv = x + 0.001 * randn (no clipping), then `steps` times: sign step on the loss (TRADES: KL
    summed, against softmax(model(x)) recomputed each step; MART: mean CE), min/max into the
    eps-ball, clamp to [0, 1]."""
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            logits = model(x_adv)[0]
            if loss == "trades":
                value = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(model(x)[0], dim=1), reduction="sum")
            else:
                value = F.cross_entropy(logits, y)
        grad = torch.autograd.grad(value, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("strategy", ["trades", "mart"])
def test_trades_and_mart_start_unclipped_and_their_iterates_equal_the_official_rule(robust_model, synthetic, strategy):
    x, y = saturated(synthetic[2][:64]), synthetic[3][:64]
    assert (x == 0).any() and (x == 1).any()
    robust_model.eval()

    def ours(steps, seed=5):
        torch.manual_seed(seed)
        if strategy == "trades":
            return attacks.trades_attack(robust_model, x, EPS, STEP, steps)
        return attacks.mart_attack(robust_model, x, y, EPS, STEP, steps)

    # The start itself leaves the box on saturated pixels (x + 0.001 N, no clipping).
    torch.manual_seed(5)
    start = attacks.random_start(x, EPS, "normal")
    torch.manual_seed(5)
    assert torch.equal(start, x + 0.001 * torch.randn(x.shape))
    assert start.min() < 0 and start.max() > 1
    for steps in (1, 2, 5):
        torch.manual_seed(5)
        official = official_trades_mart_attack(robust_model, x, y, EPS, STEP, steps, strategy)
        assert (ours(steps) - official).abs().max() <= 1e-6, steps
    # The test can tell the two starts apart: from the clipped start (the former rule) some
    # examples end elsewhere after one step.
    torch.manual_seed(5)
    clipped = attacks.project(x + 0.001 * torch.randn(x.shape), attacks.ball(x, EPS))
    with attacks.attack_mode(robust_model):
        clipped.requires_grad_(True)
        value = (F.kl_div(F.log_softmax(robust_model(clipped)[0], 1), F.softmax(robust_model(x)[0], 1), reduction="sum")
                 if strategy == "trades" else F.cross_entropy(robust_model(clipped)[0], y))
        (grad,) = torch.autograd.grad(value, clipped)
    former = attacks.project(clipped.detach() + STEP * grad.sign(), attacks.ball(x, EPS))
    assert (ours(1) - former).abs().amax(dim=(1, 2, 3)).gt(1e-6).any()


def test_fat_keeps_its_clipped_start():
    """FAT's earlystop clamps its start to [0, 1] for either kind: zero steps return it."""
    model = build_model("smallcnn", 10, SHAPE).eval()
    x = saturated(torch.rand(4, *SHAPE))
    y = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    out = attacks.fat_attack(model, x, y, EPS, STEP, 0, tau=0, random_start_kind="normal", omega=0.0)
    torch.manual_seed(0)
    assert torch.equal(out, (x + 0.001 * torch.randn(x.shape)).clamp(0.0, 1.0))


def test_fat_with_unlimited_tau_and_no_noise_is_pgd(robust_model, synthetic):
    x, y = synthetic[2][:64], synthetic[3][:64]
    fat = attacks.fat_attack(robust_model, x, y, EPS, STEP, 10, tau=1000, random_start_kind=None, omega=0.0)
    pgd = attacks.pgd(robust_model, x, y, EPS, STEP, 10, random_start_kind=None)
    assert torch.equal(fat, pgd)


def test_fat_freezes_examples_once_misclassified_with_tau_zero(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    with torch.no_grad():
        wrong_at_start = robust_model(x)[0].argmax(1) != y
    assert wrong_at_start.any() and not wrong_at_start.all()
    fat = attacks.fat_attack(robust_model, x, y, EPS, STEP, 10, tau=0, random_start_kind=None, omega=0.0)
    assert torch.equal(fat[wrong_at_start], x[wrong_at_start])  # never moved
    assert (fat[~wrong_at_start] != x[~wrong_at_start]).any()
    # tau=0 stops each example at its first misclassified iterate: it stays misclassified
    # unless the final step budget ran out first.
    with torch.no_grad():
        wrong_after = robust_model(fat)[0].argmax(1) != y
    pgd_wrong = robust_model(attacks.pgd(robust_model, x, y, EPS, STEP, 10, random_start_kind=None))[0].argmax(1) != y
    assert wrong_after.sum() >= 0.8 * pgd_wrong.sum()


def test_fat_tau_makes_examples_stronger(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    def margin(tau):  # mean C&W margin of the true class: lower = more adversarial
        x_adv = attacks.fat_attack(robust_model, x, y, EPS, STEP, 10, tau=tau, random_start_kind=None, omega=0.0)
        with torch.no_grad():
            return -attacks.cw_margin(robust_model(x_adv)[0], y, kappa=1e6).mean().item()
    assert margin(0) > margin(2) > margin(1000) - 1e-6


# --- transfer and query attacks -------------------------------------------------------------------

def test_gaussian_kernel_is_normalised_and_symmetric():
    kernel = attacks.gaussian_kernel(7)
    assert kernel.shape == (7, 7) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0))
    assert kernel[3, 3] == kernel.max()


def test_ti_fgsm_is_one_step_of_the_smoothed_gradient_sign(robust_model, synthetic):
    x, y = synthetic[2][:16], synthetic[3][:16]
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(robust_model.eval()(x_req)[0], y, reduction="sum"), x_req)
    kernel = attacks.gaussian_kernel(5).expand(3, 1, 5, 5)
    smoothed = F.conv2d(grad, kernel, padding=2, groups=3)
    expected = (x + EPS * smoothed.sign()).clamp(0, 1)
    assert torch.equal(attacks.ti_fgsm(robust_model, x, y, EPS, kernel_size=5), expected)
    assert not torch.equal(expected, (x + EPS * grad.sign()).clamp(0, 1))  # the smoothing matters
    iterative = attacks.ti_i_fgsm(robust_model, x, y, EPS, steps=1, step_size=EPS, kernel_size=5)
    assert torch.equal(iterative, expected)  # one step of size eps is the same attack


def test_input_diversity_follows_the_di_paper_and_torchattacks():
    x = torch.ones(2, 3, 32, 32)
    assert torch.equal(attacks.input_diversity(x, prob=0.0), x)
    torch.manual_seed(0)
    sizes = set()
    for _ in range(60):  # DI paper: resize to rnd in [32, floor(32 * 330/299) = 35), pad to 35
        out = attacks.input_diversity(x, prob=1.0)
        assert out.shape == (2, 3, 35, 35)
        side = math.isqrt(int(out[0, 0].sum()))
        assert side * side == int(out[0, 0].sum())  # one square block of ones, zeros around it
        sizes.add(side)
    assert sizes == {32, 33, 34}
    sizes = set()
    for _ in range(60):  # torchattacks: shrink to rnd in [floor(0.9 * 32) = 28, 32), pad back to 32
        out = attacks.input_diversity(x, prob=1.0, resize_rate=attacks.DI_SHRINK_RATE, interpolation="bilinear")
        assert out.shape == x.shape
        sizes.add(int((out[0, 0] > 0.5).any(1).sum()))
    assert sizes == {28, 29, 30, 31}


def test_transfer_attacks_fool_the_source_model(robust_model, synthetic):
    x, y = synthetic[2], synthetic[3]
    clean = accuracy(robust_model, x, y)
    for attack in (attacks.ti_fgsm, attacks.ti_i_fgsm, attacks.di_fgsm):
        assert accuracy(robust_model, attack(robust_model, x, y, EPS), y) < clean - 0.05, attack.__name__


def test_nattack_respects_its_query_budget_and_reports_honestly(robust_model, synthetic):
    x, y = synthetic[2][:40], synthetic[3][:40]
    torch.manual_seed(0)
    x_adv, success, queries = attacks.nattack(robust_model, x, y, EPS, max_queries=250, population=30)
    assert (queries <= 250).all() and (queries >= 1).all()
    with torch.no_grad():
        wrong = robust_model(x_adv)[0].argmax(1) != y
        wrong_clean = robust_model(x)[0].argmax(1) != y
    assert torch.equal(success, wrong)               # success means the returned image fools it
    assert (queries[wrong_clean] == 1).all()          # already wrong: one query to notice
    assert (queries[~success] > 250 - 30).all()       # failures spent (almost) all the budget
    assert success.float().mean() > wrong_clean.float().mean()  # it breaks some correct ones


def test_nattack_with_a_tiny_budget_never_exceeds_it(robust_model, synthetic):
    x, y = synthetic[2][:8], synthetic[3][:8]
    _, _, queries = attacks.nattack(robust_model, x, y, EPS, max_queries=5, population=10)
    assert (queries <= 5).all()
