"""CIFS: Channel-wise Importance-based Feature Selection for adversarial robustness, one file.

Paper:  H. Yan, J. Zhang, G. Niu, J. Feng, V. Y. F. Tan, M. Sugiyama, "CIFS: Improving Adversarial
        Robustness of CNNs via Channel-wise Importance-based Feature Selection", ICML 2021
        (arXiv:2102.05311; its appendix is cited below as "appendix B.1", "Table B.3", ...).
Code:   https://github.com/HanshuYAN/CIFS (the official implementation; differences are listed in
        comments marked "Official code:" or "Difference" and in docs/cifs.md).

Run:
    python cifs.py --dataset cifar10 --strategy at             # ResNet-18 + CIFS at both layer4 blocks
    python cifs.py --dataset cifar10 --strategy at --no-cifs   # the vanilla baseline, same loop and seed
    python cifs.py --dataset cifar10 --strategy natural --run-name warm   # the authors' warm start ...
    python cifs.py --dataset cifar10 --init-from runs/warm/last.pt        # ... then adversarial training
    python cifs.py --dataset fmnist                            # ResNet-10, eps 0.3, PGD-20 of 0.02
    python cifs.py --dataset synthetic --device cpu --epochs 3 # offline CPU demo
    python cifs.py --resume runs/<run-name>/last.pt            # continue an interrupted run
    torchrun --nproc_per_node=4 cifs.py --dataset cifar10      # data-parallel, one process per GPU

The file reads top to bottom: Args -> the recipe defaults -> the CIFS module -> the network that hosts it
-> losses -> the training step -> checks -> train(), whose epoch loop is all of adversarial training -> main().
Around it: models.py (networks), data.py, run_support.py and progress.py (plumbing a reader may skip).
Blocks marked "shared block" are identical in fsr.py (tests/test_shared_blocks.py). Speed: benchmarks/speed.py.
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

METHOD = "cifs"


@dataclass
class Args:
    # --- what to train ------------------------------------------------------------------------
    dataset: str = arg("cifar10", "dataset", choices=tuple(DATASETS))
    model: str = arg(None, "backbone (default: resnet18; fmnist resnet10; synthetic smallcnn)", str, tuple(MODELS))
    strategy: str = arg("at", "adversarial-training strategy (CIFS Table B.4: at, trades, fat)",
                        choices=("natural", "at", "trades", "mart", "fat"))
    no_cifs: bool = arg(False, "train the vanilla backbone through the identical loop (the baseline)")
    positions: str = arg(None, "comma-separated CIFS positions in forward order (default: resnet18 "
                         "layer4.0,layer4.1; resnet10 layer3,layer4; wrn28_10 block3.3.branch,final; smallcnn conv3)", str)
    probes: str = arg(None, "probe per position, linear | mlp (default: mlp before the last position, linear at it)", str)
    # --- CIFS (paper §3) and its ablations (CIFS appendix E) ---------------------------------------
    beta: float = arg(2.0, "beta of Eq. 3: weight of the probe losses (and of the training attack's joint loss)")
    mask_fn: str = arg("softmax", "IMGF: the importance-mask function", choices=("softmax", "sigmoid", "softplus"))
    softmax_scale: float = arg(None, "scale s of the softmax mask s * softmax(g) (default: 2 for resnet18 and resnet10, "
                               "as the models behind the published tables; smallcnn 128; 1 for wrn28_10 and the others)", float)
    top_k: int = arg(2, "classes whose probe logits define the relevance (appendix E.2: 1, 2, 3)")
    hidden: int = arg(None, "hidden width of the MLP probe (default 128; 240 for wrn28_10)", int)
    official_scale: bool = arg(False, "multiply the loss by 3/(beta+1) as the official training code (beta ablation)")
    # --- optimisation (unset = the published recipe of the dataset, see DEFAULTS) -----------------
    epochs: int = arg(None, "training epochs (default 120; wrn28_10 110; tinyimagenet 100)", int)
    lr: float = arg(None, "initial SGD learning rate (default 0.1; svhn 0.01)", float)
    weight_decay: float = arg(None, "SGD weight decay on all parameters (default 2e-4; svhn and wrn28_10 5e-4)", float)
    milestones: str = arg(None, "epochs run before each 10x lr drop, as torch's MultiStepLR in the official code "
                          "(default 75,90; fmnist 45,75,90)", str)
    batch_size: int = arg(128, "training batch size")
    momentum: float = arg(0.9, "SGD momentum")
    augment: str = arg(None, "training augmentation (default: crop_flip; svhn, fmnist, synthetic none)", str,
                       ("none", "crop_flip"))
    train_size: int = arg(None, "train on a seeded, class-balanced subset of this many training images "
                          "(quick runs; default: all of them, as the paper)", int)
    # --- the training attack -----------------------------------------------------------------
    epsilon: float = arg(None, "L-inf budget in image units (default 8/255; fmnist 0.3)", float)
    attack_steps: int = arg(None, "steps of the training attack (default 10; fmnist 20)", int)
    attack_step_size: float = arg(None, "step of the training attack (default eps/4; fmnist 0.02)", float)
    trades_beta: float = arg(6.0, "TRADES beta")
    mart_beta: float = arg(6.0, "MART beta (the MART ResNet-18 script used 5)")
    random_start: bool = arg(None, "random start of the training attack (default: on, each strategy's own: "
                             "uniform for AT and FAT, 0.001 N for TRADES and MART); --no-random-start starts at x", bool)
    fat_omega: float = arg(0.001, "FAT: std of the noise added at each attack step (FAT's default; the CIFS "
                           "repository's FAT wrapper passes 0)")
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
    init_from: str = arg(None, "start from the weights of a cifs.py checkpoint or of a state dict saved by the "
                         "official ResNet-18 script (the authors' warm start)", str)
    official_softmax_scale: float = arg(None, "with --init-from an official file: the mask scale it was trained with "
                                        "(1 or 2, see OFFICIAL_SOFTMAX_SCALES); the run's too unless --softmax-scale", float)
    log_interval: float = arg(30.0, "seconds between progress lines within an epoch (the first after 5 s)")


# The published recipe per dataset (CIFS §4.1 and appendices B-D; official CIFAR10_Res18_CIFS.py). Milestones
# are those of the official MultiStepLR([75, 90]), stepped after each epoch: 75 epochs at 0.1, then
# 15 at 0.01 (the authors' log shows 0-indexed epoch 74 at 0.1 and epoch 75 at 0.01). Weight decay
# 2e-4 for ResNet-18 and ResNet-10, 5e-4 for SVHN and WRN-28-10 (see resolve). Synthetic is a CPU demo.
DEFAULTS = {
    "cifar10": dict(model="resnet18", epochs=120, lr=0.1, weight_decay=2e-4, milestones="75,90", attack_steps=10, step=1 / 4),
    "cifar100": dict(model="resnet18", epochs=120, lr=0.1, weight_decay=2e-4, milestones="75,90", attack_steps=10, step=1 / 4),
    "svhn": dict(model="resnet18", epochs=120, lr=0.01, weight_decay=5e-4, milestones="75,90", attack_steps=10, step=1 / 4),
    "tinyimagenet": dict(model="resnet18", epochs=100, lr=0.1, weight_decay=2e-4, milestones="75,90", attack_steps=10, step=1 / 4),
    "fmnist": dict(model="resnet10", epochs=120, lr=0.1, weight_decay=2e-4, milestones="45,75,90", attack_steps=20, step=0.02 / 0.3),
    # CIFS starts slowly (the softmax mask shrinks the features ~C-fold at first), hence more steps.
    "synthetic": dict(model="smallcnn", epochs=20, lr=0.1, weight_decay=5e-4, milestones="14,17", attack_steps=5, step=1 / 4),
}
# (positions in forward order, probe per position): P2 (MLP probe) then P1 (linear probe) (CIFS §4.1,
# appendix E.2): both blocks of ResNet-18's layer4, layer3 and layer4 of ResNet-10, the last block's
# branch and the final BN-ReLU of WRN-28-10; other backbones mirror it on their last two units.
DEFAULT_POSITIONS = {
    "resnet18": ("layer4.0,layer4.1", "mlp,linear"),
    "resnet10": ("layer3,layer4", "mlp,linear"),
    "wrn28_10": ("block3.3.branch,final", "mlp,linear"),
    "wrn34_10": ("block3.4,final", "mlp,linear"),
    "resnet50": ("layer4.1,layer4.2", "mlp,linear"),
    "vgg16": ("stage5,pool5", "mlp,linear"),
    # Our CPU-scale network (not the paper's): only its last unit, as the paper's last position P1. A probe
    # on conv2 stays near chance, and the label-built training masks then teach the classifier to read the
    # label from the mask, which test time does not have (docs/cifs.md, "CIFS on the CPU-scale network").
    "smallcnn": ("conv3", "linear"),
    "smallcnn_wide": ("conv3", "linear"),
}
# The softmax scale s of m = s * softmax(g): 2 for the ResNets behind the published tables (the compiled
# `resnet_CSAFR_topk` module their result logs name, and the first public resnet_CIFS.py); 1 for
# WRN-28-10 (its module) and backbones the paper did not use. OFFICIAL_SOFTMAX_SCALES: the released files.
# smallcnn and smallcnn_wide (ours): their channel count at conv3, so the mask averages 1 and does not shrink
# the feature C-fold at the start of a run of a few epochs (docs/cifs.md, "CIFS on the CPU-scale network").
SOFTMAX_SCALE = {"resnet18": 2.0, "resnet10": 2.0, "smallcnn": 128.0, "smallcnn_wide": 758.0}
# What the training accuracy measures (said next to it on the console and in curves.png).
TRAIN_ACCURACY_NOTE = "training batches, train mode: masks from the true label's logit"


def resolve(args: Args) -> Args:
    """Fill every None setting with the paper default of the dataset and backbone (CIFS appendices B-D)."""
    info = dataset_info(args.dataset)
    defaults = DEFAULTS[args.dataset]
    values = dict(model=defaults["model"], epochs=defaults["epochs"], lr=defaults["lr"],
                  weight_decay=defaults["weight_decay"], milestones=defaults["milestones"],
                  augment=info.augment, epsilon=info.epsilon, attack_steps=defaults["attack_steps"])
    if args.model == "wrn28_10":  # CIFS's WRN-28-10: 110 epochs, weight decay 5e-4, MLP probe width 240
        values.update(epochs=110, weight_decay=5e-4)
    resolved = dataclasses.replace(args, **{k: v for k, v in values.items() if getattr(args, k) is None})
    if resolved.attack_step_size is None:
        resolved.attack_step_size = defaults["step"] * resolved.epsilon
    if resolved.hidden is None:
        resolved.hidden = 240 if resolved.model == "wrn28_10" else 128
    if resolved.softmax_scale is None:  # warm start from an official file: its own scale, unless --softmax-scale
        resolved.softmax_scale = resolved.official_softmax_scale or SOFTMAX_SCALE.get(resolved.model, 1.0)
    if resolved.no_cifs:
        resolved.positions, resolved.probes = resolved.positions or "", resolved.probes or ""
    elif resolved.positions is None:
        resolved.positions, probes = DEFAULT_POSITIONS[resolved.model]
        resolved.probes = resolved.probes or probes
    elif resolved.probes is None:  # the last position gets the linear probe, the others the MLP
        resolved.probes = ",".join(["mlp"] * resolved.positions.count(",") + ["linear"])
    if resolved.random_start is None:
        resolved.random_start = True
    return resolved


# ==== CIFS module (paper §3) =================================================================
# Differences from the official code (HanshuYAN/CIFS) are listed, with their reasons, in docs/cifs.md
# ("Differences from the official code"); each is also noted where it is coded.

PROBES = ("linear", "mlp")
MASK_FUNCTIONS = ("softmax", "sigmoid", "softplus")


def make_probe_head(channels: int, num_classes: int, probe: str, hidden: int) -> nn.Sequential:
    """The probe after global average pooling (CIFS appendix E.4): Linear(C, K), or
    Linear(C, hidden)-Softplus(beta=5)-Linear(hidden, K). hidden = 128 (ResNet), 240 (WRN-28-10)."""
    if probe == "linear":
        return nn.Sequential(nn.Linear(channels, num_classes))
    if probe == "mlp":
        return nn.Sequential(nn.Linear(channels, hidden), nn.Softplus(beta=5), nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown probe {probe!r}; use one of {PROBES}")


def select_classes(q: torch.Tensor, top_k: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per example, the top_k classes whose logits define the relevance (B x top_k indices).
    labels=None (eval mode, test time): the top-k classes of the probe logits q (paper: top-2). With
    labels (train mode): y in place of rank 1, then ranks 2..k of q; for k = 2, y and the rank-2 class,
    as the official code (`topk(q, 2)[1][:, 1]` next to y). So y at rank 2 counts twice and rank 1 is
    skipped when y ranks lower: kept, since the published numbers were trained this way."""
    ranked = q.topk(top_k, dim=1).indices
    if labels is None:
        return ranked
    return torch.cat([labels[:, None], ranked[:, 1:]], dim=1)


def relevance_mask(g: torch.Tensor, mask_fn: str, softmax_scale: float = 1.0) -> torch.Tensor:
    """IMGF: channel relevance g (B x C) -> channel mask (B x C), computed in fp32 at least (CIFS §3).
    softmax: softmax_scale * softmax over channels (see SOFTMAX_SCALE); sigmoid: sigmoid(10 g);
    softplus: softplus_{beta=5}(g) (appendix A's CIFS-sigmoid and CIFS-softplus: in the authors'
    repository only as compiled modules, models/nets/__pycache__/resnet_CSAFR_top2_*.pyc)."""
    g = g if g.dtype == torch.float64 else g.float()  # fp32 at least (float64 stays: gradient checks)
    if mask_fn == "softmax":
        return softmax_scale * F.softmax(g, dim=1)
    if mask_fn == "sigmoid":
        return torch.sigmoid(10.0 * g)
    if mask_fn == "softplus":
        return F.softplus(g, beta=5)
    raise ValueError(f"unknown mask function {mask_fn!r}; use one of {MASK_FUNCTIONS}")


def global_average_pool(z: torch.Tensor) -> torch.Tensor:
    return z.mean(dim=(2, 3))


class CIFS(nn.Module):
    """Channel-wise importance-based feature selection on a feature map z (B x C x H x W).

    forward(z, labels=None) -> (z * m[:, :, None, None], {"probe": p}), the `Network.insert` contract:
      p = probe(z), the raw probe logits on the non-detached z (their CE, Eq. 3, trains probe and backbone);
      m = IMGF(g), g = dS/du: the gradient of S (the sum of the selected probe logits, `select_classes`)
        w.r.t. the pooled vector u (Eq. 2, §3.2; in closed form, see `relevance`): the backbone gets
        d(z*m)/dz = m, attacks see a constant mask, in train mode the probe also learns through the mask.
    Train mode needs the true labels, passed as in the official `forward(x, y=None)` (`model(x, y)`);
    eval mode ignores them and uses the probe's own top-k (what test time and attacks see)."""

    def __init__(self, channels: int, num_classes: int, probe: str = "linear", hidden: int = 128,
                 mask_fn: str = "softmax", softmax_scale: float = 1.0, top_k: int = 2):
        super().__init__()
        if mask_fn not in MASK_FUNCTIONS:
            raise ValueError(f"unknown mask function {mask_fn!r}; use one of {MASK_FUNCTIONS}")
        if not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k={top_k} must be between 1 and num_classes={num_classes}")
        self.head = make_probe_head(channels, num_classes, probe, hidden)
        self.probe, self.mask_fn, self.softmax_scale, self.top_k = probe, mask_fn, softmax_scale, top_k
        # evaluate.py's "(through mask)" columns (default for CIFS models; --no-through-mask: off; not in
        # either paper): the relevance is taken on u itself with its graph, so gradients flow through m.
        self.differentiable_mask = False

    def extra_repr(self) -> str:
        return f"probe={self.probe}, mask_fn={self.mask_fn}, softmax_scale={self.softmax_scale}, top_k={self.top_k}"

    def relevance(self, u: torch.Tensor, classes: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """CIFS Eq. 2, g = dS/du (B x C), in closed form: S = sum_i sum_{c in classes_i} q_ic (a class
        selected twice counts twice), so by the chain rule through the probe: linear, q = W u + b:
        g = sum_c W[c] (the selected rows of W); MLP, q = W2 softplus_5(h) + b2, h = W1 u + b1 (`hidden`):
        g = W1^T (softplus_5'(h) * sum_c W2[c]), softplus_5'(h) = sigmoid(5 h), exactly 1 above torch's
        threshold 5 h > 20 (its own backward op). The official code takes this gradient with autograd.grad;
        this is the same function (tested, gradients included) without a nested autograd call, so it
        compiles. Its graph, as the official create_graph: train mode, on the detached u with the graph to
        the probe's parameters; eval mode, a constant; through the mask (evaluate.py), on u itself."""
        through = self.differentiable_mask and u.requires_grad
        g = F.embedding(classes, self.head[-1].weight).sum(1)  # = W[classes].sum(1): dS/d(probe input of W)
        if self.probe == "mlp":
            if self.training and not through:  # h on the detached u: no mask gradient into the backbone
                hidden = self.head[0](u.detach())
            beta, threshold = self.head[1].beta, self.head[1].threshold
            g = torch.ops.aten.softplus_backward(g.to(hidden.dtype), hidden, beta, threshold) @ self.head[0].weight
        return g if self.training or through else g.detach()

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        if self.training and labels is None:
            raise ValueError("CIFS in train mode needs the true labels (the relevance uses the label's logit): call "
                             "model(x, y), or model.eval() for top-k masks")
        if self.training and labels.shape != (z.shape[0],):
            raise ValueError(f"CIFS labels have shape {tuple(labels.shape)}, expected ({z.shape[0]},)")
        u = global_average_pool(z)  # once: the probe's input and the point where Eq. 2 differentiates
        hidden = self.head[0](u) if self.probe == "mlp" else None
        p = self.head[2](self.head[1](hidden)) if self.probe == "mlp" else self.head(u)
        classes = select_classes(p.detach(), self.top_k, labels if self.training else None)  # indices: no gradient
        m = relevance_mask(self.relevance(u, classes, hidden), self.mask_fn, self.softmax_scale).to(z.dtype)
        return z * m[:, :, None, None], {"probe": p}


# ==== The network that hosts it ==============================================================


def build_network(args: Args) -> Network:
    """The backbone with a CIFS module at each position, in forward order, each with its probe."""
    net = build_model(args.model, dataset_info(args.dataset).num_classes, input_shape(args))
    if args.no_cifs:
        return net
    for position, probe in zip(args.positions.split(","), args.probes.split(",")):
        try:
            channels = net.feature_shapes[net.canonical(position)][0]
            module = CIFS(channels, net.num_classes, probe, args.hidden, args.mask_fn, args.softmax_scale, args.top_k)
            # Official code: the WRN-28-10 constructor builds both probes before its initialisation loop,
            # which zeroes their Linear biases (models/nets/wide_resnet_CIFS.py); the ResNet-18 and
            # ResNet-10 have no loop (models/nets/resnet_CIFS.py). The backbone knows which applies.
            net.insert(position, net.initialise_like_backbone(module))
        except ValueError as error:  # unknown or repeated position, unknown probe
            raise ValueError(f"--positions {args.positions!r} / --probes {args.probes!r}: {error}") from None
    return net


# The official CIFS ResNet-18 (HanshuYAN/CIFS models/nets/resnet_CIFS.py, `ResNet18_L4`, trained by
# CIFAR10_Res18_CIFS.py) keeps each probe inside its layer4 block, `layer4.<j>.Probe.Probe`: after
# layer4.0 an MLP (`0.fc`, Softplus, then Linear `1`, hidden 128), after layer4.1 a linear probe
# (`1`), with 10 classes written into the code. The script saves {"state_dict": net.state_dict(),
# "stop_epoch": ..., "optimizer": ...}, DataParallel unwrapped. Our slot -> probe type:
OFFICIAL_PROBES = {"layer4_0": "mlp", "layer4_1": "linear"}
# Its mask m = s * softmax(g); a checkpoint holds no trace of s (the same keys), so the user states it:
OFFICIAL_SOFTMAX_SCALES = {  # models/nets/resnet_CIFS.py at two commits of HanshuYAN/CIFS:
    1.0: "the released resnet_CIFS.py (commit 8fe457a, class CIFS, --network CIFS_L4: F.softmax(...))",
    2.0: "the first public resnet_CIFS.py (commit 2d8217c, class CSAFR, --network CSAFR_topk: F.softmax(...) * 2), "
         "like the compiled resnet_CSAFR_topk module behind the published tables"}


def official_state_dict(checkpoint: dict, args: Args) -> tuple[dict, list[str]]:
    """(our state dict for `build_network(args)`, notes) from a checkpoint saved by the official CIFS
    training script CIFAR10_Res18_CIFS.py (the whole dict, or its "state_dict"). `args`: resolved,
    model resnet18 on a 10-class dataset, the default CIFS layout (MLP probe after layer4.0, linear
    after layer4.1, hidden 128) and `args.official_softmax_scale`, the scale the file was trained with
    (without it a file with probes is refused); with --no-cifs, the vanilla ResNet-18 (`--network _`,
    models/nets/resnet_.py). A note warns when the mask differs from the official module's (that
    scale * softmax, top-2). Anything that does not fit is a one-line ValueError naming it."""
    if args.model != "resnet18":
        raise ValueError(f"the official CIFS training script (CIFAR10_Res18_CIFS.py) trains resnet18, not {args.model!r}")
    with torch.device("meta"):  # names and shapes only: no memory, no random numbers drawn
        reference = build_network(args)
    if reference.num_classes != 10:
        raise ValueError(f"the official CIFS ResNet-18 has 10 classes written into its probes and classifier "
                         f"(models/nets/resnet_CIFS.py); dataset {args.dataset!r} has {reference.num_classes}")
    notes = []
    if args.no_cifs:  # models/nets/resnet_.py: the backbone names of resnet_CIFS.py without probes
        rules = ()
    else:
        layout = {slot: module.probe for slot, module in reference.inserted.items()}
        if layout != OFFICIAL_PROBES:
            raise ValueError(f"the official CIFS ResNet-18 has an MLP probe after layer4.0 and a linear probe after "
                             f"layer4.1; these settings give {layout}")
        rules = (
            (r"layer4\.0\.Probe\.Probe\.0\.fc\.", "inserted.layer4_0.head.0."),  # MLP: Linear(512, 128)
            (r"layer4\.0\.Probe\.Probe\.1\.", "inserted.layer4_0.head.2."),       # MLP: Linear(128, 10)
            (r"layer4\.1\.Probe\.Probe\.1\.", "inserted.layer4_1.head.0."),       # linear: Linear(512, 10)
        )
        scale = args.official_softmax_scale
        if scale is None:
            raise ValueError("an official CIFS ResNet-18 file does not record its mask scale: pass "
                             "--official-softmax-scale 1 (the released models/nets/resnet_CIFS.py) or 2 (the first "
                             "public one, as the modules behind the published tables)")
        if (args.mask_fn, args.softmax_scale, args.top_k) != ("softmax", scale, 2):
            notes.append(f"the official module's mask is {scale:g} * softmax of the top-2 relevance "
                         f"(--official-softmax-scale {scale:g}); this network has mask_fn={args.mask_fn}, "
                         f"softmax_scale={args.softmax_scale:g}, top_k={args.top_k}: its outputs differ")
    ours, mapped = official_to_ours(checkpoint, "resnet18", rules, reference.state_dict(),
                                    "official CIFS CIFAR10_Res18_CIFS.py")
    return ours, mapped + notes


# ==== Losses (CIFS Eq. 3) ====================================================================


def probe_loss(emitted: list, y: torch.Tensor) -> torch.Tensor:
    """(1 / L_c) sum_l CE(p_l, y): the probe term of Eq. 3 (beta multiplies it); 0 without probes."""
    if not emitted:
        return torch.zeros((), device=y.device)
    return torch.stack([F.cross_entropy(e["probe"].float(), y) for e in emitted]).mean()


def cifs_loss(logits: torch.Tensor, emitted: list, y: torch.Tensor, beta: float = 2.0, official_scale: bool = False,
              loss_cls: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """CIFS Eq. (3): CE(final, y) + (beta / L_c) * sum_l CE(p_l, y), L_c = number of CIFS layers, on
    the batch that trains; `emitted`: each module's {"probe": p_l}. `loss_cls` replaces CE(final, y)
    by a strategy's loss (TRADES, MART: our decision; the probe terms stay on that batch).
    official_scale: x 3/(beta+1), as the official training code (1 at beta = 2). fp32. Returns (loss,
    parts), detached for logging: "cls" (when computed here), "probe" = mean_l CE(p_l) (with probes)."""
    cls = F.cross_entropy(logits.float(), y) if loss_cls is None else loss_cls
    probe = probe_loss(emitted, y)
    loss = cls + beta * probe  # beta * mean_l == (beta / L_c) * sum_l
    if official_scale:
        loss = loss * (3.0 / (beta + 1.0))
    parts = {"cls": cls.detach()} if loss_cls is None else {}
    return loss, {**parts, **({"probe": probe.detach()} if emitted else {})}


def joint_attack_loss(beta: float = 2.0):
    """Per-example CE(final) + (beta / L_c) * sum_l CE(p_l), in fp32: the loss the CIFS training
    attack maximises (CIFAR10_Res18_CIFS.py; the adaptive attack of Table B.3 with beta_atk = beta).
    For `attacks.pgd`, which passes the raw model output (logits, emitted)."""
    def loss_fn(output, y: torch.Tensor) -> torch.Tensor:
        logits, emitted = output if isinstance(output, (tuple, list)) else (output, [])
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        if emitted:
            first, *rest = (F.cross_entropy(e["probe"].float(), y, reduction="none") for e in emitted)
            probe_sum = sum(rest, first)  # (sum() from 0 would add one op)
            loss = loss + (beta / len(emitted)) * probe_sum
        return loss
    return loss_fn


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
    """Eq. 3 with the strategy's L_cls in place of CE(final, y) (for AT they are the same)."""
    return cifs_loss(logits, emitted, y, args.beta, args.official_scale, loss_cls=loss_cls)


def attack_loss(args):
    """The training attack maximises the joint loss of Eq. 3, CE(final) + (beta / L_c) sum_l CE(p_l),
    with the training beta (2, appendix B.1), in eval mode; vanilla models (no probes) get plain CE."""
    return joint_attack_loss(args.beta)


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

METHOD_RANGES = {"beta": NON_NEGATIVE, "softmax_scale": POSITIVE, "hidden": AT_LEAST_1,
                 "official_softmax_scale": (lambda v: v in OFFICIAL_SOFTMAX_SCALES, "must be 1 (the released "
                                            "resnet_CIFS.py) or 2 (the first public one)")}


def check_method_args(args: Args) -> None:
    """CIFS's cross-field rules, each refused in one line that names the flags."""
    num_classes = dataset_info(args.dataset).num_classes
    if not 1 <= args.top_k <= num_classes:
        raise ValueError(f"--top-k {args.top_k} must be between 1 and the {num_classes} classes of {args.dataset}")
    if args.official_softmax_scale is not None and not args.init_from:
        raise ValueError("--official-softmax-scale describes the official file of --init-from: add --init-from or drop it")
    if args.no_cifs:
        if args.positions or args.probes:
            raise ValueError("--positions / --probes have no effect with --no-cifs: drop them")
        return
    positions, probes = args.positions.split(","), args.probes.split(",")
    if len(probes) != len(positions) or any(p not in PROBES for p in probes):
        raise ValueError(f"--probes {args.probes!r} must give one of {', '.join(PROBES)} for each of the "
                         f"{len(positions)} position(s) {args.positions!r}")


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
