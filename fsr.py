"""FSR: Feature Separation and Recalibration for adversarial robustness, one file.

Paper:  W. J. Kim, Y. Cho, J. Jung, S.-E. Yoon, "Feature Separation and Recalibration for
        Adversarial Robustness", CVPR 2023 (arXiv:2303.13846, with the appendix).
Code:   https://github.com/wkim97/FSR (the official implementation; differences are listed in
        comments marked "Official code:" and in README.md).

Run:
    python fsr.py --dataset cifar10 --strategy trades          # ResNet-18 + FSR, TRADES
    python fsr.py --dataset cifar10 --strategy at --no-fsr     # the vanilla baseline, same loop and seed
    python fsr.py --dataset svhn --model vgg16 --strategy mart
    python fsr.py --dataset synthetic --device cpu --epochs 3  # offline CPU demo
    python fsr.py --resume runs/<run-name>/last.pt             # continue an interrupted run
    python fsr.py --benchmark                                  # time training steps, FLOPs, params

The file reads top to bottom: Args -> the FSR module -> the network that hosts it -> losses ->
the training step -> the training loop -> main(). Blocks marked "shared block" are identical in
cifs.py (tests/test_shared_blocks.py checks it), so each file stands alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import attacks
from models import (MODELS, DATASETS, DeviceLoader, Network, balanced_subset, build_model, convert_sync_batchnorm,
                    count_flops, count_parameters, dataset_info, load_dataset, official_to_ours, set_tf32,
                    split_validation, subset)

METHOD = "fsr"


def arg(default, help: str, type=None, choices=None):
    """A dataclass field that carries its command-line help (one line per flag)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class Args:
    # --- what to train ------------------------------------------------------------------------
    dataset: str = arg("cifar10", "dataset", choices=tuple(DATASETS))
    model: str = arg(None, "backbone (default: resnet18; fmnist resnet10; synthetic smallcnn)", str, tuple(MODELS))
    strategy: str = arg("at", "adversarial-training strategy (FSR paper Tables 1-2: at, trades, mart)",
                        choices=("natural", "at", "trades", "mart", "fat"))
    no_fsr: bool = arg(False, "train the vanilla backbone through the identical loop (the baseline)")
    positions: str = arg(None, "comma-separated FSR positions (default: after the last unit: resnet18 layer4, "
                         "vgg16 stage4, wrn34_10 final; FSR Table A4: e.g. layer3,layer4)", str)
    # --- FSR (paper §3) and its ablations (FSR Tables 6, A4-A7, Fig. A1) ---------------------------
    tau: float = arg(0.1, "Gumbel-softmax temperature tau of Eq. 2")
    lambda_sep: float = arg(1.0, "weight lambda_sep of the separation loss (Eq. 3, 5)")
    lambda_rec: float = arg(1.0, "weight lambda_rec of the recalibration loss (Eq. 4, 5)")
    hidden: int = arg(64, "hidden width of the Separation and Recalibration nets")
    no_separation: bool = arg(False, "ablation: no Separation net (m = 0: recalibrate everything, L_rec only)")
    no_recalibration: bool = arg(False, "ablation: no Recalibration net (output f+, L_sep only)")
    binary_mask: bool = arg(False, "ablation: binary mask sigma(r) >= 0.5 instead of Gumbel softmax (Table A6)")
    y_prime: str = arg("mispredicted", "target of the non-robust head (Table A5)",
                       choices=("mispredicted", "uniform", "entropy", "average"))
    # --- optimisation (unset = the published recipe of the dataset, see DEFAULTS) -----------------
    epochs: int = arg(None, "training epochs (default 100; fmnist 120)", int)
    lr: float = arg(None, "initial SGD learning rate (default 0.1; svhn 0.01)", float)
    weight_decay: float = arg(None, "SGD weight decay on all parameters (default 5e-4)", float)
    milestones: str = arg(None, "epochs run before each 10x lr drop, as torch's MultiStepLR (default 74,89: the "
                          "official `if epoch >= 75` with 1-indexed epochs; fmnist 45,75,90)", str)
    batch_size: int = arg(128, "training batch size")
    momentum: float = arg(0.9, "SGD momentum")
    augment: str = arg(None, "training augmentation (default: crop_flip; svhn, fmnist, synthetic none)", str,
                       ("none", "crop_flip"))
    train_size: int = arg(None, "train on a seeded, class-balanced subset of this many training images "
                          "(quick runs; default: all of them, as the paper)", int)
    # --- the training attack -----------------------------------------------------------------
    epsilon: float = arg(None, "L-inf budget in image units (default 8/255; fmnist 0.3)", float)
    attack_steps: int = arg(None, "steps of the training attack (default 10; fmnist 20)", int)
    attack_step_size: float = arg(None, "step of the training attack (default eps/4; SVHN eps/8)", float)
    trades_beta: float = arg(6.0, "TRADES beta")
    mart_beta: float = arg(6.0, "MART beta (the MART ResNet-18 script used 5)")
    random_start: bool = arg(None, "random start of the training attack (default: on, each strategy's own: "
                             "uniform for AT and FAT, 0.001 N for TRADES and MART); --no-random-start starts at x", bool)
    fat_omega: float = arg(0.001, "FAT: std of the noise added at each attack step (FAT's default)")
    # --- monitoring and validation during training ---------------------------------------------
    monitor_size: int = arg(1000, "fixed class-balanced test images on which clean and PGD accuracy are shown "
                            "every --eval-every epochs: monitoring only, never used to choose a checkpoint (0: none)")
    val_size: int = arg(0, "opt-in: hold out this many training images and keep best.pt at their best PGD accuracy "
                        "(the paper trains on all images and reports the last epoch)")
    eval_every: int = arg(5, "epochs between the monitoring / held-out evaluations (and at the end)")
    eval_steps: int = arg(20, "PGD steps of those evaluations (step eps/10, no random start, fp32)")
    # --- data, device, speed -------------------------------------------------------------------
    data_root: str = arg("data", "dataset folder")
    synthetic_size: int = arg(None, "training images of the synthetic dataset", int)
    synthetic_shape: str = arg(None, "C,H,W of the synthetic dataset (default 3,32,32)", str)
    seed: int = arg(0, "seed of weights, data order, augmentation and attack noise")
    deterministic: bool = arg(False, "deterministic kernels (slower on GPU)")
    device: str = arg(None, "cuda | cpu | cuda:1 ... (default: cuda if available)", str)
    amp: bool = arg(False, "opt-in bf16 autocast for training and the training attack (default fp32, as the paper)")
    strict_fp32: bool = arg(False, "fp32 convolutions without TF32 on Ampere/Hopper GPUs (PyTorch's default, which "
                            "the official codes also get there, runs them in TF32; no effect on the CPU)")
    channels_last: bool = arg(None, "channels_last memory format (default: on with CUDA)", bool)
    compile: bool = arg(False, "torch.compile the network")
    sync_bn: bool = arg(False, "under torchrun: BatchNorm statistics of the global batch (SyncBatchNorm), "
                        "for small per-GPU batches")
    # --- bookkeeping -------------------------------------------------------------------------
    run_name: str = arg(None, "run folder name under --runs-dir (default: derived from the settings)", str)
    runs_dir: str = arg("runs", "where run folders go")
    resume: str = arg(None, "continue from this last.pt with its own settings (--epochs, --device, --log-interval, "
                      "--eval-every may change)", str)
    init_from: str = arg(None, "start from the weights of a fsr.py checkpoint or of a state dict saved by the "
                         "official train.py (warm start)", str)
    log_interval: float = arg(30.0, "seconds between progress lines within an epoch (the first after 5 s)")
    benchmark: bool = arg(False, "time training steps on random data of the dataset's shape, then exit")
    benchmark_steps: int = arg(20, "timed steps of --benchmark")


# The published recipe per dataset (FSR paper §4.1; official train.py and run.sh). Milestones count
# the epochs run before each 10x drop (torch's MultiStepLR): the official rule `if epoch >= 75` on
# 1-indexed epochs runs epochs 1-74 at 0.1, 75-89 at 0.01 and 90-100 at 0.001, i.e. "74,89".
# Fashion-MNIST is not in the FSR paper: its recipe is the CIFS one. Synthetic is a CPU demo.
DEFAULTS = {
    "cifar10": dict(model="resnet18", epochs=100, lr=0.1, weight_decay=5e-4, milestones="74,89", attack_steps=10, step=1 / 4),
    "cifar100": dict(model="resnet18", epochs=100, lr=0.1, weight_decay=5e-4, milestones="74,89", attack_steps=10, step=1 / 4),
    "svhn": dict(model="resnet18", epochs=100, lr=0.01, weight_decay=5e-4, milestones="74,89", attack_steps=10, step=1 / 8),
    "tinyimagenet": dict(model="resnet18", epochs=100, lr=0.1, weight_decay=5e-4, milestones="74,89", attack_steps=10, step=1 / 4),
    "fmnist": dict(model="resnet10", epochs=120, lr=0.1, weight_decay=5e-4, milestones="45,75,90", attack_steps=20, step=0.02 / 0.3),
    "synthetic": dict(model="smallcnn", epochs=10, lr=0.05, weight_decay=5e-4, milestones="7,9", attack_steps=5, step=1 / 4),
}
# Where FSR goes by default: after the last feature stage (FSR §4.1: after layer4 of ResNet-18, the
# fourth conv stage of VGG16 before its max-pool, the last group of WRN-34-10 with its BN-ReLU).
DEFAULT_POSITIONS = {"resnet18": "layer4", "resnet10": "layer4", "resnet50": "layer4", "vgg16": "stage4",
                     "wrn34_10": "final", "wrn28_10": "final", "smallcnn": "conv3"}
# What the training accuracy measures (said next to it on the console and in curves.png).
TRAIN_ACCURACY_NOTE = "training batches, train mode: Gumbel-noise masks"


# =============================================================================================
# The FSR module (paper §3)
# =============================================================================================


def conv_net(channels: int, hidden: int) -> nn.Sequential:
    """conv3x3(C->h)-BN-ReLU-conv3x3(h->h)-BN-ReLU-conv3x3(h->C), no biases (official code).
    Used for both S and R. The paper text (§4.1) ends R with conv-BN-ReLU; we follow the code."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 3, padding=1, bias=False))


class FSR(nn.Module):
    """Feature Separation and Recalibration on a feature map f (B x C x H x W).

    forward(f) -> (f~, heads): f~ = f+ + f~- replaces f downstream; `heads` holds the auxiliary
    logits h(f+), h(f-), h(f~-) for the losses (Eq. 3-4) and the mask m (for analysis).
    The Gumbel noise is on in train mode and off in eval mode, so evaluation and every attack
    (the training attack included: attacks run in eval mode) see the deterministic mask.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 64, tau: float = 0.1,
                 separation: bool = True, recalibration: bool = True, binary_mask: bool = False):
        super().__init__()
        self.tau, self.binary_mask = tau, binary_mask
        self.separation = conv_net(channels, hidden) if separation else None      # S: f -> r
        self.recalibration = conv_net(channels, hidden) if recalibration else None  # R
        self.head = nn.Linear(channels, num_classes)  # h: shared by f+, f-, f~- (the code's one linear layer)
        # Which feature forward passes downstream (FSR Table 5 analysis, set by evaluate.py):
        # "full" f~ (the method), "robust" f+, "non_robust" f-, "recalibrated" f~-.
        self.output = "full"

    def mask(self, robustness_map: torch.Tensor) -> torch.Tensor:
        """Eq. 2: m = softmax{(log s + g1)/tau, (log(1-s) + g2)/tau}[0] with s = sigmoid(r),
        g = -log(-log(u)), and the official 1e-8 guards. A two-way softmax is the sigmoid of the
        difference, which is what we compute. Training: u1, u2 ~ U(0, 1) per element; evaluation:
        u1 = u2 = 0.5 (the mean of U(0, 1)), so g1 = g2 and m = sigmoid(r / tau) up to the guards.
        Computed in fp32: 1/tau = 10 amplifies bf16 rounding."""
        score = torch.sigmoid(robustness_map.float())
        if self.binary_mask:  # Table A6 "Binary", Eq. 8: b = [sigmoid(r) >= 0.5] (no gradient to S)
            return (score >= 0.5).float()
        if self.training:
            u_pos, u_neg = torch.rand_like(score), torch.rand_like(score)
        else:
            u_pos = u_neg = torch.full_like(score, 0.5)
        gumbel_pos = -torch.log(-torch.log(u_pos + 1e-8) + 1e-8)
        gumbel_neg = -torch.log(-torch.log(u_neg + 1e-8) + 1e-8)
        logit_pos = (torch.log(score + 1e-8) + gumbel_pos) / (self.tau + 1e-8)
        logit_neg = (torch.log(1 - score + 1e-8) + gumbel_neg) / (self.tau + 1e-8)
        return torch.sigmoid(logit_pos - logit_neg)

    def forward(self, feature: torch.Tensor):
        if self.separation is not None:
            mask = self.mask(self.separation(feature))  # m+ = m (robust), m- = 1 - m
        else:  # "w/o Separation" (Table 6): m = 0, every activation is recalibrated
            mask = torch.zeros_like(feature, dtype=torch.float32)
        robust = mask * feature                   # f+ = m+ (x) f          (§3.1)
        non_robust = (1 - mask) * feature         # f- = m- (x) f
        heads = {"mask": mask}
        if self.separation is not None:
            heads["robust"] = self.head(pool(robust))          # p+ of Eq. 3
            heads["non_robust"] = self.head(pool(non_robust))  # p- of Eq. 3
        if self.output == "robust":  # Table 5: f+ in place of f~
            return robust, heads
        if self.output == "non_robust":  # Table 5: f- in place of f~
            return non_robust, heads
        if self.recalibration is None:  # "w/o Recalibration" (Table 6): non-robust activations dropped
            return robust, heads
        recalibrated = non_robust + (1 - mask) * self.recalibration(non_robust)  # f~- = f- + m- (x) R(f-) (§3.2)
        heads["recalibrated"] = self.head(pool(recalibrated))                    # p~- of Eq. 4
        if self.output == "recalibrated":  # Table 5: f~- in place of f~
            return recalibrated, heads
        return robust + recalibrated, heads    # f~ = f+ + f~-


def pool(feature: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(feature, 1).flatten(1)


# =============================================================================================
# The network that hosts it
# =============================================================================================


def resolve(args: Args) -> Args:
    """Fill every None setting with the paper default of the dataset (FSR §4.1; official train.py, run.sh)."""
    info = dataset_info(args.dataset)
    defaults = DEFAULTS[args.dataset]
    values = dict(model=defaults["model"], epochs=defaults["epochs"], lr=defaults["lr"],
                  weight_decay=defaults["weight_decay"], milestones=defaults["milestones"],
                  augment=info.augment, epsilon=info.epsilon, attack_steps=defaults["attack_steps"])
    resolved = dataclasses.replace(args, **{k: v for k, v in values.items() if getattr(args, k) is None})
    if resolved.attack_step_size is None:
        resolved.attack_step_size = defaults["step"] * resolved.epsilon
    if resolved.positions is None:
        resolved.positions = "" if resolved.no_fsr else DEFAULT_POSITIONS[resolved.model]
    if resolved.random_start is None:
        resolved.random_start = True
    return resolved


def check_method_args(args: Args) -> None:
    """FSR's own settings (called by check_args, before any work)."""
    if args.tau <= 0 or args.hidden < 1:
        raise ValueError(f"--tau {args.tau} must be positive and --hidden {args.hidden} at least 1")
    for name in ("lambda_sep", "lambda_rec"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must not be negative")
    if args.no_fsr and args.positions:
        raise ValueError(f"--positions {args.positions} has no effect with --no-fsr: drop one of them")
    if args.no_separation and args.no_recalibration:
        raise ValueError("--no-separation with --no-recalibration leaves no FSR module: use --no-fsr")


def build_network(args: Args) -> Network:
    """The backbone with one FSR module at each position (each with its own S, R and h; Eq. 5)."""
    net = build_model(args.model, dataset_info(args.dataset).num_classes, input_shape(args))
    if args.no_fsr:
        return net
    for position in args.positions.split(","):
        try:
            channels = net.feature_shapes[net.canonical(position)][0]
            module = FSR(channels, net.num_classes, args.hidden, args.tau, separation=not args.no_separation,
                         recalibration=not args.no_recalibration, binary_mask=args.binary_mask)
            # Official code: the VGG16 and WRN-34-10 constructors build S, R and the head before their
            # initialisation loop, which therefore covers them (models/vgg_fsr.py, models/wideresnet34_fsr.py);
            # the ResNet-18 has no loop (models/resnet_fsr.py). The backbone knows which applies.
            net.insert(position, net.initialise_like_backbone(module))
        except ValueError as error:  # unknown or repeated position
            raise ValueError(f"--positions {args.positions!r}: {error}") from None
    return net


# The official FSR models (wkim97/FSR models/resnet_fsr.py, vgg_fsr.py, wideresnet34_fsr.py) hold their
# one FSR module as attributes of the backbone, `separation.sep_net` (S), `recalibration.rec_net` (R)
# and `aux` (h), at these positions of ours; train.py saves `net.state_dict()` after every epoch.
OFFICIAL_POSITIONS = {"resnet18": "layer4", "vgg16": "stage4", "wrn34_10": "final"}


def official_state_dict(checkpoint: dict, args: Args) -> tuple[dict, list[str]]:
    """(our state dict for `build_network(args)`, notes) from a state dict saved by the official FSR
    train.py. `args`: resolved, with the checkpoint's backbone (resnet18, vgg16 or wrn34_10) and
    dataset; the FSR settings at their defaults (one module at the official position, S and R, hidden
    64). The WRN-34-10's 61 `sub_block1` keys are dropped (the official model never calls that block),
    which a note says. Anything else that does not fit is a one-line ValueError naming it."""
    if args.model not in OFFICIAL_POSITIONS:
        raise ValueError(f"the official FSR code has no {args.model!r}; its models are {', '.join(OFFICIAL_POSITIONS)}")
    if args.no_fsr or args.no_separation or args.no_recalibration:
        raise ValueError("an official FSR checkpoint holds S, R and the head: build the network without "
                         "--no-fsr, --no-separation and --no-recalibration")
    with torch.device("meta"):  # names and shapes only: no memory, no random numbers drawn
        reference = build_network(args)
    slot = reference.canonical(OFFICIAL_POSITIONS[args.model]).replace(".", "_")
    if list(reference.inserted) != [slot]:
        raise ValueError(f"the official {args.model} has one FSR module at {OFFICIAL_POSITIONS[args.model]!r}; "
                         f"--positions {args.positions!r} puts it elsewhere")
    rules = (
        (r"separation\.sep_net\.", f"inserted.{slot}.separation."),        # S: the same layers at the same indices
        (r"recalibration\.rec_net\.", f"inserted.{slot}.recalibration."),  # R
        (r"aux\.0\.", f"inserted.{slot}.head."),                         # h: Sequential(Linear) there, Linear here
    )
    return official_to_ours(checkpoint, args.model, rules, reference.state_dict(), "official FSR train.py")


# =============================================================================================
# Losses
# =============================================================================================


def top_wrong_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y' of Eq. 3: the highest-scoring wrong class of the final logits (an index, no gradient)."""
    return logits.detach().masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf).argmax(1)


def non_robust_loss(logits: torch.Tensor, y: torch.Tensor, y_wrong: torch.Tensor, kind: str) -> torch.Tensor:
    """The second term of Eq. 3 and its Table A5 variants."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    if kind == "mispredicted":  # ours in the paper: CE towards the most probable mistake y'
        return F.nll_loss(log_probs, y_wrong)
    if kind == "uniform":  # "Uniform": CE towards the uniform distribution over all classes
        return -log_probs.mean(1).mean()
    if kind == "entropy":  # "Entropy max.": minimise the negative entropy of p-
        return (log_probs.exp() * log_probs).sum(1).mean()
    if kind == "average":  # "Avg. targeted loss": mean CE over every class except the true one
        others = ~F.one_hot(y, logits.shape[1]).bool()
        return -(log_probs * others).sum(1).div(others.sum(1)).mean()
    raise ValueError(f"unknown y' variant {kind!r}")


def fsr_loss(logits: torch.Tensor, emitted: list, y: torch.Tensor, args: Args):
    """Eq. 5 without L_cls: (1/|L|) sum_l (lambda_sep L_sep^l + lambda_rec L_rec^l), with
    L_sep = CE(h(f+), y) + CE(h(f-), y') (Eq. 3) and L_rec = CE(h(f~-), y) (Eq. 4), all on the
    batch the classification loss trains on (the adversarial one), y' from its final logits."""
    zero = logits.new_zeros((), dtype=torch.float32)
    if not emitted:  # vanilla backbone
        return zero, {}
    y_wrong = top_wrong_class(logits, y)
    separation, recalibration = zero, zero
    for heads in emitted:
        if "robust" in heads:
            separation = separation + F.cross_entropy(heads["robust"].float(), y) \
                + non_robust_loss(heads["non_robust"], y, y_wrong, args.y_prime)
        if "recalibrated" in heads:
            recalibration = recalibration + F.cross_entropy(heads["recalibrated"].float(), y)
    separation, recalibration = separation / len(emitted), recalibration / len(emitted)
    return args.lambda_sep * separation + args.lambda_rec * recalibration, {"sep": separation, "rec": recalibration}


# ---- shared block: strategy losses (identical in fsr.py and cifs.py) ----------------------------


def trades_loss(logits_clean, logits_adv, y, beta):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL_batchmean(p(x) || p(x')); the clean
    distribution is not detached (as in the authors' yaodongyu/TRADES trades.py)."""
    kl = F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_clean.float(), 1), reduction="batchmean")
    return F.cross_entropy(logits_clean.float(), y) + beta * kl


def mart_loss(logits_clean, logits_adv, y, beta):
    """MART (Wang et al. 2020): BCE(p', y) + beta * mean_i KL(p_i || p'_i) (1 - p_i,y), with
    BCE = CE(p', y) - log(1.0001 - max_{k != y} p'_k) and the official 1e-12 guards."""
    probs_adv = F.softmax(logits_adv.float(), 1)
    probs_clean = F.softmax(logits_clean.float(), 1)
    wrong = probs_adv.masked_fill(F.one_hot(y, probs_adv.shape[1]).bool(), -1.0).amax(1)
    boosted_ce = F.cross_entropy(logits_adv.float(), y) - torch.log(1.0001 - wrong + 1e-12).mean()
    kl = (probs_clean * (torch.log(probs_clean + 1e-12) - torch.log(probs_adv + 1e-12))).sum(1)
    true_clean = probs_clean.gather(1, y[:, None]).squeeze(1)
    return boosted_ce + beta * (kl * (1.0000001 - true_clean)).mean()


def classification_loss(strategy, logits, y, logits_clean, args):
    """L_cls of the strategy on the final logits. `logits` are those of the training
    batch (adversarial, or clean for `natural`); `logits_clean` only for TRADES and MART."""
    if strategy == "trades":
        return trades_loss(logits_clean, logits, y, args.trades_beta)
    if strategy == "mart":
        return mart_loss(logits_clean, logits, y, args.mart_beta)
    return F.cross_entropy(logits.float(), y)  # natural, AT (Madry), FAT


def fat_tau(epoch, epochs):
    """FAT's tau schedule, as `adjust_tau` of the FAT code (Zhang et al. 2020), which is called with the
    1-indexed epoch of a 120-epoch run: tau = 0 while epoch <= 50, 1 while epoch <= 90, 2 after. Other
    run lengths scale 50 and 90 by epochs / 120. `epoch` is 0-indexed here."""
    one_indexed, scale = epoch + 1, epochs / 120
    return 0 if one_indexed <= 50 * scale else 1 if one_indexed <= 90 * scale else 2


def craft_adversarial(model, x, y, args, epoch, attack_loss):
    """The inner maximisation. Attacks run in eval mode (deterministic modules, BatchNorm running
    statistics, nothing updated) and take input-only gradients (attacks.py)."""
    eps, step, steps = args.epsilon, args.attack_step_size, args.attack_steps

    def start(kind):  # --no-random-start: every strategy's attack starts at x
        return kind if args.random_start is not False else None

    if args.strategy == "natural":
        return x
    if args.strategy == "at":  # Madry: uniform random start
        return attacks.pgd(model, x, y, eps, step, steps, loss_fn=attack_loss, random_start_kind=start("uniform"))
    if args.strategy == "trades":  # KL attack from x + 0.001 N on the final logits
        return attacks.trades_attack(model, x, eps, step, steps, random_start_kind=start("normal"))
    if args.strategy == "mart":  # CE-PGD from x + 0.001 N
        return attacks.pgd(model, x, y, eps, step, steps, loss_fn=attack_loss, random_start_kind=start("normal"))
    if args.strategy == "fat":  # early-stopped PGD-K-tau
        return attacks.fat_attack(model, x, y, eps, step, steps, tau=fat_tau(epoch, args.epochs), loss=attack_loss,
                                  random_start_kind=start("uniform"), omega=args.fat_omega)
    raise ValueError(f"unknown strategy {args.strategy!r}")


# ---- end shared block ------------------------------------------------------------------------


# =============================================================================================
# The training step
# =============================================================================================


def forward(model, x, y):
    """The parameter-update forward (FSR needs no labels inside the network)."""
    return model(x)


def objective(loss_cls, logits, emitted, y, args):
    """The full objective of Eq. 5: L_cls of the strategy plus the FSR terms."""
    loss_fsr, parts = fsr_loss(logits, emitted, y, args)
    return loss_cls + loss_fsr, parts


def attack_loss(args):
    """The training attack of FSR maximises CE on the final logits only (official attacks/pgd.py)."""
    return attacks.cross_entropy_loss


# ---- shared block: training step (identical in fsr.py and cifs.py) -----------------------------


class UpdatePasses(nn.Module):
    """The parameter-update forward pass(es) of one step as one module call. Under torchrun this
    module is what DistributedDataParallel wraps, so DDP sees exactly one forward per update (one
    set of gradient hooks, one all-reduce) even when TRADES and MART need two passes. With DDP's
    default buffer broadcast, every call of a DDP module overwrites the BatchNorm buffers in place,
    invalidating those an earlier call saved for its backward: the known "modified by an inplace
    operation" error of TRADES code whose attack and passes all go through the DDP model. (Here
    the attack never sees DDP, and the buffers are broadcast after each step instead.)"""

    def __init__(self, network: nn.Module, strategy: str):
        super().__init__()
        self.network, self.strategy = network, strategy

    def forward(self, x_clean, x_train, y):
        # TRADES and MART also need the clean logits, from a separate forward, so BatchNorm sees the
        # clean and the adversarial batch separately, as in mart.py (two forwards); trades.py runs
        # three (clean, adversarial, clean again: the same values, one more running-statistics update).
        logits_clean = forward(self.network, x_clean, y)[0] if self.strategy in ("trades", "mart") else None
        logits, emitted = forward(self.network, x_train, y)
        return logits_clean, logits, emitted


def training_step(model, x, y, args, epoch, autocast, update=None):
    """One batch: the attack in eval mode on the bare network `model` (never the DDP wrapper: no
    collective inside the attack, no gradient hooks), then the update passes in train mode through
    `update` (UpdatePasses(model), DDP-wrapped under torchrun; built here when not given).
    Returns (loss, parts for logging, logits of the training batch)."""
    update = update if update is not None else UpdatePasses(model, args.strategy)
    with autocast():
        x_train = craft_adversarial(model, x, y, args, epoch, attack_loss(args))
    update.train()
    with autocast():
        logits_clean, logits, emitted = update(x, x_train, y)
        loss_cls = classification_loss(args.strategy, logits, y, logits_clean, args)
        loss, parts = objective(loss_cls, logits, emitted, y, args)
    return loss, {"cls": loss_cls, **parts}, logits


# ---- end shared block ------------------------------------------------------------------------


# ---- shared block: training loop (identical in fsr.py and cifs.py) -----------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, written by another method or by
    another version of the code, or with weights that do not fit the network."""


def input_shape(args: Args) -> tuple[int, int, int]:
    """(C, H, W) of the run's images: the dataset's, or --synthetic-shape for synthetic data."""
    if args.dataset == "synthetic" and args.synthetic_shape:
        return tuple(int(v) for v in args.synthetic_shape.split(","))
    return dataset_info(args.dataset).shape


def flag(name: str) -> str:
    """The command-line spelling of a setting: weight_decay -> --weight-decay."""
    return "--" + name.replace("_", "-")


class OneLineErrors(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, without the usage block."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def parse_args(argv=None) -> Args:
    """argparse from the Args dataclass: kebab-case flags, one help line each. A default is shown
    only where it is a value (a default that depends on the dataset is described in the help)."""
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Args):
        meta = f.metadata
        shown = "" if f.default in (None, False) else f" (default: {f.default})"
        if f.default is False:
            parser.add_argument(flag(f.name), action="store_true", help=meta["help"])
        elif meta["type"] is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            parser.add_argument(flag(f.name), type=meta["type"] or type(f.default), default=f.default,
                                choices=meta["choices"], help=meta["help"] + shown)
    return Args(**vars(parser.parse_args(argv)))


def int_list(name: str, text: str, length: int | None = None, increasing: bool = False) -> list[int]:
    """A comma-separated list of positive integers, or a one-line error that names the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (length and len(values) != length) or \
            (increasing and values != sorted(set(values))):
        what = f"{length} positive integers" if length else "positive integers"
        raise ValueError(f"{flag(name)} {text!r} is malformed: give {what} separated by commas"
                         + (", in increasing order" if increasing else "") + ", e.g. "
                         + ("3,32,32" if length == 3 else "75,90"))
    return values


def check_args(args: Args) -> None:
    """Refuse, before any work, every setting that would fail later or silently train something
    else, in one line that names the flag and the fix. `args` are resolved (no None left)."""
    adversarial = args.strategy != "natural"
    at_least_one = {"epochs": args.epochs, "eval_every": args.eval_every, "eval_steps": args.eval_steps,
                    "batch_size": args.batch_size, "benchmark_steps": args.benchmark_steps}
    if adversarial:
        at_least_one["attack_steps"] = args.attack_steps
    for name, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"{flag(name)} {value} must be at least 1")
    if not 0 < args.epsilon <= 1:
        raise ValueError(f"--epsilon {args.epsilon} is not in (0, 1]: budgets are in image units "
                         f"(pass 8/255 = {8 / 255:.5f}, not 8)")
    if adversarial and args.attack_step_size <= 0:
        raise ValueError(f"--attack-step-size {args.attack_step_size} must be positive (e.g. eps/4)")
    if args.lr <= 0:
        raise ValueError(f"--lr {args.lr} must be positive")
    for name in ("weight_decay", "momentum", "trades_beta", "mart_beta", "fat_omega", "log_interval"):
        if getattr(args, name) < 0:
            raise ValueError(f"{flag(name)} {getattr(args, name)} must not be negative")
    if args.strategy in ("trades", "mart") and args.random_start is False:
        raise ValueError(f"--no-random-start with --strategy {args.strategy}: its attack starts from "
                         "x + 0.001 N; from x itself TRADES cannot move (its KL gradient is zero there) and the run "
                         "would be natural training under another name. Drop --no-random-start")
    int_list("milestones", args.milestones, increasing=True)
    if args.dataset != "synthetic":
        for name in ("synthetic_shape", "synthetic_size"):
            if getattr(args, name) is not None:
                raise ValueError(f"{flag(name)} applies only to --dataset synthetic")
    elif args.synthetic_shape:
        int_list("synthetic_shape", args.synthetic_shape, length=3)
    if args.synthetic_size is not None and args.synthetic_size < 20:
        raise ValueError(f"--synthetic-size {args.synthetic_size} is too small: give at least 20 images")
    available = training_images(args)
    if args.train_size is not None and not 10 <= args.train_size <= available:
        raise ValueError(f"--train-size {args.train_size} must be between 10 and the {available} training "
                         f"images of {args.dataset}")
    kept = min(args.train_size or available, available)
    if not 0 <= args.val_size < kept:
        raise ValueError(f"--val-size {args.val_size} must be at least 0 and below the {kept} training images "
                         f"(0: train on all of them, as both papers)")
    if args.monitor_size < 0:
        raise ValueError(f"--monitor-size {args.monitor_size} must not be negative (0: no monitoring)")
    check_device(args.device)
    check_method_args(args)


def training_images(args: Args) -> int:
    """Images in the dataset's training split (synthetic: --synthetic-size or 5,000)."""
    if args.dataset == "synthetic":
        return args.synthetic_size or 5000
    return dataset_info(args.dataset).train_size


def check_device(name: str | None) -> None:
    """--device must name a device this machine has."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")


def check_writable(folder: str, flag_name: str = "--runs-dir") -> None:
    """`folder` (or the nearest folder above it that exists) must be a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag_name}: cannot write {folder} ({existing} is not a writable folder)")


def seed_everything(seed: int, deterministic: bool) -> None:
    """The one place seeds are set (weights, data order, augmentation, attack noise)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def learning_rate(args: Args, epoch: int) -> float:
    """Step schedule, 10x lower after each milestone, as torch.optim.lr_scheduler.MultiStepLR
    stepped once per epoch: a milestone m is the number of epochs run at the higher rate, so
    0-indexed `epoch` runs at lr * 0.1 ** (number of milestones <= epoch)."""
    return args.lr * 0.1 ** sum(epoch >= m for m in int_list("milestones", args.milestones))


def default_run_name(args: Args) -> str:
    variant = f"no{METHOD}" if getattr(args, f"no_{METHOD}") else METHOD
    return f"{METHOD}_{args.dataset}_{args.model}_{args.strategy}_{variant}_seed{args.seed}"


def save_checkpoint(state: dict, path: str) -> None:
    """Atomic: write a temporary file next to the target, then rename over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def read_torch_file(path: str, what: str = "checkpoint"):
    """torch.load(path) on the CPU (tensors and plain containers only), or one line saying why not."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{what} {path!r} is unreadable (truncated or not a checkpoint): "
                              f"{str(error).splitlines()[0]}") from None


def load_checkpoint(path: str, method: str = METHOD) -> dict:
    """Load a checkpoint of this method, or explain precisely why not."""
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or "method" not in checkpoint or "args" not in checkpoint:
        raise CheckpointError(f"{path!r} is not a checkpoint written by fsr.py or cifs.py")
    if checkpoint["method"] != method:
        raise CheckpointError(f"{path!r} is a {checkpoint['method']} checkpoint; "
                              f"resume it with {checkpoint['method']}.py (evaluate.py reads both)")
    return checkpoint


def args_from_checkpoint(saved: dict, path: str) -> Args:
    """The Args a checkpoint was written with; a checkpoint of another version of the code (settings
    this version does not know, or lacks) is refused in one line that names them."""
    known = {f.name for f in dataclasses.fields(Args)}
    unknown, missing = sorted(set(saved) - known), sorted(known - set(saved))
    if unknown or missing:
        raise CheckpointError(f"{path!r} was written by another version of {METHOD}.py: "
                              + "; ".join(part for part in (
                                  f"settings unknown here: {', '.join(unknown)}" if unknown else "",
                                  f"settings it lacks: {', '.join(missing)}" if missing else "") if part))
    return Args(**saved)


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """model.load_state_dict(state), or one line that says which keys differ."""
    ours = model.state_dict()
    missing = [key for key in ours if key not in state]
    unknown = [key for key in state if key not in ours]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(ours[key].shape)}" for key in ours
              if key in state and state[key].shape != ours[key].shape]

    def some(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    problems = [f"{what}: {some(keys)}" for what, keys in (("missing", missing), ("unexpected", unknown),
                                                           ("other shape", shapes)) if keys]
    if problems:
        raise CheckpointError(f"the weights of {source} do not fit this network ({args_summary(model)}): "
                              + "; ".join(problems))
    model.load_state_dict(state)


def args_summary(model: nn.Module) -> str:
    modules = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("FSR", "CIFS")})
    return f"{type(model).__name__} with {', '.join(modules) or 'no inserted module'}"


# Settings that may change when a run is resumed: they change neither the network nor the recipe
# of the epochs already run (a longer --epochs extends the run; FAT's tau schedule scales with it).
RESUMABLE = ("epochs", "device", "log_interval", "eval_every", "data_root", "compile", "channels_last",
             "deterministic")


def resumed_settings(args: Args, checkpoint: dict, log) -> Args:
    """The run's own settings, with the resumable flags the user changed applied and announced;
    any other changed flag is refused. A flag counts as given when it differs from its default."""
    saved = args_from_checkpoint(checkpoint["args"], args.resume)
    defaults = Args()
    changed = [f.name for f in dataclasses.fields(Args) if f.name != "resume"
               and getattr(args, f.name) != getattr(defaults, f.name)
               and getattr(args, f.name) != getattr(saved, f.name)]
    refused = [name for name in changed if name not in RESUMABLE]
    if refused:
        raise ValueError(f"{', '.join(flag(name) for name in refused)}: a resumed run keeps the settings it was "
                         f"started with (only {', '.join(flag(name) for name in RESUMABLE)} may change); "
                         f"start a new run (--init-from {args.resume} for its weights) to change them")
    if "epochs" in changed and args.epochs < checkpoint["epoch"]:
        raise ValueError(f"--epochs {args.epochs}: {args.resume} has already run {checkpoint['epoch']} epochs")
    for name in changed:
        log(f"resume: {flag(name)} {getattr(saved, name)} -> {getattr(args, name)}")
    return dataclasses.replace(saved, resume=args.resume, **{name: getattr(args, name) for name in changed})


def device_settings(args: Args):
    """(device, amp, autocast factory, memory format). fp32 unless --amp (both official codes train
    in fp32; bf16 is opt-in until a measurement shows it changes no reported number); channels_last
    on CUDA (the same arithmetic in another memory layout)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    on_cuda = device.type == "cuda"
    set_tf32(not args.strict_fp32, device)  # TF32 convolutions on Ampere/Hopper unless --strict-fp32 (models.set_tf32)
    channels_last = on_cuda if args.channels_last is None else args.channels_last
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    return device, args.amp, autocast, torch.channels_last if channels_last else torch.contiguous_format


def init_distributed(args: Args) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) this process joins the group: NCCL when
    the run's device is a GPU, gloo on the CPU. A plain `python fsr.py` gets (0, 1) and no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        device = device_settings(args)[0]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the processes of a data-parallel run (the tensor itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def shard(split, rank: int, world_size: int):
    """This process's contiguous share of an evaluation split (shares differ by at most one image)."""
    begin, end = len(split) * rank // world_size, len(split) * (rank + 1) // world_size
    return dataclasses.replace(split, images=split.images[begin:end], labels=split.labels[begin:end])


def rng_states(device) -> list:
    """[(cpu state, cuda state or None)] of every process, in rank order (for exact resumption)."""
    state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return [(cpu.cpu(), None if cuda is None else cuda.cpu()) for cpu, cuda in states]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every process, after each update (one broadcast per dtype):
    the next attack and the validation then see the same network everywhere. (DDP's own buffer
    broadcast, turned off here, would happen only at its next forward, after the attack.)"""
    buffers = list(model.buffers())
    for dtype in dict.fromkeys(buffer.dtype for buffer in buffers):  # the same order in every process
        group = [buffer for buffer in buffers if buffer.dtype == dtype]
        flat = torch.cat([buffer.reshape(-1) for buffer in group])
        dist.broadcast(flat, 0)
        for buffer, value in zip(group, flat.split([buffer.numel() for buffer in group])):
            buffer.copy_(value.view_as(buffer))


def data_parallel(update: nn.Module, device) -> DistributedDataParallel:
    """DDP around the update passes, without DDP's per-forward buffer broadcast (broadcast_buffers
    above runs after each step instead). Recent torch renamed that switch forward_sync_buffers."""
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return DistributedDataParallel(update, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def build_for_training(args: Args, device, memory_format, rank: int, world_size: int):
    """(model, network, update): the network, with the same initial weights in every process
    (SyncBatchNorm with --sync-bn under torchrun); `network`, the view the attack runs on (compiled
    with --compile, never DDP-wrapped); `update`, the update passes, DDP-wrapped under torchrun (its
    construction broadcasts rank 0's weights and buffers). Attack noise is then seeded per process."""
    seed_everything(args.seed, args.deterministic)
    model = build_network(args)
    if args.sync_bn and world_size > 1:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device, memory_format=memory_format)
    seed_rank(args.seed, rank)
    network = torch.compile(model) if args.compile else model
    update = UpdatePasses(network, args.strategy)
    return model, network, data_parallel(update, device) if world_size > 1 else update


def update_parameters(model, network, update, optimizer, x, y, args, epoch, autocast):
    """One SGD update on the batch (training_step, backward, step); under torchrun rank 0's
    BatchNorm statistics are then broadcast. Returns training_step's (loss, parts, logits)."""
    loss, parts, logits = training_step(network, x, y, args, epoch, autocast, update)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if dist.is_initialized():
        broadcast_buffers(model)
    return loss, parts, logits


def seed_rank(seed: int, rank: int) -> None:
    """Attack noise (random starts) differs across processes: rank r > 0 continues from its own
    seed; rank 0 keeps the stream of a single-process run."""
    if rank > 0:
        torch.manual_seed(seed + 1_000_003 * rank)


@torch.no_grad()
def _count_correct(model, x, y):
    return (model(x)[0].argmax(1) == y).sum()


def clean_and_robust_accuracy(model, loader, args) -> tuple[float, float]:
    """Clean and PGD accuracy (eval_steps of eps/10, no random start: the papers' test protocol)
    in fp32; under torchrun each process takes its share and the counts are summed, which gives
    the single-process figures."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=loader.device)  # clean, robust, total
    for x, y in loader.epoch(0):
        x_adv = attacks.pgd(model, x, y, args.epsilon, args.epsilon / 10, args.eval_steps, random_start_kind=None)
        counts[0] += _count_correct(model, x, y)
        counts[1] += _count_correct(model, x_adv, y)
        counts[2] += len(y)
    clean, robust, total = all_reduce_sum(counts).tolist()
    return clean / max(total, 1), robust / max(total, 1)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(args: Args, log=print) -> dict:
    """The whole run: data on the device, model, optimiser, resume, epochs, checkpoints, logs.
    Returns the last epoch's metrics. Under `torchrun --nproc_per_node=N`, one process per GPU
    trains data-parallel (DDP): --batch-size is the global batch, split evenly over the processes,
    with the learning rate unchanged (the same global batch, so the same recipe); every process
    starts from the same weights; only rank 0 logs and writes the run folder."""
    return in_process_group(run, args, log)


def in_process_group(body, args: Args, log):
    """body(args, log, rank, world_size) inside torchrun's process group, if any; only rank 0 logs."""
    rank, world_size = init_distributed(args)
    try:
        return body(args, log if rank == 0 else (lambda *_: None), rank, world_size)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


MONITOR_SEED = 0  # the monitored test images are the same for every run (comparable curves)
LOSS_NAMES = ("loss", "cls", "sep", "rec", "probe")  # what metrics.jsonl may hold as losses (FSR: sep, rec; CIFS: probe)


def load_splits(args: Args, log):
    """(train, held-out validation or None, monitored test images or None) as uint8 splits:
    --train-size keeps a seeded class-balanced subset of the training split; --val-size holds out
    images of it for best.pt; --monitor-size takes a fixed class-balanced subset of the test split."""
    shape = input_shape(args)
    log(f"loading {args.dataset} from {args.data_root} ...")
    train_split = load_dataset(args.dataset, args.data_root, train=True, synthetic_shape=shape,
                               synthetic_size=args.synthetic_size, seed=args.seed)
    if args.train_size is not None:
        train_split = subset(train_split, balanced_subset(train_split.labels, args.train_size,
                                                          train_split.num_classes, args.seed))
    train_split, val_split = split_validation(train_split, args.val_size, seed=args.seed)
    monitor_split = None
    if args.monitor_size:
        test_split = load_dataset(args.dataset, args.data_root, train=False, synthetic_shape=shape, seed=args.seed)
        monitor_split = subset(test_split, balanced_subset(test_split.labels, args.monitor_size,
                                                           test_split.num_classes, MONITOR_SEED))
    return train_split, val_split, monitor_split


@contextlib.contextmanager
def run_folder(run_dir: str, args: Args, resumed: bool, history: list, log):
    """The run folder for the run's life: created, locked against a second run (a lock left by a
    killed run is taken over, saying so), cleared of the temporary files of interrupted saves,
    with args.json and a metrics.jsonl that holds exactly the epochs of the checkpoint resumed."""
    if not resumed and os.path.exists(os.path.join(run_dir, "last.pt")):
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume {run_dir}/last.pt to continue it, "
                              f"or another --run-name")
    os.makedirs(run_dir, exist_ok=True)
    lock = os.path.join(run_dir, "run.lock")
    take_lock(lock, log)
    try:
        for name in os.listdir(run_dir):
            if ".tmp" in name:  # an interrupted save (save_checkpoint, write_text_atomically)
                os.remove(os.path.join(run_dir, name))
                log(f"removed {name}, left by an interrupted save")
        write_text_atomically(os.path.join(run_dir, "args.json"), json.dumps(dataclasses.asdict(args), indent=2))
        write_metrics(run_dir, history)
        yield
    finally:
        os.remove(lock)


def take_lock(path: str, log) -> None:
    """Create the lock file holding this host and process id; if a live process holds it, refuse."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as file:
                host, _, pid = file.read().strip().partition(" ")
            if host != socket.gethostname() or process_alive(int(pid or 0)):
                raise FileExistsError(f"{os.path.dirname(path)} is in use by process {pid} on {host}: wait for it, "
                                      f"or pass another --run-name (if that process is gone, delete {path})")
            log(f"note: taking over the lock of process {pid}, which is no longer running")
            os.remove(path)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(me)
        return
    raise FileExistsError(f"could not take the lock {path}")


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_metrics(run_dir: str, history: list) -> None:
    """metrics.jsonl, one line per completed epoch, rewritten whole from the checkpoint's history
    (atomically), so that a kill between the checkpoint and the log line loses nothing."""
    write_text_atomically(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history))


def run(args: Args, log, rank: int, world_size: int) -> dict:
    """train() in process `rank` of `world_size` (0 of 1 without torchrun)."""
    if args.resume and args.init_from:
        raise ValueError("--resume continues a run; --init-from starts a new one from given weights: pass one")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r} does not exist")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    args = resumed_settings(args, checkpoint, log) if checkpoint else resolve(args)
    check_args(args)
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if checkpoint else \
        os.path.join(args.runs_dir, args.run_name or default_run_name(args))
    check_writable(run_dir)
    if checkpoint and checkpoint["epoch"] >= args.epochs:
        log(f"{args.resume} has already run all {args.epochs} epochs: nothing to do (pass a larger --epochs to extend it)")
        return checkpoint["metrics"]
    initial = initial_weights(args.init_from, args, log) if args.init_from else None
    device, amp, autocast, memory_format = device_settings(args)
    model, network, update = build_for_training(args, device, memory_format, rank, world_size)
    if initial is not None:  # weights only: optimiser, schedule and epoch start afresh
        load_weights(model, initial, args.init_from)

    # Data: the training split on the device as uint8, augmented there (models.DeviceLoader); under
    # torchrun every process holds the split and takes its share of each global batch.
    train_split, val_split, monitor_split = load_splits(args, log)
    train_loader = DeviceLoader(train_split, args.batch_size, device, shuffle=True, augment=args.augment,
                                padding=dataset_info(args.dataset).padding or 4,  # crop_flip forced on any dataset
                                seed=args.seed, channels_last=memory_format == torch.channels_last,
                                rank=rank, world_size=world_size)
    held_out = {name: DeviceLoader(shard(split, rank, world_size), 500, device, shuffle=False)
                for name, split in (("val", val_split), ("monitor", monitor_split)) if split is not None}

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch, best_robust, history = 0, -1.0, []
    if checkpoint:
        load_weights(model, checkpoint["model"], args.resume)
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, best_robust, history = checkpoint["epoch"], checkpoint["best_robust"], checkpoint["history"]
        restore_rng(checkpoint["rng"], rank, world_size, device, args, start_epoch, log)

    with run_folder(run_dir, args, checkpoint is not None, history, log) if rank == 0 else contextlib.nullcontext():
        if checkpoint:
            log(f"resumed {args.resume} at epoch {start_epoch}")
        elif args.init_from:
            log(f"initialised the weights from {args.init_from}")
        log(f"{METHOD}: {args.model} on {args.dataset} ({len(train_split)} training images"
            f"{f', {len(val_split)} held out for best.pt' if val_split else ''}"
            f"{f', {len(monitor_split)} test images monitored' if monitor_split else ''}), strategy {args.strategy}, "
            f"{count_parameters(model) / 1e6:.2f} M params, device {device}, {'bf16 autocast' if amp else 'fp32'}, "
            f"run {run_dir}"
            + (f", {world_size} processes x {args.batch_size // world_size} images"
               f"{' (SyncBatchNorm)' if args.sync_bn else ''}" if world_size > 1 else ""))
        metrics = history[-1] if history else {}
        for epoch in range(start_epoch, args.epochs):
            metrics = train_epoch(model, network, update, optimizer, train_loader, args, epoch, autocast, log,
                                  world_size, history)
            evaluating = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
            if evaluating:
                for name, loader in held_out.items():
                    metrics[f"{name}_clean"], metrics[f"{name}_robust"] = clean_and_robust_accuracy(model, loader, args)
            history.append(metrics)
            state = {"method": METHOD, "args": dataclasses.asdict(args), "epoch": epoch + 1, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "best_robust": best_robust, "metrics": metrics,
                     "history": history, "rng": rng_states(device)}  # a collective under torchrun
            if metrics.get("val_robust", -1.0) > best_robust:  # only with --val-size: never on the test set
                best_robust = state["best_robust"] = metrics["val_robust"]
                if rank == 0:
                    save_checkpoint(state, os.path.join(run_dir, "best.pt"))
            if rank == 0:
                save_checkpoint(state, os.path.join(run_dir, "last.pt"))
                write_metrics(run_dir, history)
                if evaluating:  # every --eval-every epochs and at the end
                    draw_curves(run_dir, log)
            log(epoch_summary(metrics, args, history))
    return metrics


def initial_weights(path: str, args: Args, log) -> dict:
    """The weights of --init-from: a checkpoint of this method (any settings: the network must fit),
    or a state dict saved by the official code of this method (mapped by official_state_dict)."""
    raw = read_torch_file(path, "--init-from")
    if isinstance(raw, dict) and "method" in raw and "args" in raw:
        return load_checkpoint(path)["model"]
    state, notes = official_state_dict(raw, args)
    for note in notes:
        log(f"--init-from: {note}")
    return state


def restore_rng(saved: list, rank: int, world_size: int, device, args: Args, start_epoch: int, log) -> None:
    """Each process continues its own random stream; with another process count, fresh seeded
    streams (valid, but not bitwise an uninterrupted run), said."""
    if len(saved) == world_size:
        rng_cpu, rng_cuda = saved[rank]
        torch.set_rng_state(rng_cpu)
        if device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
        return
    torch.manual_seed(args.seed + 1_000_003 * rank + start_epoch)
    log(f"note: {args.resume} was written by {len(saved)} process(es), this run has {world_size}: "
        f"the attack noise is re-seeded")


def train_epoch(model, network, update, optimizer, loader, args, epoch, autocast, log, world_size, history) -> dict:
    """One epoch of updates at the epoch's learning rate; progress lines with the epoch's and the
    run's ETA from the first seconds on; returns the epoch's metrics (global-batch figures)."""
    lr = learning_rate(args, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    started = time.time()
    next_print = started + min(5.0, args.log_interval)
    sums, correct, seen = {}, 0, 0
    for step, (x, y) in enumerate(loader.epoch(epoch)):
        loss, parts, logits = update_parameters(model, network, update, optimizer, x, y, args, epoch, autocast)
        for name, value in {"loss": loss, **parts}.items():  # device tensors: no sync per step
            sums[name] = sums.get(name, 0) + value.detach() * len(y)
        correct, seen = correct + (logits.argmax(1) == y).sum(), seen + len(y)
        now = time.time()
        if now >= next_print and step + 1 < len(loader):
            next_print = now + args.log_interval
            per_step = (now - started) / (step + 1)
            epoch_left = per_step * (len(loader) - step - 1)
            run_left = epoch_left + (args.epochs - epoch - 1) * per_step * len(loader)
            log(f"  epoch {epoch + 1}/{args.epochs} step {step + 1}/{len(loader)} | loss {float(sums['loss']) / seen:.4f} "
                f"| {world_size * seen / (now - started):.0f} img/s | epoch ETA {format_seconds(epoch_left)} "
                f"| run ETA {format_seconds(run_left)}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.time() - started
    # Sums over the processes (each saw its share of every batch): the single-process figures.
    totals = all_reduce_sum(torch.stack([*(sums[name].float() for name in sums), correct.float(),
                                         torch.tensor(float(seen), device=device)])).tolist()
    seen = totals[-1]
    return {"epoch": epoch + 1, "lr": lr, **{name: total / seen for name, total in zip(sums, totals)},
            "train_accuracy": totals[-2] / seen, "images_per_second": seen / seconds, "epoch_seconds": seconds}


def epoch_summary(metrics: dict, args: Args, history: list) -> str:
    """The console line of an epoch: losses, accuracies (each labelled for what it measures), ETA."""
    seconds = [m["epoch_seconds"] for m in history]
    eta = (args.epochs - metrics["epoch"]) * sum(seconds) / len(seconds)
    losses = " ".join(f"{name} {metrics[name]:.4f}" for name in metrics if name in LOSS_NAMES)
    held_out = "".join(f" | {label} clean {metrics[f'{name}_clean']:.2%} pgd{args.eval_steps} (step eps/10) "
                       f"{metrics[f'{name}_robust']:.2%}"
                       for name, label in (("val", "held-out"), ("monitor", "test (monitoring only)"))
                       if f"{name}_robust" in metrics)
    return (f"epoch {metrics['epoch']}/{args.epochs} | lr {metrics['lr']:.4g} | {losses} | "
            f"train acc {metrics['train_accuracy']:.2%} ({TRAIN_ACCURACY_NOTE}){held_out} | "
            f"{metrics['images_per_second']:.0f} img/s | {metrics['epoch_seconds']:.1f} s | ETA {format_seconds(eta)}")


def draw_curves(run_dir: str, log) -> None:
    """curves.png of the run; a drawing failure is reported, never fatal to the run."""
    try:
        plot_training_curves([run_dir], os.path.join(run_dir, "curves.png"))
    except Exception as error:  # noqa: BLE001 (a plot must not end a training run)
        log(f"note: curves.png not drawn: {error}")


def plot_training_curves(run_dirs: list, path: str) -> bool:
    """training_curves_figure as a PNG; False, drawing nothing, without matplotlib."""
    figure = training_curves_figure(run_dirs)
    if figure is not None:
        figure.savefig(path, dpi=90)
    return figure is not None


def training_curves_figure(run_dirs: list):
    """Each run's metrics.jsonl against epochs: losses, training accuracy, and the held-out /
    monitored clean and PGD accuracy; several runs are overlaid (one colour each). None when
    matplotlib is not installed (it is never required)."""
    try:
        from matplotlib.figure import Figure  # the object-oriented API: no pyplot state, no display
    except ImportError:
        return None
    figure = Figure(figsize=(15, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    for index, run_dir in enumerate(run_dirs):
        with open(os.path.join(run_dir, "metrics.jsonl")) as file:
            lines = [json.loads(line) for line in file if line.strip()]
        colour, label = f"C{index}", os.path.basename(os.path.normpath(run_dir))
        epochs = [m["epoch"] for m in lines]
        for style, name in zip(("-", "--", ":", "-."), [n for n in LOSS_NAMES if lines and n in lines[-1]]):
            axes[0].plot(epochs, [m[name] for m in lines], style, color=colour, label=f"{label}: {name}")
        axes[1].plot(epochs, [100 * m["train_accuracy"] for m in lines], color=colour, label=label)
        for style, name in (("-", "monitor"), ("--", "val")):
            for marker, kind in (("o", "clean"), ("x", "robust")):
                points = [(m["epoch"], 100 * m[f"{name}_{kind}"]) for m in lines if f"{name}_{kind}" in m]
                if points:
                    axes[2].plot(*zip(*points), style, marker=marker, color=colour, label=f"{label}: {name} {kind}")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="losses")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="training accuracy")
    axes[2].set(xlabel="epoch", ylabel="accuracy (%)", title="clean (o) and PGD (x) accuracy")
    figure.suptitle("training accuracy: training batches in train mode (FSR: Gumbel-noise masks; CIFS: masks from "
                    "the true label's logit). monitor (solid): fixed test images, monitoring only; val (dashed): "
                    "held-out training images (best.pt)", fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="x-small")
    return figure


def forward_equivalents(args: Args) -> int:
    """Forward-pass equivalents per training image (an input-only backward ~ 1 forward, a full
    backward ~ 2): the attack's steps, the TRADES attack's clean forward, the update passes."""
    attack = 0 if args.strategy == "natural" else 2 * args.attack_steps + (args.strategy == "trades")
    update = 6 if args.strategy in ("trades", "mart") else 3
    return attack + update


def benchmark(args: Args, log=print) -> dict:
    """Time training steps on random data of the dataset's shape (no dataset needed). Under
    torchrun each process times its share of the global batch through DDP; images/s are global."""
    return in_process_group(time_training_steps, args, log)


def time_training_steps(args: Args, log, rank: int, world_size: int) -> dict:
    args = resolve(args)
    check_args(args)
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must split evenly over {world_size} processes")
    device, amp, autocast, memory_format = device_settings(args)
    shape, info = input_shape(args), dataset_info(args.dataset)
    model, network, update = build_for_training(args, device, memory_format, rank, world_size)
    plain = build_model(args.model, info.num_classes, shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    per_process = args.batch_size // world_size
    x = torch.rand(per_process, *shape, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, info.num_classes, (per_process,), device=device)

    def step():
        update_parameters(model, network, update, optimizer, x, y, args, 0, autocast)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    log(f"warming up: 3 steps (cuDNN autotuning{', compilation' if args.compile else ''}) ...")
    for _ in range(3):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"timing {args.benchmark_steps} steps ...")
    started = time.time()
    for _ in range(args.benchmark_steps):
        step()
    sync()
    seconds = time.time() - started
    flops = count_flops(model, shape)
    images_per_second = args.benchmark_steps * args.batch_size / seconds
    result = {"images_per_second": images_per_second,
              "seconds_per_epoch": info.train_size / images_per_second,
              "tflops_per_second": images_per_second * forward_equivalents(args) * flops / 1e12,
              "forward_gflops": flops / 1e9, "parameters": count_parameters(model),
              "plain_forward_gflops": count_flops(plain, shape) / 1e9, "plain_parameters": count_parameters(plain),
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    result["processes"] = world_size
    log(f"{METHOD} benchmark: {args.model} {args.strategy} on {args.dataset}-shaped data, batch {args.batch_size}"
        f"{f' ({world_size} processes x {per_process})' if world_size > 1 else ''}, "
        f"{device}, {'bf16' if amp else 'fp32'}{', compiled' if args.compile else ''}: "
        f"{images_per_second:.0f} img/s, {result['seconds_per_epoch']:.1f} s/epoch ({info.train_size} images), "
        f"{result['tflops_per_second']:.2f} TFLOP/s ({forward_equivalents(args)} forward-equivalents x "
        f"{result['forward_gflops']:.4f} GFLOP/image); params {result['parameters'] / 1e6:.2f} M "
        f"(backbone alone {result['plain_parameters'] / 1e6:.2f} M, {result['plain_forward_gflops']:.4f} GFLOPs)"
        + (f"; peak memory {result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] is not None else ""))
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        benchmark(args) if args.benchmark else train(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ImportError, ValueError) as error:
        sys.exit(f"error: {error}")


# ---- end shared block ------------------------------------------------------------------------


if __name__ == "__main__":
    main()
