"""FSR: Feature Separation and Recalibration for adversarial robustness, one file.

Paper:  W. J. Kim, Y. Cho, J. Jung, S.-E. Yoon, "Feature Separation and Recalibration for
        Adversarial Robustness", CVPR 2023 (arXiv:2303.13846, with the appendix).
Code:   https://github.com/wkim97/FSR (the official implementation; differences are listed in
        comments marked "Official code:" and in docs/fsr.md).

Run:
    python fsr.py --dataset cifar10 --strategy trades          # ResNet-18 + FSR, TRADES
    python fsr.py --dataset cifar10 --strategy at --no-fsr     # the vanilla baseline, same loop and seed
    python fsr.py --dataset svhn --model vgg16 --strategy mart
    python fsr.py --dataset synthetic --device cpu --epochs 3  # offline CPU demo
    python fsr.py --resume runs/<run-name>/last.pt             # continue an interrupted run
    torchrun --nproc_per_node=4 fsr.py --dataset cifar10       # data-parallel, one process per GPU

The file reads top to bottom: Args -> the recipe defaults -> the FSR module -> the network that hosts it
-> losses -> the training step -> checks -> train(), whose epoch loop is all of adversarial training -> main().
Around it: models.py (networks), data.py, run_support.py and progress.py (plumbing a reader may skip).
Blocks marked "shared block" are identical in cifs.py (tests/test_shared_blocks.py). Speed: benchmarks/speed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from data import DATASETS, dataset_info
from models import MODELS, Network, build_model, official_to_ours
from progress import EpochProgress, draw_curves, epoch_summary, run_banner
from run_support import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, RESUME_HELP, arg, broadcast_buffers,
                         check_args, clean_and_robust_accuracy, console, data_loaders, data_parallel, device_settings,
                         input_shape, is_checkpoint, learning_rate, load_checkpoint, load_weights, parse_args,
                         process_group, read_torch_file, restore_rng, resume_checkpoint, resumed_settings, rng_states,
                         run_directory, run_folder, save_checkpoint, seed_everything, seed_rank, write_metrics)

METHOD = "fsr"


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
    data_root: str = arg(None, "dataset folder (default: data; for fmnist also Debian's copy, see docs/data.md)", str)
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
    sync_bn: bool = arg(False, "under torchrun on GPUs: BatchNorm statistics of the global batch (nn.SyncBatchNorm)")
    # --- bookkeeping -------------------------------------------------------------------------
    run_name: str = arg(None, "run folder name under --runs-dir (default: derived from the settings)", str)
    runs_dir: str = arg("runs", "where run folders go")
    resume: str = arg(None, RESUME_HELP, str)
    init_from: str = arg(None, "start from the weights of a fsr.py checkpoint or of a state dict saved by the "
                         "official train.py (warm start)", str)
    log_interval: float = arg(30.0, "seconds between progress lines within an epoch (the first after 5 s)")


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
                     "wrn34_10": "final", "wrn28_10": "final", "smallcnn": "conv3", "smallcnn_wide": "conv3"}
TRAIN_ACCURACY_NOTE = "training batches, train mode: Gumbel-noise masks"  # what train acc measures (console, curves)


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


# ==== The FSR module (paper §3) ==============================================================


def conv_net(channels: int, hidden: int) -> nn.Sequential:
    """conv3x3(C->h)-BN-ReLU-conv3x3(h->h)-BN-ReLU-conv3x3(h->C), no biases (official code).
    Used for both S and R. The paper text (§4.1) ends R with conv-BN-ReLU; we follow the code."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 3, padding=1, bias=False))


def gumbel(u: torch.Tensor) -> torch.Tensor:  # g = -log(-log(u)), u ~ U(0, 1), with the official guards
    return -torch.log(-torch.log(u + 1e-8) + 1e-8)


# Eq. 2's eval-mode Gumbel noise (u = 0.5), once, by the training noise's fp32 vectorised kernels (bitwise).
EVAL_GUMBEL = float(gumbel(torch.full((64,), 0.5))[0])


class FSR(nn.Module):
    """Feature Separation and Recalibration on a feature map f (B x C x H x W).

    forward(f, labels=None) -> (f~, heads): f~ = f+ + f~- replaces f downstream; `heads` holds the
    auxiliary logits h(f+), h(f-), h(f~-) for the losses (Eq. 3-4) and the mask m (for analysis).
    `labels` are unused (FSR's masks need none; the argument is the `Network.insert` contract).
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

    def mask(self, robustness_map: torch.Tensor) -> torch.Tensor:
        """Eq. 2: m = softmax{(log s + g1)/tau, (log(1-s) + g2)/tau}[0] with s = sigmoid(r),
        g = -log(-log(u)), and the official 1e-8 guards. A two-way softmax is the sigmoid of the
        difference, which is what we compute. Training: u1, u2 ~ U(0, 1) per element; evaluation:
        u1 = u2 = 0.5 (the mean of U(0, 1)), so g1 = g2 = EVAL_GUMBEL, a constant computed once, and
        m = sigmoid(r / tau) up to the guards. Computed in fp32: 1/tau = 10 amplifies bf16 rounding."""
        score = torch.sigmoid(robustness_map.float())
        if self.binary_mask:  # Table A6 "Binary", Eq. 8: b = [sigmoid(r) >= 0.5] (no gradient to S)
            return (score >= 0.5).float()
        gumbel_pos = gumbel_neg = EVAL_GUMBEL
        if self.training:
            gumbel_pos, gumbel_neg = gumbel(torch.rand_like(score)), gumbel(torch.rand_like(score))
        logit_pos = (torch.log(score + 1e-8) + gumbel_pos) / (self.tau + 1e-8)
        logit_neg = (torch.log(1 - score + 1e-8) + gumbel_neg) / (self.tau + 1e-8)
        return torch.sigmoid(logit_pos - logit_neg)

    def forward(self, feature: torch.Tensor, labels: torch.Tensor | None = None):
        if self.separation is not None:
            mask = self.mask(self.separation(feature)).to(feature.dtype)  # m+ = m (robust); f's dtype under autocast
        else:  # "w/o Separation" (Table 6): m = 0, every activation is recalibrated
            mask = torch.zeros_like(feature)
        robust, inverse = mask * feature, 1 - mask  # f+ = m+ (x) f (§3.1); m- = 1 - m, computed once
        non_robust, heads = inverse * feature, {"mask": mask}  # f- = m- (x) f
        if self.separation is not None:
            heads["robust"] = self.head(pool(robust))          # p+ of Eq. 3
            heads["non_robust"] = self.head(pool(non_robust))  # p- of Eq. 3
        if self.recalibration is None:  # "w/o Recalibration" (Table 6): non-robust activations dropped
            return robust, heads
        recalibrated = non_robust + inverse * self.recalibration(non_robust)  # f~- = f- + m- (x) R(f-) (§3.2)
        heads["recalibrated"] = self.head(pool(recalibrated))                    # p~- of Eq. 4
        return robust + recalibrated, heads    # f~ = f+ + f~-


def pool(feature: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(feature, 1).flatten(1)


# ==== The network that hosts it ==============================================================


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


# ==== Losses =================================================================================


def top_wrong_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y' of Eq. 3: the highest-scoring wrong class of the final logits (an index, no gradient)."""
    return logits.detach().scatter(1, y[:, None], -torch.inf).argmax(1)  # (one_hot would sync with the host)


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


def fsr_loss(logits: torch.Tensor, emitted: list, y: torch.Tensor, lambda_sep: float = 1.0, lambda_rec: float = 1.0,
             y_prime: str = "mispredicted"):
    """Eq. 5 without L_cls: (1/|L|) sum_l (lambda_sep L_sep^l + lambda_rec L_rec^l), with
    L_sep = CE(h(f+), y) + CE(h(f-), y') (Eq. 3) and L_rec = CE(h(f~-), y) (Eq. 4), all on the
    batch the classification loss trains on (the adversarial one), y' from its final logits
    (`y_prime`: the Table A5 variant). `emitted`: the heads of each FSR module (the network's aux).
    Returns (loss, {"sep": L_sep, "rec": L_rec}); the defaults are the paper's."""
    zero = logits.new_zeros((), dtype=torch.float32)
    if not emitted:  # vanilla backbone
        return zero, {}
    y_wrong = top_wrong_class(logits, y)
    separation, recalibration = zero, zero
    for heads in emitted:
        if "robust" in heads:
            separation = separation + F.cross_entropy(heads["robust"].float(), y) \
                + non_robust_loss(heads["non_robust"], y, y_wrong, y_prime)
        if "recalibrated" in heads:
            recalibration = recalibration + F.cross_entropy(heads["recalibrated"].float(), y)
    separation, recalibration = separation / len(emitted), recalibration / len(emitted)
    return lambda_sep * separation + lambda_rec * recalibration, {"sep": separation, "rec": recalibration}


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
    wrong = probs_adv.scatter(1, y[:, None], -1.0).amax(1)  # max_{k != y}: a scatter, no one_hot host sync
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
    """FAT's tau schedule, `adjust_tau` of the FAT code (Zhang et al. 2020) on the 1-indexed epoch of 120:
    0 while epoch <= 50, 1 while <= 90, then 2; other lengths scale 50 and 90. `epoch`: 0-indexed here."""
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


# ==== The training step ======================================================================


def objective(loss_cls, logits, emitted, y, args):
    """The full objective of Eq. 5: L_cls of the strategy plus the FSR terms."""
    loss_fsr, parts = fsr_loss(logits, emitted, y, args.lambda_sep, args.lambda_rec, args.y_prime)
    return loss_cls + loss_fsr, parts


def attack_loss(args):
    """The training attack of FSR maximises CE on the final logits only (official attacks/pgd.py)."""
    return attacks.cross_entropy_loss


# ---- shared block: training step (identical in fsr.py and cifs.py) -----------------------------


class UpdatePasses(nn.Module):
    """The parameter-update forward pass(es) of one step as one module call: under torchrun DDP wraps
    it and sees one forward per update (one all-reduce) even when TRADES and MART need two passes;
    this avoids the "modified by an inplace operation" error of TRADES code whose every pass goes
    through DDP. The attack never sees DDP; BatchNorm buffers are broadcast after each step."""

    def __init__(self, network: nn.Module, strategy: str):
        super().__init__()
        self.network, self.strategy = network, strategy

    def forward(self, x_clean, x_train, y):
        # TRADES and MART also need the clean logits, from a separate forward, so BatchNorm sees the
        # clean and the adversarial batch separately, as in mart.py (two forwards); trades.py runs
        # three (clean, adversarial, clean again: the same values, one more running-statistics update).
        # The labels reach the inserted modules: CIFS's train-mode masks use the true label's logit
        # (CIFS §3.2, the official forward(x, y)); FSR ignores them.
        logits_clean = self.network(x_clean, y)[0] if self.strategy in ("trades", "mart") else None
        logits, emitted = self.network(x_train, y)
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


# ==== Cross-field checks (train() applies them after run_support.check_args, before any work) ====

METHOD_RANGES = {"tau": POSITIVE, "hidden": AT_LEAST_1, "lambda_sep": NON_NEGATIVE, "lambda_rec": NON_NEGATIVE}


def check_method_args(args: Args) -> None:
    """FSR's cross-field rules, each refused in one line that names the flags."""
    if args.no_fsr and args.positions:
        raise ValueError(f"--positions {args.positions} has no effect with --no-fsr: drop one of them")
    if args.no_separation and args.no_recalibration:
        raise ValueError("--no-separation with --no-recalibration leaves no FSR module: use --no-fsr")


# ---- shared block: training loop (identical in fsr.py and cifs.py) -----------------------------


def initial_weights(args: Args, log) -> dict:
    """--init-from's weights: a checkpoint of this method (the network must fit) or an official state dict."""
    raw = read_torch_file(args.init_from, "--init-from")
    if is_checkpoint(raw):
        return load_checkpoint(args.init_from, METHOD, "--init-from")["model"]
    state, notes = official_state_dict(raw, args)
    for note in notes:
        log(f"--init-from: {note}")
    return state


def train(args: Args, log=print) -> dict:
    """The whole run, returning the last epoch's metrics. Under `torchrun --nproc_per_node=N` one process
    per GPU trains data-parallel: --batch-size is the global batch, split over the processes, the learning
    rate unchanged; every process starts from the same weights; only rank 0 logs and writes the run folder."""
    log = log if os.environ.get("RANK", "0") == "0" else (lambda *_: None)
    # TRY NOT TO MODIFY: settings (a resumed run keeps its own), every check before any work
    checkpoint = resume_checkpoint(args, METHOD)
    args = resumed_settings(args, checkpoint, log) if checkpoint else resolve(args)
    check_args(args, METHOD_RANGES)
    check_method_args(args)
    run_dir = run_directory(args, METHOD, checkpoint)
    if checkpoint and checkpoint["epoch"] >= args.epochs:
        log(f"{args.resume} has already run all {args.epochs} epochs: nothing to do (pass a larger --epochs to extend it)")
        return checkpoint["metrics"]
    initial = initial_weights(args, log) if args.init_from else None
    with process_group(args) as (rank, world_size):
        device, _, autocast, memory_format = device_settings(args)
        seed_everything(args.seed, args.deterministic)
        model = build_network(args)
        if args.sync_bn and world_size > 1:  # BatchNorm statistics of the global batch (CUDA only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device, memory_format=memory_format)
        seed_rank(args.seed, rank)  # attack noise differs across processes
        network = torch.compile(model) if args.compile else model  # what the attack runs on: never DDP-wrapped
        update = UpdatePasses(network, args.strategy)  # the update passes; under torchrun DDP wraps them
        update = data_parallel(update, device) if world_size > 1 else update  # (and broadcasts rank 0's weights)
        if initial is not None:  # weights only: optimiser, schedule and epoch start afresh
            load_weights(model, initial, args.init_from)
        train_loader, held_out, data = data_loaders(args, device, memory_format, rank, world_size, log)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        start_epoch, best_robust, history = 0, -1.0, []
        if checkpoint:
            load_weights(model, checkpoint["model"], args.resume)
            optimizer.load_state_dict(checkpoint["optimizer"])
            start_epoch, best_robust, history = checkpoint["epoch"], checkpoint["best_robust"], checkpoint["history"]
            restore_rng(checkpoint["rng"], rank, world_size, device, args, start_epoch, log)
        metrics = history[-1] if history else {}
        with run_folder(run_dir, args, checkpoint is not None, history, log) if rank == 0 else contextlib.nullcontext():
            if checkpoint:
                log(f"resumed {args.resume} at epoch {start_epoch}")
            elif args.init_from:
                log(f"initialised the weights from {args.init_from}")
            log(run_banner(METHOD, args, model, device, data, run_dir, world_size))
            for epoch in range(start_epoch, args.epochs):  # ALGO LOGIC: adversarial training
                lr = learning_rate(args, epoch)  # 10x lower after each milestone
                for group in optimizer.param_groups:
                    group["lr"] = lr
                progress = EpochProgress(args, epoch, len(train_loader), world_size, log)
                for x, y in train_loader.epoch(epoch):
                    loss, parts, logits = training_step(network, x, y, args, epoch, autocast, update)  # attack + loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if world_size > 1:
                        broadcast_buffers(model, args.sync_bn)  # rank 0's BatchNorm statistics in every process
                    progress.update({"loss": loss, **parts}, logits, y)  # progress line with ETA
                metrics = progress.metrics(lr)
                evaluating = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
                for name, loader in held_out.items() if evaluating else ():  # "val" (--val-size), "monitor" (test)
                    metrics[f"{name}_clean"], metrics[f"{name}_robust"] = clean_and_robust_accuracy(model, loader, args, log, name)
                history.append(metrics)
                state = {"method": METHOD, "args": dataclasses.asdict(args), "epoch": epoch + 1,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_robust": best_robust,
                         "metrics": metrics, "history": history, "rng": rng_states(device)}  # a collective under torchrun
                if metrics.get("val_robust", -1.0) > best_robust:  # only with --val-size: never on the test set
                    best_robust = state["best_robust"] = metrics["val_robust"]
                    if rank == 0:
                        save_checkpoint(state, os.path.join(run_dir, "best.pt"))
                if rank == 0:  # atomic writes: a kill at any moment loses no finished epoch
                    save_checkpoint(state, os.path.join(run_dir, "last.pt"))
                    write_metrics(run_dir, history)
                    if evaluating:
                        draw_curves(run_dir, log)
                log(epoch_summary(metrics, args, history, TRAIN_ACCURACY_NOTE))
    return metrics


def main(argv=None) -> None:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    with console():  # one-line errors; Ctrl-C and SIGTERM end the run cleanly; line-buffered stdout
        train(args)


# ---- end shared block ------------------------------------------------------------------------


if __name__ == "__main__":
    main()
