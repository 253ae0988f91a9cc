"""Speed of adversarial training with and without FSR / CIFS, against a reference loop and the project's targets.

Times the training steps of `plain`, `fsr` and `cifs` (the scripts' own fast path) and of `reference` (the
same training written the older way), the scripts' fp32 PGD evaluation; counts the aten ops of a training step
(fp32, bf16, on the CPU); on request, the accuracy check and a profile (docs/performance.md says what each
figure means). From the repository root, e.g. a CPU smoke test of seconds:
    python benchmarks/speed.py --device cpu --model smallcnn --shape 3,16,16 --batch-size 32 --steps 3 \\
        --eval-images 200 --num-workers 0
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/speed.py` puts benchmarks/ on the path, not the root
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.data  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torchvision import transforms  # noqa: E402

import cifs  # noqa: E402
import fsr  # noqa: E402
from data import DeviceLoader, ImageSplit, dataset_info, make_synthetic  # noqa: E402
from models import build_model, count_parameters  # noqa: E402
from run_support import (arg, broadcast_buffers, check_args, check_finite, clean_and_robust_accuracy, data_parallel,  # noqa: E402
                         device_settings, input_shape, parse_args as parse_args_of, pick_device, process_group,
                         seed_everything)

VARIANTS = ("plain", "fsr", "cifs", "reference")
LABELS = {"plain": "plain", "fsr": "+FSR", "cifs": "+CIFS", "reference": "reference loop"}


@dataclasses.dataclass
class Args:
    # --- what to time -------------------------------------------------------------------------
    model: str = arg("resnet18", "backbone (models.build_model)")
    dataset: str = arg("cifar10", "dataset whose facts are used: classes, shape, eps, augmentation, train size")
    shape: str = arg(None, "C,H,W of the images (default: the dataset's; another shape uses 10 classes)", str)
    train_size: int = arg(None, "images per epoch for seconds/epoch (default: the dataset's, 50,000 for cifar10)", int)
    batch_size: int = arg(128, "training batch size")
    strategy: str = arg("at", "training strategy of the fast path (the reference loop does natural and at)",
                        choices=("natural", "at", "trades", "mart", "fat"))
    epsilon: float = arg(None, "L-inf budget in image units (default: the dataset's, 8/255)", float)
    attack_steps: int = arg(10, "steps of the training attack")
    attack_step_size: float = arg(None, "step of the training attack (default eps/4)", float)
    variants: str = arg("plain,fsr,cifs,reference", "comma-separated training variants to time ('none': skip)")
    steps: int = arg(20, "timed training steps per variant")
    warmup: int = arg(3, "untimed steps per variant before timing (autotuning, compilation, workers; peak memory)")
    rounds: int = arg(1, "interleaved rounds of the timed steps (order reversed every other): load drifts hit all alike")
    seed: int = arg(0, "seed of weights, data and attack noise")
    # --- device and speed settings -----------------------------------------------------------
    device: str = arg(None, "cuda | cpu | cuda:1 ... (default: cuda if available)", str)
    amp: bool = arg(False, "bf16 autocast on the fast path (opt-in, as in the scripts, whose default is fp32)")
    channels_last: bool = arg(None, "channels_last on the fast path (default: the scripts', on with CUDA)", bool)
    compile: bool = arg(False, "torch.compile the fast-path networks")
    threads: int = arg(None, "torch intra-op threads (default: torch's)", int)
    peak_tflops: float = arg(None, "peak TFLOP/s to compare against (default: from the GPU's name; none on CPU)", float)
    # --- the reference loop ------------------------------------------------------------------
    num_workers: int = arg(2, "DataLoader workers of the reference loop")
    reference_weight_grads: bool = arg(True, "reference attack by loss.backward(), also computing weight gradients "
                                       "(--no-reference-weight-grads: input-only, as the official codes)", bool)
    # --- evaluation cost -----------------------------------------------------------------------
    eval_images: int = arg(10000, "images of the PGD evaluation (0: skip; fewer than 10,000 are extrapolated)")
    eval_batch_size: int = arg(500, "batch size of the PGD evaluation")
    eval_steps: int = arg(20, "PGD steps of the evaluation (step eps/10, no random start, fp32)")
    # --- profile -------------------------------------------------------------------------------
    profile: bool = arg(False, "profile a few fast-path training steps and say where the time goes")
    profile_variant: str = arg("plain", "which fast-path variant to profile", choices=("plain", "fsr", "cifs"))
    profile_steps: int = arg(3, "profiled training steps (after --warmup untimed ones)")
    trace: bool = arg(False, "with --profile: write a Chrome trace next to --out")
    ops: bool = arg(True, "count the aten ops of one training step of plain, +FSR, +CIFS (fp32, bf16) on the CPU", bool)
    # --- robust accuracy: fp32 against the fast path --------------------------------------------
    accuracy_check: bool = arg(False, "train short runs in fp32 and on the fast path, compare val accuracy")
    method: str = arg("fsr", "script of the accuracy check (plain = fsr.py --no-fsr)", choices=("fsr", "cifs", "plain"))
    acc_dataset: str = arg("synthetic", "dataset of the accuracy check")
    acc_model: str = arg(None, "backbone of the accuracy check (default: the script's for the dataset)", str)
    acc_epochs: int = arg(None, "epochs of the accuracy check (default: the script's for the dataset)", int)
    acc_milestones: str = arg(None, "lr milestones of the accuracy check (default: the script's)", str)
    acc_synthetic_size: int = arg(None, "training images of a synthetic accuracy check (default: the script's)", int)
    acc_synthetic_shape: str = arg(None, "C,H,W of a synthetic accuracy check (default 3,32,32)", str)
    acc_val_size: int = arg(1000, "held-out images on which the accuracies are measured")
    acc_seeds: str = arg("0,1", "seeds; each trains once in fp32 and once on the fast path (2 runs per seed)")
    data_root: str = arg(None, "dataset folder of a real accuracy-check dataset (default: data, see docs/data.md)", str)
    # --- output ----------------------------------------------------------------------------------
    out: str = arg("runs/benchmark/speed.json", "JSON file with every figure, the environment and the command")


def parse_args(argv=None) -> Args:
    return parse_args_of(Args, argv, __doc__.split("\n\n")[0])


# === Settings shared by every variant =========================================================
def resolve(args: Args) -> Args:
    """Fill the None settings from the dataset (shape, train size, eps, step eps/4) and the device."""
    check_finite(args)
    info = dataset_info(args.dataset)
    epsilon = args.epsilon if args.epsilon is not None else info.epsilon
    resolved = dataclasses.replace(
        args, shape=args.shape or ",".join(map(str, info.shape)), epsilon=epsilon,
        train_size=args.train_size or info.train_size,
        attack_step_size=args.attack_step_size if args.attack_step_size is not None else epsilon / 4,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if image_shape(resolved) != info.shape and info.num_classes != 10:
        raise ValueError(f"--shape {resolved.shape} differs from {args.dataset}'s {info.shape}: such runs use the "
                         f"10-class synthetic stand-in, so pick a 10-class --dataset")
    if not 1 <= resolved.rounds <= max(resolved.steps, 1) or resolved.steps < 1 or resolved.warmup < 0:
        raise ValueError(f"need --steps >= 1, --warmup >= 0 and 1 <= --rounds <= --steps, got "
                         f"{resolved.steps}, {resolved.warmup}, {resolved.rounds}")
    if unknown := set(variant_list(resolved)) - set(VARIANTS):
        raise ValueError(f"unknown --variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return resolved


def image_shape(args: Args) -> tuple[int, int, int]:
    return tuple(int(v) for v in args.shape.split(","))


def variant_list(args: Args) -> list[str]:
    return [v for v in args.variants.split(",") if v and v != "none"]


def script_of(variant: str):
    """(script module, its Args overrides) of a fast-path variant or --method."""
    return {"plain": (fsr, dict(no_fsr=True)), "fsr": (fsr, {}), "cifs": (cifs, {})}[variant]


def script_args(script, args: Args, **overrides):
    """The script's Args for these settings. A shape other than the dataset's goes through the
    scripts' synthetic dataset (10 classes) with that shape; augmentation follows --dataset."""
    info = dataset_info(args.dataset)
    same_shape = image_shape(args) == info.shape
    values = dict(dataset=args.dataset if same_shape else "synthetic",
                  synthetic_shape=None if same_shape else args.shape,
                  model=args.model, strategy=args.strategy, batch_size=args.batch_size, augment=info.augment,
                  epsilon=args.epsilon, attack_steps=args.attack_steps, attack_step_size=args.attack_step_size,
                  eval_steps=args.eval_steps, device=args.device, amp=args.amp, channels_last=args.channels_last,
                  compile=args.compile, seed=args.seed, log_interval=1e9)
    return script.Args(**{**values, **overrides})


def forward_equivalents(args) -> int:
    """Forward-pass equivalents per training image (input-only backward ~ 1 forward, full ~ 2): the attack's
    steps, the TRADES attack's clean forward, the update passes (two for TRADES and MART)."""
    attack = 0 if args.strategy == "natural" else 2 * args.attack_steps + (args.strategy == "trades")
    return attack + (6 if args.strategy in ("trades", "mart") else 3)


def count_flops(model: nn.Module, input_shape: tuple) -> int:
    """Forward FLOPs for one image: 2 x multiply-accumulates of every Conv2d and Linear call (ResNet-18 on
    32x32: 1.11 GFLOPs, FSR Table 7; element-wise ops, pooling and CIFS's relevance matmul not counted),
    with forward hooks on a CPU copy in eval mode, the model itself untouched."""
    clone = copy.deepcopy(model).to("cpu").float().eval()
    counts = []

    def hook(module, inputs, output):
        fan_in = module.in_features if isinstance(module, nn.Linear) else \
            module.in_channels // module.groups * math.prod(module.kernel_size)
        counts.append(2 * output.numel() * fan_in)

    for module in clone.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        clone(torch.zeros(1, *input_shape))
    return sum(counts)


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far."""
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# === Peak throughput of the GPU ===============================================================
# Dense (no 2:4 sparsity) peak TFLOP/s. Sources: NVIDIA's datasheets, "NVIDIA H100 Tensor Core GPU"
# (SXM5 and PCIe columns), "NVIDIA H200 Tensor Core GPU" (SXM) and "NVIDIA A100 Tensor Core GPU"
# (SXM and PCIe alike); the datasheets quote tensor-core figures with sparsity, halved here.
# "tf32" is what fp32 convolutions run at while torch.backends.cudnn.allow_tf32 is on (the default).
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def gpu_model(device_name: str) -> str | None:
    """The PEAK_TFLOPS row of a torch.cuda.get_device_name(), or None (NVL parts run other clocks)."""
    name = device_name.upper()
    return None if "NVL" in name else ("H100 PCIe" if "PCIE" in name else "H100 SXM") if "H100" in name else \
        next((row for row in ("H200", "A100") if row in name), None)


def peak_tflops(args: Args, device: torch.device, precision: str) -> float | None:
    """--peak-tflops if given, else the table's figure for this GPU and precision; None on CPU."""
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops or None
    row = gpu_model(torch.cuda.get_device_name(device))
    tf32 = precision == "fp32" and torch.backends.cudnn.allow_tf32
    return PEAK_TFLOPS[row]["tf32" if tf32 else precision] if row else None


def training_record(args: Args, device, round_seconds: list, round_steps: list, peak_memory: float | None,
                    forward_equivalents: int, flops: int, precision: str, **extra) -> dict:
    """The figures of one timed training variant. TFLOP/s counts *useful* FLOPs (forward FLOPs x forward-
    equivalents per image); `spread`: (slowest - fastest) / mean seconds per step over the rounds (noise)."""
    seconds, steps = sum(round_seconds), sum(round_steps)
    images_per_second = steps * args.batch_size / seconds
    tflops = images_per_second * forward_equivalents * flops / 1e12
    peak = peak_tflops(args, device, precision)
    per_step = [t / n for t, n in zip(round_seconds, round_steps)]
    return {"images_per_second": images_per_second, "seconds_per_epoch": args.train_size / images_per_second,
            "tflops_per_second": tflops, "peak_tflops": peak, "fraction_of_peak": tflops / peak if peak else None,
            "peak_memory_gib": peak_memory, "forward_gflops": flops / 1e9,
            "forward_equivalents": forward_equivalents, "precision": precision, "timed_steps": steps,
            "warmup_steps": args.warmup, "timed_seconds": seconds, "round_seconds": round_seconds,
            "spread": (max(per_step) - min(per_step)) / (seconds / steps) if len(per_step) > 1 else None, **extra}


# === The fast path: what fsr.py / cifs.py train() run ==========================================
# args: the script's resolved Args; compute_model: the network the attack runs on (compiled with --compile);
# update: the script's UpdatePasses around it (the parameter-update forwards); batches: (x, y) on the device.
FastPath = collections.namedtuple("FastPath", "args device amp autocast memory_format model compute_model update "
                                              "optimizer batches")


def fast_path(script, script_arguments, n_batches: int, rank: int = 0, world_size: int = 1) -> FastPath:
    """Model, optimiser and data exactly as the script's train() sets them up (the on-device loader),
    over n_batches of synthetic images of the run's shape; under torchrun (world_size > 1) each
    process takes its share of every global batch and the update passes are DDP-wrapped."""
    args = script.resolve(script_arguments)
    check_args(args, script.METHOD_RANGES)
    script.check_method_args(args)
    device, amp, autocast, memory_format = device_settings(args)
    seed_everything(args.seed, args.deterministic)
    shape, info = input_shape(args), dataset_info(args.dataset)
    model = script.build_network(args).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    compute_model = torch.compile(model) if args.compile else model
    update = script.UpdatePasses(compute_model, args.strategy)
    update = data_parallel(update, device) if world_size > 1 else update
    split = make_synthetic(info.num_classes, shape, n_batches * args.batch_size, args.seed, train=True)
    loader = DeviceLoader(split, args.batch_size, device, shuffle=True, augment=args.augment,
                          padding=info.padding or 4, seed=args.seed, channels_last=memory_format == torch.channels_last,
                          rank=rank, world_size=world_size)
    return FastPath(args, device, amp, autocast, memory_format, model, compute_model, update, optimizer,
                    loader.epoch(0))


# A variant ready to time: step(x, y) = one training step; record(round_seconds, round_steps, peak memory) = figures.
Prepared = collections.namedtuple("Prepared", "step batches record")


def prepare_fast_path(variant: str, args: Args, rank: int = 0, world_size: int = 1) -> Prepared:
    """The step is the scripts' own training_step + zero_grad + backward + SGD step (+ the BatchNorm
    broadcast under torchrun), as in their train()."""
    script, overrides = script_of(variant)
    run = fast_path(script, script_args(script, args, **overrides), args.warmup + args.steps, rank, world_size)

    def step(x, y):
        loss, _, _ = script.training_step(run.compute_model, x, y, run.args, 0, run.autocast, run.update)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if world_size > 1:
            broadcast_buffers(run.model, run.args.sync_bn)

    def record(round_seconds, round_steps, peak_memory):
        return training_record(args, run.device, round_seconds, round_steps, peak_memory,
                               forward_equivalents(run.args), count_flops(run.model, input_shape(run.args)),
                               "bf16" if run.amp else "fp32", parameters=count_parameters(run.model),
                               channels_last=run.memory_format == torch.channels_last,
                               compiled=bool(run.args.compile), data="on-device uint8 (data.DeviceLoader)",
                               attack_gradients="input only", processes=world_size)

    return Prepared(step, run.batches, record)


def round_sizes(steps: int, rounds: int) -> list[int]:
    """`steps` split into `rounds` near-equal parts."""
    return [steps // rounds + (r < steps % rounds) for r in range(rounds)]


def time_variants(args: Args, variants: list[str], log=print, rank: int = 0, world_size: int = 1) -> dict:
    """Prepare each variant and run its warm-up steps (peak GPU memory is measured there, net of what the
    variants before it hold), then time args.steps steps of each in args.rounds rounds, interleaved:
    order a, b, c, then c, b, a, ... Returns {variant: figures}."""
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    prepared, peaks, skipped = {}, {}, {}
    for variant in variants:
        log(f"preparing {LABELS[variant]} ({args.warmup} warm-up steps) ...")
        before = torch.cuda.memory_allocated(device) if on_gpu else 0
        reset_peak_memory(device)
        ready = prepare_reference(args) if variant == "reference" else \
            prepare_fast_path(variant, args, rank, world_size)
        if isinstance(ready, str):
            skipped[variant] = {"skipped": ready}
            continue
        for _ in range(args.warmup):
            ready.step(*next(ready.batches))
        clock(device)  # the warm-up steps finish before the next variant is prepared
        peaks[variant] = peak_memory_gib(device) - before / 2**30 if on_gpu and args.warmup else None
        prepared[variant] = ready
    sizes = round_sizes(args.steps, args.rounds) if prepared else []
    seconds = {variant: [] for variant in prepared}
    for r, size in enumerate(sizes):
        order = list(prepared) if r % 2 == 0 else list(reversed(prepared))
        log(f"timing round {r + 1}/{len(sizes)}: {size} steps each of {', '.join(LABELS[v] for v in order)} ...")
        for variant in order:
            started = clock(device)
            for _ in range(size):
                prepared[variant].step(*next(prepared[variant].batches))
            seconds[variant].append(clock(device) - started)
    return {variant: prepared[variant].record(seconds[variant], sizes, peaks[variant]) if variant in prepared
            else skipped[variant] for variant in variants}


# === The reference loop: the same training written the older way ==============================
class PILImageDataset(torch.utils.data.Dataset):
    """Like torchvision.datasets.CIFAR10: uint8 H x W x C arrays in memory, each item a PIL image through `transform`."""

    def __init__(self, split: ImageSplit, transform):
        images = split.images.permute(0, 2, 3, 1).numpy()  # N x H x W x C, as CIFAR10.data; 1 channel: mode "L"
        self.data = images[..., 0] if images.shape[-1] == 1 else images
        self.targets, self.transform = split.labels.tolist(), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def reference_loader(split: ImageSplit, args: Args) -> torch.utils.data.DataLoader:
    """CPU DataLoader, PIL transforms: pad-4 random crop + flip + ToTensor (ToTensor alone for a dataset that does
    not augment). (Official CIFS: these transforms, 4 workers; FSR train.py: a longer PIL round trip, no workers.)"""
    info = dataset_info(args.dataset)
    augment = [transforms.RandomCrop(image_shape(args)[1:], padding=info.padding or 4),
               transforms.RandomHorizontalFlip()] if info.augment == "crop_flip" else []
    dataset = PILImageDataset(split, transforms.Compose([*augment, transforms.ToTensor()]))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                       num_workers=args.num_workers)


def reference_attack(model, x, y, eps: float, step_size: float, steps: int, weight_grads: bool = True):
    """Madry PGD, old style: eval mode, a uniform random start, `loss.backward()` (which also computes and
    accumulates every weight's .grad: the extra cost this style pays), sign step, projection onto the
    eps-ball and [0, 1]. weight_grads=False: torch.autograd.grad w.r.t. the input, as the official FSR code."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = F.cross_entropy(model(x_adv)[0], y)  # our networks return (logits, emitted)
        if weight_grads:
            loss.backward()
            grad = x_adv.grad
        else:
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv.detach()


def prepare_reference(args: Args) -> Prepared | str:
    """fp32, contiguous, the same backbone (models.build_model), reference_loader, reference_attack,
    then CE on x_adv and an SGD step. A string says why it cannot run."""
    if args.strategy not in ("natural", "at"):
        return f"the reference loop implements natural and at, not {args.strategy}"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True  # as the official FSR train.py
    shape, classes = image_shape(args), dataset_info(args.dataset).num_classes
    model = build_model(args.model, classes, shape).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    split = make_synthetic(classes, shape, (args.warmup + args.steps) * args.batch_size, args.seed, train=True)

    def step(x, y):
        x, y = x.to(device), y.to(device)
        if args.strategy == "at":
            x = reference_attack(model, x, y, args.epsilon, args.attack_step_size, args.attack_steps,
                                 args.reference_weight_grads)
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x)[0], y).backward()
        optimizer.step()

    def record(round_seconds, round_steps, peak_memory):
        plain = fsr.resolve(script_args(fsr, args, no_fsr=True))
        # Useful FLOPs: the fast path's count for the same training (an input-only attack backward
        # = 1 forward), so that TFLOP/s ratios equal images/s ratios. With weight gradients the
        # attack's backward really costs ~2 forwards: `executed_forward_equivalents` says what ran.
        attack = (3 if args.reference_weight_grads else 2) * args.attack_steps if args.strategy == "at" else 0
        return training_record(args, device, round_seconds, round_steps, peak_memory, forward_equivalents(plain),
                               count_flops(model, shape), "fp32", parameters=count_parameters(model),
                               executed_forward_equivalents=attack + 3, channels_last=False, compiled=False,
                               data=f"DataLoader, PIL transforms, {args.num_workers} workers",
                               attack_gradients="input and weights" if args.reference_weight_grads else "input only")

    return Prepared(step, iter(reference_loader(split, args)), record)


# === Evaluation cost: the scripts' PGD evaluation ==============================================
def time_evaluation(variant: str, args: Args, log=print) -> dict:
    """Seconds of the script's clean_and_robust_accuracy() over eval_images images, extrapolated to 10,000."""
    log(f"timing the PGD-{args.eval_steps} evaluation of {LABELS[variant]} on {args.eval_images} images ...")
    script, overrides = script_of(variant)
    run = fast_path(script, script_args(script, args, **overrides), 1)  # the model as train() builds it
    model, device, shape, run_args = run.model.eval(), run.device, input_shape(run.args), run.args
    split = make_synthetic(dataset_info(args.dataset).num_classes, shape, args.eval_images, args.seed, train=False)
    if args.warmup:  # one batch, one PGD step: cuDNN picks its fp32 kernels for this batch size
        first = ImageSplit(split.images[:args.eval_batch_size], split.labels[:args.eval_batch_size], split.num_classes)
        clean_and_robust_accuracy(model, DeviceLoader(first, args.eval_batch_size, device, shuffle=False),
                                  dataclasses.replace(run_args, eval_steps=1))
    loader = DeviceLoader(split, args.eval_batch_size, device, shuffle=False)
    reset_peak_memory(device)
    started = clock(device)
    clean_and_robust_accuracy(model, loader, run_args)
    seconds = clock(device) - started
    forward_equivalents = 2 * args.eval_steps + 2  # attack: forward + input-only backward; 2 accuracy forwards
    return {"images": args.eval_images, "seconds": seconds, "images_per_second": args.eval_images / seconds,
            "seconds_per_10000": seconds * 10000 / args.eval_images,
            "extrapolated": None if args.eval_images == 10000 else
            f"measured on {args.eval_images} images, scaled linearly to 10,000",
            "tflops_per_second": args.eval_images / seconds * forward_equivalents * count_flops(model, shape) / 1e12,
            "forward_equivalents": forward_equivalents, "peak_memory_gib": peak_memory_gib(device)}


# === Ops per training step: what an eager GPU step launches ==================================
class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (views apart: they launch no kernel) and the casts among them."""
    ops = casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops, self.casts = self.ops + (not func.is_view), self.casts + (func is torch.ops.aten._to_copy.default)
        return func(*args, **(kwargs or {}))


def op_counts(args: Args, log=print) -> dict:
    """Aten ops of one training step (training_step, backward, SGD step; after an uncounted one) of plain, +FSR,
    +CIFS and the casts of its attack, eager on the CPU, fp32 and bf16, with the overheads in ops and FLOPs: an eager
    GPU step at batch 128 is launch- and memory-bound, so counts, not FLOPs, set them; batch-independent (2 here)."""
    log("counting the aten ops of one training step of plain, +FSR, +CIFS (fp32, bf16) ...")
    counts = {"fp32": {}, "bf16": {}}
    for (precision, row), variant in itertools.product(counts.items(), ("plain", "fsr", "cifs")):
        script, overrides = script_of(variant)
        run = fast_path(script, script_args(script, args, **overrides, device="cpu", amp=precision == "bf16",
                                            channels_last=False, compile=False, batch_size=2), 1)
        (x, y), step, attack = next(run.batches), OpCounter(), OpCounter()
        for counter in (contextlib.nullcontext(), step):
            with counter:
                loss = script.training_step(run.model, x, y, run.args, 0, run.autocast)[0]
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                run.optimizer.step()
        with attack, run.autocast():
            script.craft_adversarial(run.model, x, y, run.args, 0, script.attack_loss(run.args))
        counted = {"ops": step.ops, "attack_casts": attack.casts, "forward_flops": count_flops(run.model, input_shape(run.args))}
        row[variant] = {**counted, **{f"{key}_overhead_percent": (counted[key] / row["plain"][key] - 1) * 100
                                      for key in ("ops", "forward_flops") if variant != "plain"}}
    return counts


# === Ratios and the project's targets ========================================================
# Seconds per epoch of the plain fast path on an H100 (ResNet-18, 3x32x32, batch 128, PGD-10 AT): 8 in bf16, 15 in fp32
# (TF32). Overheads over plain: time per image on an H100; aten ops per step (fp32), casts in its attack (bf16), CPU.
EPOCH_TARGETS = {"bf16": 8.0, "fp32": 15.0}
TARGET_SETTINGS = dict(model="resnet18", shape="3,32,32", batch_size=128, strategy="at", attack_steps=10)
TIME_TARGETS, OP_TARGETS, CAST_TARGET = {"fsr": 6.0, "cifs": 10.0}, {"fsr": 15.0, "cifs": 10.0}, 26


def ratios(variants: dict) -> dict:
    """Speed-up of the fast path over the reference loop (ratio of images/s) and the time per image
    that FSR and CIFS add over the plain backbone: (plain img/s / method img/s - 1) x 100 %."""
    ips = {name: (variants.get(name) or {}).get("images_per_second") for name in VARIANTS}
    plain = ips["plain"]
    return {"speedup_over_reference": plain / ips["reference"] if plain and ips["reference"] else None,
            **{f"{v}_overhead_percent": (plain / ips[v] - 1) * 100 if plain and ips[v] else None for v in ("fsr", "cifs")}}


def check_targets(args: Args, results: dict) -> list[dict]:
    """One line per target of the project: PASS, FAIL, or why it was not judged."""
    name, r, ops = results["environment"]["device_name"], results["ratios"], results.get("ops")
    plain = results["variants"].get("plain") or {}
    differ = [f"{k} {getattr(args, k)} (target: {v})" for k, v in TARGET_SETTINGS.items() if getattr(args, k) != v]
    on_h100 = torch.device(args.device).type == "cuda" and "H100" in name.upper()
    not_here = ("not measured (no GPU)" if torch.device(args.device).type != "cuda" else "not applicable (settings "
                "differ: " + "; ".join(differ) + ")" if differ else None if on_h100 else
                f"not judged: the target is defined for an H100, this is {name}")
    lines = []

    def add(target, value, unit, limit, verdict=None, note=""):
        verdict = verdict or ("not measured (variant skipped)" if value is None else
                              ("PASS" if value <= limit else "FAIL") + note)
        lines.append({"target": target, "value": value, "unit": unit, "verdict": verdict})

    precision, epoch = plain.get("precision", "bf16" if args.amp else "fp32"), plain.get("seconds_per_epoch")
    add(f"ResNet-18 PGD-10 AT, batch 128, {precision}: <= {EPOCH_TARGETS[precision]:g} s per epoch (plain fast path)",
        epoch, "s", EPOCH_TARGETS[precision], epoch is not None and not_here)
    speedup = r["speedup_over_reference"]
    add(">= 10x the reference loop", speedup, "x", None, not_here if speedup is not None and not_here else
        None if speedup is None else "PASS" if speedup >= 10 else "FAIL")
    for v in ("fsr", "cifs"):
        add(f"{LABELS[v]} time overhead <= {TIME_TARGETS[v]:g} % over the plain backbone", r[f"{v}_overhead_percent"],
            "%", TIME_TARGETS[v], note="" if on_h100 else f" (on {name}; the target is set on an H100)")
        add(f"{LABELS[v]} <= +{OP_TARGETS[v]:g} % ops per training step over plain (fp32, CPU count)",
            ops and ops["fp32"][v]["ops_overhead_percent"], "%", OP_TARGETS[v], None if ops else "not measured (--no-ops)")
    add(f"<= {CAST_TARGET} casts in the attack per training step (bf16 autocast, CPU count, worst variant)", ops and
        max(row["attack_casts"] for row in ops["bf16"].values()), "casts", CAST_TARGET, None if ops else "not measured (--no-ops)")
    check = results.get("accuracy_check")
    add("robust accuracy unchanged by the fast path (within noise of fp32)", check and check["robust_difference"] * 100,
        "points", None, "not measured (run with --accuracy-check)" if check is None else
        ("PASS" if check["within_noise"] else "FAIL") + f" ({check['criterion']})")
    return lines


# === --accuracy-check: the same short run in fp32 and on the fast path ========================
def mean_and_spread(values: list) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def accuracy_check(args: Args, log=print) -> dict:
    """The same short run at every seed in fp32 and on the fast path (bf16 + channels_last, + --compile), compared
    on the mean final held-out accuracy (evaluated in fp32). Noise: the standard error of the difference of the
    means from the seed-to-seed spread, at least the binomial one; within noise = |difference| <= 2 s.e."""
    script, overrides = script_of(args.method)
    seeds = [int(s) for s in args.acc_seeds.split(",") if s]
    if not seeds or args.acc_val_size < 1:
        raise ValueError("--accuracy-check needs at least one --acc-seeds and --acc-val-size >= 1")
    base = dict(dataset=args.acc_dataset, model=args.acc_model, epochs=args.acc_epochs, milestones=args.acc_milestones,
                synthetic_size=args.acc_synthetic_size, synthetic_shape=args.acc_synthetic_shape,
                val_size=args.acc_val_size, eval_steps=args.eval_steps, eval_every=10**9, data_root=args.data_root,
                device=args.device, log_interval=1e9, monitor_size=0, **overrides)
    runs = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in seeds:
            for label, fast in (("fp32", False), ("fast", True)):
                run_args = script.Args(**base, seed=seed, amp=fast, channels_last=fast, compile=fast and args.compile,
                                       runs_dir=runs_dir, run_name=f"{label}_seed{seed}")
                started = time.perf_counter()
                metrics = script.train(run_args, log=lambda line, tag=f"{label} seed {seed}": log(f"  [{tag}] {line}"))
                runs.append({"run": label, "seed": seed, "amp": fast, "channels_last": fast,
                             "compile": fast and args.compile, "val_clean": metrics["val_clean"],
                             "val_robust": metrics["val_robust"], "seconds": time.perf_counter() - started})
    clean, robust, sd = {}, {}, {}
    for label in ("fp32", "fast"):
        clean[label] = mean_and_spread([r["val_clean"] for r in runs if r["run"] == label])[0]
        robust[label], sd[label] = mean_and_spread([r["val_robust"] for r in runs if r["run"] == label])
    n = len(seeds)
    binomial = math.sqrt(2 * max(robust["fp32"] * (1 - robust["fp32"]), 1e-12) / (args.acc_val_size * n))
    standard_error = max(math.sqrt((sd["fp32"] ** 2 + sd["fast"] ** 2) / n) if n > 1 else 0.0, binomial)
    difference = robust["fast"] - robust["fp32"]
    return {"script": script.METHOD if args.method != "plain" else "fsr (--no-fsr)", "seeds": seeds, "runs": runs,
            "mean_clean": clean, "mean_robust": robust, "seed_sd_robust": sd,
            "clean_difference": clean["fast"] - clean["fp32"], "robust_difference": difference,
            "standard_error": standard_error, "binomial_standard_error": binomial,
            "within_noise": abs(difference) <= 2 * standard_error,
            "criterion": f"|mean fast - mean fp32| <= 2 s.e. = {2 * standard_error * 100:.1f} points over "
                         f"{n} seed(s)" + ("" if n > 1 else ", binomial s.e. only: no seed-to-seed noise measured")}


# === --profile: where the time of a fast-path training step goes ==============================
# Op and kernel names -> coarse groups, first match wins (names lower-cased; CPU aten ops and CUDA
# kernel names alike). Anything unmatched is "other".
OP_GROUPS = (
    ("batch norm", r"batch_norm|batchnorm|bn_fw|bn_bw|welford"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|cudnn|nchw|nhwc"),
    ("matmul (linear)", r"gemm|addmm|\bmm\b|matmul|linear|cublas|cutlass"),
    ("optimizer", r"sgd|foreach|multi_tensor"),
    ("copies", r"memcpy|memset|copy|contiguous|clone|\bcat\b"),
    ("elementwise & reductions", r"elementwise|reduce|relu|threshold|add|mul|div|sub|sign|clamp|min|max|where|fill"
                                 r"|sum|mean|softmax|log|exp|neg|pow|sqrt|uniform|rand|index|gather|scatter|pool"
                                 r"|sort|topk|argmax|abs|nll|cross_entropy|triton|pad"),
)
ANNOTATIONS = ("attack", "update")


def op_group(name: str) -> str:
    return next((group for group, pattern in OP_GROUPS if re.search(pattern, name.lower())), "other")


def labelled_training_step(script, run: FastPath, x, y, seconds: dict):
    """script.training_step + zero_grad + backward + SGD step, written out so that the profiler can
    label its two halves ("attack", "update"); adds each half's wall seconds to `seconds`."""
    model, args = run.compute_model, run.args
    with record_function("attack"):
        started = clock(run.device)
        with run.autocast():
            x_train = script.craft_adversarial(model, x, y, args, 0, script.attack_loss(args))
        seconds["attack"] += clock(run.device) - started
    with record_function("update"):
        started = clock(run.device)
        run.update.train()
        with run.autocast():
            logits_clean, logits, emitted = run.update(x, x_train, y)
            loss_cls = script.classification_loss(args.strategy, logits, y, logits_clean, args)
            loss, _ = script.objective(loss_cls, logits, emitted, y, args)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        seconds["update"] += clock(run.device) - started
    return loss.detach()


def profile_fast_path(args: Args, trace_path: str | None = None, top: int = 15) -> dict:
    """torch.profiler over --profile-steps fast-path training steps (after --warmup untimed ones). Op self
    time is kernel time on CUDA, CPU time otherwise; annotations and Python time are not ops."""
    script, overrides = script_of(args.profile_variant)
    run = fast_path(script, script_args(script, args, **overrides), args.warmup + args.profile_steps)
    seconds = {"attack": 0.0, "update": 0.0}
    for _ in range(args.warmup):
        labelled_training_step(script, run, *next(run.batches), dict(seconds))
    on_device = run.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])) as prof:
        for _ in range(args.profile_steps):
            labelled_training_step(script, run, *next(run.batches), seconds)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    ops = {}  # name -> (self us, calls)
    for event in prof.key_averages():
        if event.key in ANNOTATIONS or event.key.startswith("ProfilerStep") or \
                on_device and event.device_type == torch.autograd.DeviceType.CPU:
            continue  # on a GPU: kernels, memcpy, memset only, each device interval counted once
        self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
        if self_us > 0:
            us, calls = ops.get(event.key, (0, 0))
            ops[event.key] = (us + self_us, calls + event.count)
    total = sum(us for us, _ in ops.values()) or 1.0
    groups = collections.Counter()
    for name, (us, _) in ops.items():
        groups[op_group(name)] += us / total
    wall = seconds["attack"] + seconds["update"]
    calls = sum(count for _, count in ops.values())
    # busy_share: op time / wall time. On a GPU (one stream) the share of the step the GPU computes;
    # well below 1 with short kernels means the step is bound by the host launching them.
    return {"variant": args.profile_variant, "steps": args.profile_steps, "time": "device" if on_device else "CPU",
            "op_seconds": total / 1e6, "wall_seconds": wall, "busy_share": total / 1e6 / wall,
            "ops_per_step": calls / args.profile_steps, "mean_op_us": total / max(calls, 1),
            "attack_share": seconds["attack"] / wall, "update_share": seconds["update"] / wall,
            "groups": dict(groups.most_common()),
            "top_ops": [{"name": name, "self_ms": us / 1e3, "share": us / total, "calls": n}
                        for name, (us, n) in sorted(ops.items(), key=lambda item: -item[1][0])[:top]],
            "trace": trace_path}


# === Environment, report, main ================================================================
def environment(args: Args, argv: list[str]) -> dict:
    device, cpu = torch.device(args.device), platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    try:
        commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": str(device), "device_name": device_name,
            "gpu_model": gpu_model(device_name) if device.type == "cuda" else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git": commit,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python", "benchmarks/speed.py", *argv])}


def fmt(value, spec: str, missing: str = "-", scale: float = 1) -> str:
    return missing if value is None else format(value * scale, spec)


def markdown(results: dict) -> str:
    """The console report: training table, ratios, evaluation, targets, accuracy check, profile."""
    s, env = results["settings"], results["environment"]
    lines = [f"## Speed: {s['model']}, {s['shape']} images, batch {s['batch_size']}, {s['strategy']} "
             f"(PGD-{s['attack_steps']}, step {s['attack_step_size']:.5f}, eps {s['epsilon']:.5f}) on "
             f"{env['device_name']} ({env['device']}), torch {env['torch']}", ""]
    if results["variants"]:
        lines += [f"| variant | precision | data | attack gradients | images/s | s/epoch ({s['train_size']:,}) "
                  f"| TFLOP/s | of peak | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["variants"].items():
            if "skipped" in r:
                lines.append(f"| {LABELS[name]} | skipped: {r['skipped']} |||||||")
                continue
            precision = r["precision"] + (", channels_last" if r["channels_last"] else "") + \
                (", compiled" if r["compiled"] else "")
            lines.append(f"| {LABELS[name]} | {precision} | {r['data']} | {r['attack_gradients']} "
                         f"| {r['images_per_second']:.1f} | {r['seconds_per_epoch']:.1f} "
                         f"| {r['tflops_per_second']:.3f} | {fmt(r['fraction_of_peak'], '.1%')} "
                         f"| {fmt(r['peak_memory_gib'], '.2f')} |")
        r = results["ratios"]
        spreads = ", ".join(f"{LABELS[n]} {v['spread']:.0%}" for n, v in results["variants"].items()
                            if v.get("spread") is not None)
        lines += ["", f"Speed-up of the fast path over the reference loop: {fmt(r['speedup_over_reference'], '.2f')}x; "
                  f"FSR overhead {fmt(r['fsr_overhead_percent'], '+.1f')} %, CIFS overhead "
                  f"{fmt(r['cifs_overhead_percent'], '+.1f')} % (extra time per image over plain). "
                  f"Timed: {s['steps']} steps per variant after {s['warmup']} warm-up steps, in {s['rounds']} "
                  f"interleaved round(s)"
                  + (f"; spread of seconds per step over the rounds: {spreads}" if s["rounds"] > 1 else "") + ".", ""]
    if results["evaluation"]:
        lines += [f"| evaluation: PGD-{s['eval_steps']}, fp32 | images | seconds | images/s | s per 10,000 "
                  f"| TFLOP/s | peak GiB |", "|---|---|---|---|---|---|---|"]
        for name, r in results["evaluation"].items():
            lines.append(f"| {LABELS[name]} | {r['images']} | {r['seconds']:.1f} | {r['images_per_second']:.1f} "
                         f"| {r['seconds_per_10000']:.1f}{' (extrapolated)' if r['extrapolated'] else ''} "
                         f"| {r['tflops_per_second']:.3f} | {fmt(r['peak_memory_gib'], '.2f')} |")
        note = next((r["extrapolated"] for r in results["evaluation"].values() if r["extrapolated"]), None)
        lines += (["", f"Evaluation {note}."] if note else []) + [""]
    if ops := results.get("ops"):
        def cells(precision, show):
            return " | ".join(show(v, r) for v, r in ops[precision].items()) + " |"
        lines += ["| one training step, CPU count | plain | +FSR | +CIFS |", "|---|---|---|---|", *(
            f"| ops, {p} | " + cells(p, lambda v, r: f"{r['ops']:,}" + (f" ({r['ops_overhead_percent']:+.1f} %)"
                                                                       if v != "plain" else "")) for p in ops),
                  "| casts in the attack, bf16 | " + cells("bf16", lambda v, r: f"{r['attack_casts']:,}"),
                  "| forward FLOPs over plain | " + cells("fp32", lambda v, r: fmt(r.get("forward_flops_overhead_percent"), "+.2f", "")
                                                                   + " %" * (v != "plain")), ""]
    lines += ["Targets (docs/performance.md):"] + [
        f"- {t['target']}: {fmt(t['value'], '.2f')}{' ' + t['unit'] if t['value'] is not None else ''} "
        f"-> {t['verdict']}" for t in results["targets"]] + [""]
    check = results.get("accuracy_check")
    if check:
        sd = check["seed_sd_robust"]
        lines += [f"Accuracy check ({check['script']}):", "", "| run | seed | bf16 | channels_last | compile "
                  "| val clean | val PGD | seconds |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['seed']} | {r['amp']} | {r['channels_last']} | {r['compile']} "
                  f"| {r['val_clean']:.2%} | {r['val_robust']:.2%} | {r['seconds']:.0f} |" for r in check["runs"]]
        lines += ["", f"Mean over seeds {check['seeds']}: fast - fp32 clean {check['clean_difference'] * 100:+.1f}, "
                  f"robust {check['robust_difference'] * 100:+.1f} points (fp32 {check['mean_robust']['fp32']:.2%}, "
                  f"fast {check['mean_robust']['fast']:.2%}); seed-to-seed s.d. of the robust accuracy: fp32 "
                  f"{fmt(sd['fp32'], '.1f', 'n/a', 100)}, fast {fmt(sd['fast'], '.1f', 'n/a', 100)} points; "
                  f"s.e. of the difference {check['standard_error'] * 100:.1f} points "
                  f"(binomial floor {check['binomial_standard_error'] * 100:.1f}).", ""]
    prof = results.get("profile")
    if prof:
        ops = "kernels" if prof["time"] == "device" else "ops"
        lines += [f"Profile ({LABELS[prof['variant']]} fast path, {prof['steps']} steps, {prof['time']} time): attack "
                  f"{prof['attack_share']:.0%} / update {prof['update_share']:.0%} of the step (wall, synchronised); "
                  f"{ops} busy {prof['busy_share']:.0%} of the wall time, {prof['ops_per_step']:.0f} {ops} per step "
                  f"of {prof['mean_op_us']:.0f} us on average; by group: "
                  + ", ".join(f"{g} {share:.0%}" for g, share in prof["groups"].items()) + ".", "",
                  "| op | self ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| {o['name'][:90]} | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |"
                  for o in prof["top_ops"]]
        lines += (["", f"Chrome trace: {prof['trace']}"] if prof["trace"] else []) + [""]
    return "\n".join(lines + [f"JSON: {results['out']}"])


def run(args: Args, argv: list[str] | None = None, log=print) -> dict:
    """Everything the flags ask for; returns the results (also written to args.out as JSON). Under `torchrun`
    only the fast-path variants are timed, data-parallel (each process its share of the global --batch-size,
    through DDP as in train(); images/s are global); only rank 0 logs and writes."""
    args = resolve(args)
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if parallel and (set(variant_list(args)) - {"plain", "fsr", "cifs"} or args.eval_images or args.accuracy_check
                     or args.profile):
        raise ValueError("under torchrun only the fast-path training variants are timed: pass --variants "
                         "plain,fsr,cifs (or a part) and --eval-images 0, without --accuracy-check and --profile")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with process_group(args) as (rank, world_size):
        log = log if rank == 0 else (lambda *_: None)
        results = {"settings": dataclasses.asdict(args), "environment": environment(args, argv or []),
                   **({"processes": world_size} if parallel else {}),
                   "variants": time_variants(args, variant_list(args), log, rank, world_size)}
    results["ratios"] = ratios(results["variants"])
    results["out"] = args.out
    if parallel:
        results["report"] = "\n".join(
            f"{LABELS[v]}: {r['images_per_second']:.0f} img/s ({world_size} processes x "
            f"{args.batch_size // world_size} images), {r['seconds_per_epoch']:.1f} s/epoch, "
            f"{r['tflops_per_second']:.3f} TFLOP/s, {r['parameters'] / 1e6:.2f} M params, "
            f"{r['forward_gflops']:.4f} GFLOPs/image"
            for v, r in results["variants"].items())
    else:
        results["evaluation"] = {variant: time_evaluation(variant, args, log) for variant in ("plain", "fsr", "cifs")
                                 if args.eval_images > 0}
        results["accuracy_check"] = accuracy_check(args, log) if args.accuracy_check else None
        results["ops"] = op_counts(args, log) if args.ops else None
        if args.profile:
            log(f"profiling {args.profile_steps} steps of {LABELS[args.profile_variant]} ...")
            os.makedirs(out_dir, exist_ok=True)
            results["profile"] = profile_fast_path(args, os.path.join(out_dir, "trace.json") if args.trace else None)
        results["targets"] = check_targets(args, results)
        results["report"] = markdown(results)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)
    log(results["report"])
    return results


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    except ValueError as error:  # a bad setting: one line, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
