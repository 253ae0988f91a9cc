"""L-infinity attacks used for adversarial training and evaluation by cifs.py, fsr.py, evaluate.py.

Conventions:
  * images are in [0, 1]; every attack returns x_adv with ||x_adv - x||_inf <= eps and
    x_adv in [0, 1]; eps is in image units (8/255, not 8);
  * the model may return logits or `(logits, aux)`; losses receive the raw output, so a method
    can attack a joint loss (CIFS, Eq. 3) while the default losses look only at the logits;
  * every attack runs inside `attack_mode(model)`: eval mode (BatchNorm running statistics are
    used and never updated), gradients w.r.t. the input only (`torch.autograd.grad(loss, x_adv)`,
    or frozen parameters for code that calls backward()); the exact previous state is restored after;
  * attacks do not enable autocast themselves: call them inside `torch.autocast(...)` to attack
    in bf16. Losses are computed in fp32 either way.

Contents: losses (CE, C&W margin, KL) · attack_mode · pgd (random start, restarts, transforms) ·
fgsm · trades_attack · mart_attack · fat_attack (FAT's early-stopped PGD) · ti_fgsm, ti_i_fgsm,
di_fgsm (transfer attacks) · nattack (query-based) · autoattack (standard AutoAttack) and
autoattack_cifs (the CIFS authors' protocol), both through `pyautoattack`, a PyPI repackaging of
the AutoAttack authors' code (fra31/auto-attack) with identical attack code.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LossFn = Callable[[object, torch.Tensor], torch.Tensor]  # (model output, labels) -> per-example loss


# ---------------------------------------------------------------------------------------------
# Model views and modes
# ---------------------------------------------------------------------------------------------


def logits_of(output) -> torch.Tensor:
    """The logits of a model output that is either logits or (logits, aux)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class LogitsOnly(nn.Module):
    """A logits-only view of a model that returns (logits, aux): for AutoAttack and transfer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return logits_of(self.model(x))


@contextlib.contextmanager
def attack_mode(model: nn.Module, freeze: bool = True):
    """Eval mode (and, with `freeze`, frozen parameters) for the duration of an attack, then the exact
    previous state back: each submodule's own `training` flag and each parameter's `requires_grad`.
    Eval mode: attacks must see BatchNorm running statistics and never update them (both authors'
    test scripts call `net.eval()` before attacking). freeze: for code that calls backward() (AutoAttack's
    FAB). Our attacks take torch.autograd.grad(loss, x_adv), input-only either way, and pass freeze=False:
    autocast caches its bf16 weight casts only for weights that require grad."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads if freeze else ():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


IMAGE_UNITS = f"budgets are in image units (pass 8/255 = {8 / 255:.5f}, not 8)"
EPSILON_RULE = f"must be in (0, 1]: {IMAGE_UNITS}"  # the scripts' --epsilon rule (run_support.RANGES)


def check_epsilon(eps: float) -> None:
    """Budgets are in image units: refuse a budget that looks like pixel units (8 for 8/255); 0 is allowed
    here (an attack of budget 0 returns x), the scripts' settings refuse it."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={eps} must be in [0, 1]: {IMAGE_UNITS}")


def ball(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper): the eps-ball around the image x within [0, 1], computed once per attack."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def project(x_adv: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Into the eps-ball and [0, 1] (bounds = ball(x, eps)), one clamp: as clipping to the ball, then the box."""
    return torch.clamp(x_adv, *bounds)


def random_start(x: torch.Tensor, eps: float, kind: str | bool | None) -> torch.Tensor:
    """'uniform': x + U(-eps, eps), projected into the ball and the box (Madry AT);
    'normal': x + 0.001 N(0, I) exactly as the TRADES and MART codes start (yaodongyu/TRADES
    trades.py, YisenWang/MART mart.py): NOT clipped to [0, 1], so on saturated pixels (0 or 1,
    common in CIFAR-10 and SVHN) the first gradient is taken slightly outside the image box; the
    first step's projection then clips, as there. (FAT's earlystop clips its start: fat_attack does.)
    None/False: x itself (the evaluation protocol of both papers: `rand_init=False` in
    wkim97/FSR test.py and HanshuYAN/CIFS CIFAR10_Res18_CIFS_test.py)."""
    if kind is True or kind == "uniform":
        return project(x + torch.empty_like(x).uniform_(-eps, eps), ball(x, eps))
    if kind == "normal":
        return x + 0.001 * torch.randn_like(x)
    if kind in (None, False, "none"):
        return x.clone()
    raise ValueError(f"unknown random start {kind!r}; use 'uniform', 'normal' or None")


# ---------------------------------------------------------------------------------------------
# Losses: per-example vectors, so that restarts can keep the worst case per example
# ---------------------------------------------------------------------------------------------


def cross_entropy_loss(output, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output).float(), y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """C&W margin loss -max(z_y - max_{j != y} z_j + kappa, 0), kappa = 50 (`_cw_loss` with
    confidence 50 in both authors' test scripts).
    Maximising it pushes the true logit below the best other one by up to kappa."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return -(true - other + kappa).clamp(min=0.0)


def cw_loss(output, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    return cw_margin(logits_of(output), y, kappa)


def kl_to(clean_probs: torch.Tensor) -> LossFn:
    """Per-example KL(p(x) || p(x')) against fixed clean probabilities (TRADES inner loss)."""
    def loss(output, _y):
        log_probs = F.log_softmax(logits_of(output).float(), dim=1)
        return F.kl_div(log_probs, clean_probs, reduction="none").sum(1)
    return loss


# ---------------------------------------------------------------------------------------------
# PGD and FGSM
# ---------------------------------------------------------------------------------------------


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, eps: float, step_size: float,
        steps: int, loss_fn: LossFn = cross_entropy_loss, random_start_kind: str | bool | None = "uniform",
        restarts: int = 1, input_transform: Callable | None = None,
        grad_transform: Callable | None = None) -> torch.Tensor:
    """Projected gradient ascent with sign steps (Madry et al. 2018) on `loss_fn(model(x'), y)`.

    restarts > 1 keeps, per example, the worst case over restarts: an example that fools the
    model beats one that does not, and otherwise the higher loss wins. `input_transform` acts on
    the input of every forward (DI-FGSM), `grad_transform` on every gradient (TI-FGSM).
    Returns a detached x_adv.
    """
    check_epsilon(eps)
    x, bounds = x.detach(), ball(x.detach(), eps)
    with attack_mode(model, freeze=False):  # autograd.grad: input-only gradients, weight casts cached
        best, best_fooled, best_loss = None, None, None
        for _ in range(restarts):
            x_adv = random_start(x, eps, random_start_kind)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                inputs = x_adv if input_transform is None else input_transform(x_adv)
                loss = loss_fn(model(inputs), y).sum()
                (grad,) = torch.autograd.grad(loss, x_adv)
                if grad_transform is not None:
                    grad = grad_transform(grad)
                x_adv = project(x_adv.detach() + step_size * grad.sign(), bounds)
            if steps == 0:  # the 'normal' start is not clipped: clip it (as TRADES and MART do after their loop)
                x_adv = x_adv.clamp(0.0, 1.0)
            if restarts == 1:
                return x_adv.detach()
            # One extra forward per restart to compare restarts on their final iterates.
            with torch.no_grad():
                output = model(x_adv)
                loss = loss_fn(output, y)
                fooled = logits_of(output).argmax(1) != y
            if best is None:
                best, best_fooled, best_loss = x_adv, fooled, loss
                continue
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(better[:, None, None, None], x_adv, best)
            best_fooled, best_loss = best_fooled | fooled, torch.where(better, loss, best_loss)
        return best.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         loss_fn: LossFn = cross_entropy_loss) -> torch.Tensor:
    """x + eps * sign(grad_x loss), clipped to [0, 1] (Goodfellow et al. 2015): one PGD step of
    size eps from x itself, for which the eps-ball projection is the identity."""
    return pgd(model, x, y, eps, step_size=eps, steps=1, loss_fn=loss_fn, random_start_kind=None)


# ---------------------------------------------------------------------------------------------
# The training attacks of TRADES, MART and FAT
# ---------------------------------------------------------------------------------------------


def trades_attack(model: nn.Module, x: torch.Tensor, eps: float, step_size: float, steps: int,
                  random_start_kind: str | None = "normal") -> torch.Tensor:
    """TRADES inner maximisation (Zhang et al. 2019): start at x + 0.001 N(0, I) (not clipped, as
    trades.py; see random_start) and ascend
    KL(p(x) || p(x')) summed over the batch. The clean distribution is computed once per batch
    (the official code recomputes it, unchanged, at every step). Without the random start the KL
    and its gradient are zero at x' = x, so the attack cannot move: keep it unless testing."""
    with attack_mode(model, freeze=False), torch.no_grad():
        clean_probs = F.softmax(logits_of(model(x)).float(), dim=1)
    return pgd(model, x, None, eps, step_size, steps, loss_fn=kl_to(clean_probs), random_start_kind=random_start_kind)


def mart_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
                steps: int) -> torch.Tensor:
    """MART inner maximisation (Wang et al. 2020): CE-PGD started at x + 0.001 N(0, I), not clipped
    (as mart.py; see random_start)."""
    return pgd(model, x, y, eps, step_size, steps, random_start_kind="normal")


def fat_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
               steps: int, tau: int, loss: str | LossFn = "ce", random_start_kind: str | None = "uniform",
               omega: float = 0.001) -> torch.Tensor:
    """FAT's early-stopped PGD (Zhang et al. 2020, Alg. 1, "PGD-K-tau").

    Before each step, an example the model already misclassifies may take `tau` more steps; once
    it is misclassified with no steps left it is frozen. Each step adds omega * N(0, I) noise
    (FAT's default 0.001). loss='ce' for FAT, 'kl' (against the clean output) for FAT-TRADES,
    or any per-example loss function (a method's joint loss).

    Difference from the official code: it drops frozen examples from the batch and returns the
    survivors reordered (with their labels); here the batch keeps its size and order (frozen
    examples simply stop moving), so the output stays aligned with `y`. The forward passes of
    frozen examples are wasted compute but keep the shapes static for the GPU and torch.compile.
    """
    check_epsilon(eps)
    x, bounds = x.detach(), ball(x.detach(), eps)
    with attack_mode(model, freeze=False):  # as pgd
        if loss == "kl":
            with torch.no_grad():
                loss_fn = kl_to(F.softmax(logits_of(model(x)).float(), dim=1))
        elif loss == "ce":
            loss_fn = cross_entropy_loss
        elif callable(loss):
            loss_fn = loss
        else:
            raise ValueError(f"unknown FAT loss {loss!r}; use 'ce' or 'kl'")
        # FAT's earlystop clamps its start to [0, 1] for either kind (zjfheart/Friendly-Adversarial-Training).
        x_adv = random_start(x, eps, random_start_kind).clamp(0.0, 1.0)
        budget = torch.full_like(y, tau)
        active = torch.ones_like(y, dtype=torch.bool)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            output = model(x_adv)
            wrong = logits_of(output).argmax(1) != y
            active &= ~(wrong & (budget <= 0))
            if not active.any():
                break
            budget = torch.where(wrong & active, budget - 1, budget)
            (grad,) = torch.autograd.grad(loss_fn(output, y).sum(), x_adv)
            stepped = x_adv.detach() + step_size * grad.sign() + omega * torch.randn_like(x)
            x_adv = torch.where(active[:, None, None, None], project(stepped, bounds), x_adv.detach())
    return x_adv.detach()


# ---------------------------------------------------------------------------------------------
# Transfer attacks (crafted on a source model, evaluated on the defence; FSR Table 3)
# ---------------------------------------------------------------------------------------------


def gaussian_kernel(size: int, nsig: float = 3.0) -> torch.Tensor:
    """A normalised size x size Gaussian spanning +-nsig standard deviations (TI-FGSM's kernel)."""
    t = torch.linspace(-nsig, nsig, size)
    g = torch.exp(-0.5 * t**2)
    kernel = torch.outer(g, g)
    return kernel / kernel.sum()


def smoothed_gradient(channels: int, kernel_size: int, like: torch.Tensor) -> Callable:
    """grad -> W * grad: each channel convolved with the normalised Gaussian W (TI, Dong et al. 2019)."""
    kernel = gaussian_kernel(kernel_size).to(like.device, like.dtype).expand(channels, 1, kernel_size, kernel_size)

    def smooth(grad):
        return F.conv2d(grad, kernel, padding=kernel_size // 2, groups=channels)
    return smooth


def ti_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, kernel_size: int = 7) -> torch.Tensor:
    """TI-FGSM (Dong et al. 2019, "Evading defenses to transferable adversarial examples by
    translation-invariant attacks"): ONE FGSM step x + eps * sign(W * grad_x CE), W a
    Gaussian kernel. FSR gives no settings: kernel 7 for 32-pixel images (the paper's 15 is for
    299-pixel ImageNet images)."""
    return pgd(model, x, y, eps, eps, 1, random_start_kind=None,
               grad_transform=smoothed_gradient(x.shape[1], kernel_size, x))


def ti_i_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
              step_size: float | None = None, kernel_size: int = 7) -> torch.Tensor:
    """TI-I-FGSM: the iterative form (I-FGSM, no momentum) with the same smoothed gradient at every
    step; 10 steps of eps/10 by default (not in FSR; evaluate.py --ti-iterative)."""
    return pgd(model, x, y, eps, step_size or eps / steps, steps, random_start_kind=None,
               grad_transform=smoothed_gradient(x.shape[1], kernel_size, x))


# DI's ImageNet sizes (Xie et al. 2019, "Improving transferability of adversarial examples with
# input diversity", and their released code): a 299-pixel image is resized
# to rnd x rnd, rnd uniform in [299, 330), then zero-padded at a random offset to 330 x 330.
DI_RESIZE_RATE = 330 / 299
# torchattacks' DIFGSM instead shrinks to [0.9 size, size) and pads back to the input size.
DI_SHRINK_RATE = 0.9


def input_diversity(x: torch.Tensor, prob: float = 0.5, resize_rate: float = DI_RESIZE_RATE,
                    interpolation: str = "nearest") -> torch.Tensor:
    """DI's random transform T(x; p) (Xie et al. 2019): with probability `prob`, resize the batch to
    rnd x rnd and zero-pad it at a random offset. resize_rate >= 1 (default, the DI paper): rnd in
    [size, floor(size * rate)), padded to floor(size * rate), so the output is larger than the
    input (every network here pools adaptively); resize_rate < 1 (torchattacks' convention): rnd
    in [floor(size * rate), size), padded back to size. `interpolation`: "nearest" as the DI paper's
    released code, "bilinear" as torchattacks."""
    if torch.rand(()) >= prob:
        return x
    height, width = x.shape[-2:]
    if resize_rate >= 1:  # enlarge, pad to the larger size
        out_h, out_w = int(height * resize_rate), int(width * resize_rate)
        new_h = int(torch.randint(height, max(height + 1, out_h), ()))
    else:  # shrink, pad back to the input size
        out_h, out_w = height, width
        new_h = int(torch.randint(max(1, int(height * resize_rate)), height, ()))
    new_w = min(out_w, max(1, round(new_h * width / height)))  # square images: new_w = new_h
    out_h, out_w = max(out_h, new_h), max(out_w, new_w)
    options = {} if interpolation == "nearest" else {"align_corners": False}
    resized = F.interpolate(x, size=(new_h, new_w), mode=interpolation, **options)
    top = int(torch.randint(0, out_h - new_h + 1, ()))
    left = int(torch.randint(0, out_w - new_w + 1, ()))
    return F.pad(resized, (left, out_w - new_w - left, top, out_h - new_h - top))


def di_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
            step_size: float | None = None, prob: float = 0.5, resize_rate: float = DI_RESIZE_RATE,
            interpolation: str = "nearest") -> torch.Tensor:
    """DI-FGSM as the DI paper defines it (its DI^2-FGSM, Xie et al. 2019): iterative FGSM
    whose every gradient is taken through `input_diversity`. FSR gives no settings: 10 steps of
    eps/10 and p = 0.5 (the DI paper's p for ImageNet) by default."""
    def diverse(inputs):
        return input_diversity(inputs, prob, resize_rate, interpolation)
    return pgd(model, x, y, eps, step_size or eps / steps, steps, random_start_kind=None, input_transform=diverse)


# ---------------------------------------------------------------------------------------------
# NAttack: query-based, gradient-free (Li et al. 2019; FSR Table 3)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def nattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, max_queries: int = 40_000,
            population: int = 300, sigma: float = 0.1, lr: float = 0.02, check_every: int = 10,
            chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NAttack: learn a Gaussian N(mu, sigma^2) over a tanh-space perturbation with natural
    evolution strategies so that its samples, projected to the eps-ball, fool the model.

    Per image and iteration: `population` queries on samples x + clip(g(w + mu + sigma*e) - x)
    with g(w) = (tanh(w) + 1)/2 and w = atanh(2x - 1), the loss max(log p_y - max_{j!=y} log p_j, 0)
    (0 once a sample fools the model), standardised rewards, and
    mu += lr / (population * sigma) * sum_i reward_i e_i. Every `check_every` iterations the
    mean mu itself is queried (one query) and the image counts as broken if it is misclassified.
    An image stops at success or when its next iteration would exceed `max_queries`.

    Checks also happen when an image can no longer afford a population (its last chance).
    Difference from the official code: mu starts at 0 rather than 0.001 N(0, I), so the first
    check queries the clean image itself (an already misclassified image costs one query).

    Returns (x_adv, success, queries): x_adv is, per image, the last mean that was queried (the
    fooling one where success), so `success` equals "x_adv is misclassified"; `queries` is the
    per-image count and never exceeds max_queries.
    """
    check_epsilon(eps)
    view = LogitsOnly(model)
    with attack_mode(model):
        n = x.shape[0]
        w = torch.atanh((2 * x - 1) * (1 - 1e-6))  # tanh-space image; g(w) = x up to 1e-6
        mu = torch.zeros_like(x)
        x_adv = x.clone()
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        running = torch.ones(n, dtype=torch.bool, device=x.device)

        def to_image(latent, center):  # g(latent), projected into the eps-ball around center
            return project(0.5 * (torch.tanh(latent) + 1), ball(center, eps))

        def forward(images):
            return torch.cat([view(part).float() for part in images.split(chunk)])

        iteration = 0
        while running.any():
            # 1. Query the mean of the search distribution: every check_every iterations, and
            #    for images whose next population would not fit in the budget.
            idx = running.nonzero().squeeze(1)
            last_chance = queries[idx] + population > max_queries
            to_check = idx if iteration % check_every == 0 else idx[last_chance]
            to_check = to_check[queries[to_check] < max_queries]
            if to_check.numel():
                x_adv[to_check] = to_image(w[to_check] + mu[to_check], x[to_check])
                queries[to_check] += 1
                broken = forward(x_adv[to_check]).argmax(1) != y[to_check]
                success[to_check[broken]] = True
                running[to_check[broken]] = False
            running[idx[last_chance]] = False
            idx = running.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            # 2. One NES step on mu for every running image: `population` queries each.
            k = idx.numel()
            noise = torch.randn(k, population, *x.shape[1:], device=x.device, dtype=x.dtype)
            latent = (w[idx] + mu[idx]).unsqueeze(1) + sigma * noise
            center = x[idx].unsqueeze(1).expand_as(latent)
            log_probs = F.log_softmax(forward(to_image(latent, center).flatten(0, 1)), dim=1).view(k, population, -1)
            labels = y[idx].view(k, 1, 1).expand(k, population, 1)
            true = log_probs.gather(2, labels).squeeze(2)
            other = log_probs.scatter(2, labels, -torch.inf).amax(2)
            queries[idx] += population
            reward = -(true - other).clamp(0.0, 1000.0)  # 0 once a sample fools the model
            reward = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, unbiased=False, keepdim=True) + 1e-7)
            mu[idx] += lr / (population * sigma) * torch.einsum("kp,kp...->k...", reward, noise)
            iteration += 1
    return x_adv, success, queries


# ---------------------------------------------------------------------------------------------
# AutoAttack (Croce & Hein 2020) through `pyautoattack`
# ---------------------------------------------------------------------------------------------
#
# `pyautoattack` (PyPI) is a third party's repackaging of the authors' code (fra31/auto-attack):
# the attack code is identical, the API is keyword-only (Python >= 3.10) and progress goes through
# the `auto-attack` logger. It is not the authors' own release; the authors distribute AutoAttack
# through their GitHub repository only.


def _pyautoattack():
    """The pyautoattack package, imported on first use (training never needs it)."""
    try:
        import pyautoattack
        import pyautoattack.autopgd_base
        import pyautoattack.checks
        import pyautoattack.square
    except ImportError as error:
        raise ImportError("AutoAttack needs pyautoattack (a PyPI repackaging of fra31/auto-attack): "
                          "pip install pyautoattack") from error
    return pyautoattack


def reset_dynamic_check() -> None:
    """Zero the call counter of AutoAttack's dynamic-defence check: `checks.check_dynamic` counts calls of
    `grad`, `backward` and `_make_grads` during the model's forward in a module-level dict nothing resets
    (as fra31/auto-attack). Once one model took a gradient inside its forward (the official CIFS module
    does: its mask is a gradient), every later model in the process would be reported as dynamic."""
    counts = _pyautoattack().checks.funcs
    for name in counts:
        counts[name] = 0


@contextlib.contextmanager
def autoattack_log(progress: bool = False):
    """Collect AutoAttack's warnings (yields the list they are appended to) and, with progress=True,
    show its progress lines on stderr; the logger's previous state is restored on exit."""
    logger = logging.getLogger("auto-attack")
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    collector = Collect(level=logging.WARNING)
    printer = logging.StreamHandler()
    printer.setFormatter(logging.Formatter("[autoattack] %(message)s"))
    old_level = logger.level
    logger.addHandler(collector)
    if progress:
        logger.addHandler(printer)
    logger.setLevel(logging.DEBUG if progress else logging.WARNING)
    try:
        yield warnings
    finally:
        logger.removeHandler(collector)
        logger.removeHandler(printer)
        logger.setLevel(old_level)


def run_adversary(adversary, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                  progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """adversary.run_standard_evaluation on (x, y) with `model` in attack mode, after
    `reset_dynamic_check`. Returns (x_adv, AutoAttack's warnings: randomised or dynamic defence,
    output range, Square stronger than the white-box attacks, ...)."""
    with autoattack_log(progress) as warnings, attack_mode(model):
        reset_dynamic_check()
        x_adv, _ = adversary.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    return x_adv.detach(), warnings


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str = "standard",
               attacks: list[str] | None = None, seed: int = 0, batch_size: int = 500,
               progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack on a logits-only view of `model` in eval mode: version 'standard' runs APGD-CE,
    APGD-T, FAB-T and Square (the standard evaluation of FSR Tables 3-6), 'custom' runs `attacks`.
    Returns (x_adv, warnings); `progress=True` shows AutoAttack's progress lines on stderr."""
    check_epsilon(eps)
    adversary = _pyautoattack().AutoAttack(LogitsOnly(model), eps=eps, norm="Linf", version=version,
                                           attacks=attacks if version == "custom" else None,
                                           device=x.device, seed=seed)
    return run_adversary(adversary, model, x, y, batch_size, progress)


# --- CIFS's own protocol (CIFS appendix B.1 and C, Tables B.1 and C.1) ---------------------------
#
# The CIFS authors evaluate with a modified AutoAttack (the `autoattack/` folder of HanshuYAN/CIFS):
# APGD-CE with 5 restarts (100 iterations) followed by Square (5,000 queries, p_init 0.8, one
# restart), both maximising the joint loss CE(final) + (beta / L_c) sum_l CE(p_l) with beta = 2,
# success judged on the final logits; their Square minimises -(joint CE) (its `loss='ce'`), where
# standard AutoAttack's Square uses the margin. Built here from pyautoattack's own classes: APGD
# takes the loss and its gradient from a model adapter (the interface pyautoattack's TensorFlow
# adapters implement, `is_tf_model=True`), Square from an overridden `margin_and_loss`.
# Differences from the authors' copy: pyautoattack's current APGD and Square code rather than their
# 2020 snapshot (same algorithms and budgets), and AutoAttack's checks (randomised, dynamic
# defence, output range), which their copy drops, run and report their warnings.


class LossAdapter:
    """`model` seen through pyautoattack's model-adapter interface, with `loss_fn` (per-example, on
    the raw output, like every loss of this file) as the loss that APGD climbs."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        self.model, self.loss_fn = model, loss_fn

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(self.model(x))

    def get_logits_loss_grad_xent(self, x: torch.Tensor, y: torch.Tensor):
        """(final logits, per-example loss, input gradient of the summed loss), all detached."""
        with torch.enable_grad():  # APGD calls this inside AutoAttack's torch.no_grad()
            x = x.detach().requires_grad_(True)
            output = self.model(x)
            loss = self.loss_fn(output, y)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return logits_of(output).detach(), loss.detach(), grad.detach()


@functools.cache
def _loss_square_class():
    """pyautoattack's SquareAttack with the loss it minimises replaced by -loss_fn (built on first
    use: pyautoattack is imported lazily)."""
    class LossSquare(_pyautoattack().square.SquareAttack):
        def __init__(self, model: nn.Module, loss_fn: LossFn, **kwargs):
            super().__init__(LogitsOnly(model), loss="ce", **kwargs)
            self.full_model, self.loss_fn = model, loss_fn

        def margin_and_loss(self, x, y):
            """(margin of the final logits, clamped at 0: <= 0 once misclassified; -loss_fn)."""
            output = self.full_model(x)
            return -cw_margin(logits_of(output), y, kappa=0.0), -self.loss_fn(output, y)
    return LossSquare


def cifs_autoattack_adversary(model: nn.Module, eps: float, loss_fn: LossFn, seed: int = 0, device=None,
                              n_restarts: int = 5, n_iter: int = 100, n_queries: int = 5000):
    """pyautoattack's AutoAttack (version 'custom': APGD-CE, then Square on the points still robust)
    with both attacks climbing `loss_fn`. Defaults: the CIFS authors' settings; smaller budgets
    only for tests."""
    check_epsilon(eps)
    package = _pyautoattack()
    adversary = package.AutoAttack(LogitsOnly(model), attacks=["apgd-ce", "square"], version="custom", eps=eps,
                                   norm="Linf", device=device, seed=seed)
    adversary.apgd = package.autopgd_base.APGDAttack(
        LossAdapter(model, loss_fn), n_iter=n_iter, norm="Linf", n_restarts=n_restarts, eps=eps, seed=seed,
        eot_iter=1, rho=0.75, device=device, is_tf_model=True, logger=adversary.logger)
    adversary.square = _loss_square_class()(model, loss_fn, norm="Linf", n_queries=n_queries, eps=eps, p_init=0.8,
                                            n_restarts=1, seed=seed, device=device, resc_schedule=False)
    return adversary


def autoattack_cifs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss_fn: LossFn,
                    seed: int = 0, batch_size: int = 500, progress: bool = False,
                    **budget) -> tuple[torch.Tensor, list[str]]:
    """CIFS's AutoAttack protocol on (x, y); `budget`: n_restarts / n_iter / n_queries (tests only)."""
    adversary = cifs_autoattack_adversary(model, eps, loss_fn, seed, x.device, **budget)
    return run_adversary(adversary, model, x, y, batch_size, progress)
