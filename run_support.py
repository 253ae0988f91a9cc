"""Run support: the machinery around the training loops of fsr.py and cifs.py, which a reader of the
methods may skip (as CleanRL keeps cleanrl_utils apart): settings from the command line with one-line
errors and range checks, device, precision and seeds, atomic writes, checkpoints and resume, torchrun
helpers, the run folder with its lock and metrics log, and the progress lines. Nothing here is about a
method; it never receives a method file's function: the method files call these pieces in order."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import attacks
from data import DeviceLoader, ImageSplit, balanced_subset, dataset_info, load_dataset, split_validation, subset

class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, written by another method or by
    another version of the code, or with weights that do not fit the network."""


class RunStopped(RuntimeError):
    """A run that cannot go on (a non-finite loss, a failed save): the message says why and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C (console() installs the handler): the run folder is released the same way."""


def arg(default, help: str, type=None, choices=None, positional: bool = False):
    """A dataclass field that carries its command-line help (one line per flag)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "positional": positional})


def flag(name: str) -> str:
    """The command-line spelling of a setting: weight_decay -> --weight-decay."""
    return "--" + name.replace("_", "-")


class OneLineErrors(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, without the usage block."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def parse_args(args_class, argv=None, description: str = ""):
    """args_class (a dataclass of `arg` fields) from the command line: kebab-case flags, one help line each,
    booleans as switches (--x where the default is False, else --x/--no-x; None: "decided later"); a
    `positional` field takes one or more values. Defaults that depend on the dataset are in the help."""
    parser = OneLineErrors(description=description)
    for f in dataclasses.fields(args_class):
        meta = f.metadata
        shown = "" if f.default is None or f.default is False else f" (default: {f.default})"  # 0 == False
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", help=meta["help"])
        elif f.default is False:
            parser.add_argument(flag(f.name), action="store_true", help=meta["help"])
        elif meta["type"] is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            parser.add_argument(flag(f.name), type=meta["type"] or type(f.default), default=f.default,
                                choices=meta["choices"], help=meta["help"] + shown)
    return args_class(**vars(parser.parse_args(argv)))


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


# Range rules: (test, what a value must be), for the settings both scripts have (each method file adds
# its own table; unset values, None, are skipped), and those of the training attack (adversarial only).
AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1")
POSITIVE = (lambda v: v > 0, "must be positive")
NON_NEGATIVE = (lambda v: v >= 0, "must not be negative")
SEED = (lambda v: 0 <= v < 2 ** 32, "must be in [0, 2**32) (numpy's seed range)")
RANGES = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "eval_every": AT_LEAST_1, "eval_steps": AT_LEAST_1,
    "epsilon": (lambda v: 0 < v <= 1, attacks.EPSILON_RULE),  # one rule for every script and attacks.py
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "momentum": NON_NEGATIVE, "trades_beta": NON_NEGATIVE,
    "mart_beta": NON_NEGATIVE, "fat_omega": NON_NEGATIVE, "log_interval": NON_NEGATIVE,
    "monitor_size": (lambda v: v >= 0, "must not be negative (0: no monitoring)"), "seed": SEED,
    "run_name": (lambda v: v not in ("", ".", "..") and "/" not in v and os.sep not in v,
                 "must be a plain folder name (no '/', not '..'): the run goes under --runs-dir, which says where"),
}
ATTACK_RANGES = {"attack_steps": AT_LEAST_1, "attack_step_size": (lambda v: v > 0, "must be positive (e.g. eps/4)")}


def check_finite(args) -> None:
    """Every float setting (of any script's Args) that is set must be a finite number: inf passes range tests."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(name)} {value} must be a finite number")


def check_args(args, method_ranges: dict) -> None:
    """Refuse, before any work, every resolved setting that would fail later or silently train something
    else, in one line that names the flag and the fix: finite floats, the range tables, then the cross-field
    rules of both scripts (a method file checks its own after this)."""
    check_finite(args)
    ranges = {**RANGES, **(ATTACK_RANGES if args.strategy != "natural" else {}), **method_ranges}
    for name, (test, requirement) in ranges.items():
        value = getattr(args, name)
        if value is not None and not test(value):
            raise ValueError(f"{flag(name)} {value} {requirement}")
    if args.strategy in ("trades", "mart") and args.random_start is False:
        raise ValueError(f"--no-random-start with --strategy {args.strategy}: its attack starts from "
                         "x + 0.001 N; from x itself TRADES cannot move (its KL gradient is zero there) and the run "
                         "would be natural training under another name. Drop --no-random-start")
    int_list("milestones", args.milestones, increasing=True)
    for name in ("synthetic_shape", "synthetic_size") if args.dataset != "synthetic" else ():
        if getattr(args, name) is not None:
            raise ValueError(f"{flag(name)} applies only to --dataset synthetic")
    if args.dataset == "synthetic" and args.synthetic_shape:
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
    if kept - args.val_size < 10:  # the floor of --train-size
        raise ValueError(f"--val-size {args.val_size} leaves {kept - args.val_size} training images: keep at least 10 "
                         f"(lower --val-size or raise --train-size)")
    if args.monitor_size > dataset_info(args.dataset).test_size:
        raise ValueError(f"--monitor-size {args.monitor_size} is above the {dataset_info(args.dataset).test_size} "
                         f"test images of {args.dataset}: give at most that many (0: no monitoring)")
    if args.data_root is not None and args.dataset != "synthetic" and os.path.isfile(args.data_root):
        raise ValueError(f"--data-root {args.data_root} is a file: give the folder that holds the dataset")
    check_device(args.device)
    if args.sync_bn and pick_device(args.device).type != "cuda":
        raise ValueError("--sync-bn synchronises BatchNorm over the GPUs of a torchrun run (torch's nn.SyncBatchNorm "
                         "needs CUDA): drop it on the CPU")


def training_images(args) -> int:
    """Images in the dataset's training split (synthetic: --synthetic-size or 5,000)."""
    return args.synthetic_size or 5000 if args.dataset == "synthetic" else dataset_info(args.dataset).train_size


def input_shape(args) -> tuple[int, int, int]:
    """(C, H, W) of the run's images: the dataset's, or --synthetic-shape for synthetic data."""
    if args.dataset == "synthetic" and args.synthetic_shape:
        return tuple(int(v) for v in args.synthetic_shape.split(","))
    return dataset_info(args.dataset).shape


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
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def seed_rank(seed: int, rank: int) -> None:
    """Attack noise (random starts) differs across processes: rank r > 0 continues from its own
    seed; rank 0 keeps the stream of a single-process run."""
    if rank > 0:
        torch.manual_seed(seed + 1_000_003 * rank)


def learning_rate(args, epoch: int) -> float:
    """Step schedule, 10x lower after each milestone, as torch.optim.lr_scheduler.MultiStepLR
    stepped once per epoch: a milestone m is the number of epochs run at the higher rate, so
    0-indexed `epoch` runs at lr * 0.1 ** (number of milestones <= epoch)."""
    return args.lr * 0.1 ** sum(epoch >= m for m in int_list("milestones", args.milestones))


def pick_device(name: str | None) -> torch.device:
    """--device, or cuda when there is a GPU; under torchrun a bare "cuda" is this process's GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    return device


def set_tf32(allowed: bool, device: torch.device | str = "cuda") -> str:
    """Apply the fp32 choice (process-wide torch flags) and return what fp32 means on `device`, for logs
    and result files. PyTorch runs fp32 convolutions on Ampere and Hopper GPUs in TF32 by default (cuDNN's
    allow_tf32 True, matmuls' False), as the official codes do on the same GPU; allowed=False
    (--strict-fp32) turns TF32 off for both, allowed=True restores PyTorch's defaults. No TF32 on the CPU."""
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = False
    if torch.device(device).type != "cuda":
        return "fp32"
    return "fp32 (TF32 convolutions allowed)" if allowed else "strict fp32"


def device_settings(args):
    """(device, amp, autocast factory, memory format). fp32 unless --amp (both official codes train in fp32;
    bf16 is opt-in until a measurement shows it changes no reported number); channels_last on CUDA."""
    device = pick_device(args.device)
    set_tf32(not args.strict_fp32, device)  # TF32 convolutions on Ampere/Hopper unless --strict-fp32
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.amp)
    return device, args.amp, autocast, torch.channels_last if channels_last else torch.contiguous_format


# ---- checkpoints and resume -------------------------------------------------------------------


@contextlib.contextmanager
def atomic_target(path: str):
    """The temporary file to write `path` through, renamed over it at the end (atomic: a reader, or a kill,
    sees the old file or the new one). A failed write (full disk, quota) removes it and ends in one line."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError (inline_container)
        with contextlib.suppress(OSError):
            os.remove(temporary)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "the write failed"
        raise RunStopped(f"could not write {path}: {reason} (a full disk or a quota?); the previous "
                         f"{os.path.basename(path)}, if any, is intact: free some space and run again") from None


def save_checkpoint(state: dict, path: str) -> None:
    with atomic_target(path) as temporary:
        torch.save(state, temporary)


def write_text_atomically(path: str, text: str) -> None:
    with atomic_target(path) as temporary, open(temporary, "w") as file:
        file.write(text)


def read_torch_file(path: str, what: str = "checkpoint"):
    """torch.load(path) on the CPU (tensors and plain containers only), or one line saying why not and what to do
    (never torch's advice to load with weights_only=False: that runs code from the file)."""
    if os.path.isdir(path):
        last = os.path.join(path, "last.pt")
        raise CheckpointError(f"{what} {path!r} is a folder, not a checkpoint" + (
            f": give {last}" if os.path.isfile(last) else " (a run folder's checkpoint is <run>/last.pt)"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (truncated zip, random bytes, another format: torch's messages vary)
        raise CheckpointError(f"{what} {path!r} " + (
            "holds Python objects besides tensors and plain containers, not loaded (that would run code from the "
            "file)" if "Unsupported global" in str(error) else "is unreadable: " + (
                "it is empty (0 bytes: an interrupted copy?)" if os.path.getsize(path) == 0 else "not a complete file "
                "written by torch.save (truncated, corrupted, or another format)")) + "; give another checkpoint") from None


def load_checkpoint(path: str, method: str, what: str = "--resume") -> dict:
    """Load a checkpoint written by `method`.py (fsr or cifs) for `what` (--resume, --init-from), or say why not."""
    checkpoint = read_torch_file(path, what)
    if not is_checkpoint(checkpoint):
        raise CheckpointError(f"{what} {path!r} is not a checkpoint written by fsr.py or cifs.py")
    if checkpoint["method"] != method:
        raise CheckpointError(f"{what} {path!r} is a {checkpoint['method']} checkpoint, which {method}.py cannot "
                              f"use: pass it to {checkpoint['method']}.py {what} (evaluate.py reads both)")
    return checkpoint


def args_from_checkpoint(args_class, saved: dict, path: str, method: str):
    """The settings (an args_class) a checkpoint was written with; a checkpoint of another version
    of the code (settings this version does not know, or lacks) is refused in one line naming them."""
    known = {f.name for f in dataclasses.fields(args_class)}
    unknown, missing = sorted(set(saved) - known), sorted(known - set(saved))
    parts = [f"settings {what}: {', '.join(names)}" for what, names in (("unknown here", unknown), ("it lacks", missing))
             if names]
    if parts:
        raise CheckpointError(f"{path!r} was written by another version of {method}.py: " + "; ".join(parts))
    return args_class(**saved)


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """model.load_state_dict(state), or one line that says which keys differ."""
    ours = model.state_dict()
    missing = [key for key in ours if key not in state]
    unknown = [key for key in state if key not in ours]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(ours[key].shape)}" for key in ours
              if key in state and state[key].shape != ours[key].shape]
    problems = [f"{what}: {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                for what, keys in (("missing", missing), ("unexpected", unknown), ("other shape", shapes)) if keys]
    if problems:
        inserted = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("FSR", "CIFS")})
        raise CheckpointError(f"the weights of {source} do not fit this network ({type(model).__name__} with "
                              f"{', '.join(inserted) or 'no inserted module'}): " + "; ".join(problems))
    model.load_state_dict(state)


# Settings that may change when a run is resumed: they change neither the network nor the recipe
# of the epochs already run (a longer --epochs extends the run; FAT's tau schedule scales with it).
RESUMABLE = ("epochs", "device", "log_interval", "eval_every", "data_root", "compile", "channels_last",
             "deterministic")
RESUME_HELP = f"continue from this last.pt with its own settings (only {', '.join(map(flag, RESUMABLE))} may change)"


def resumed_settings(args, checkpoint: dict, log):
    """The run's own settings, with the resumable flags the user changed applied and announced;
    any other changed flag is refused. A flag counts as given when it differs from its default."""
    saved = args_from_checkpoint(type(args), checkpoint["args"], args.resume, checkpoint["method"])
    defaults = type(args)()
    changed = [f.name for f in dataclasses.fields(args) if f.name != "resume"
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


def resume_checkpoint(args, method: str) -> dict | None:
    """The checkpoint --resume names (None for a new run), read and checked before any work."""
    if args.resume and args.init_from:
        raise ValueError("--resume continues a run; --init-from starts a new one from given weights: pass one")
    last = os.path.join(os.path.dirname(os.path.abspath(args.resume or "")), "last.pt")
    if args.resume and os.path.isfile(args.resume) and os.path.basename(args.resume) != "last.pt" \
            and os.path.isfile(last):  # its run would roll back to that epoch and overwrite last.pt
        raise ValueError(f"--resume {args.resume}: a run continues from its last.pt ({args.resume} is an earlier "
                         f"state, resuming it would overwrite {last}): pass --resume {last}, or --init-from "
                         f"{args.resume} to start a new run from its weights")
    return load_checkpoint(args.resume, method) if args.resume else None


def run_directory(args, method: str, checkpoint: dict | None) -> str:
    """The run folder: that of the resumed checkpoint, or --runs-dir/--run-name (default: named after
    the settings); checked writable. Nothing is written here."""
    variant = f"no{method}" if getattr(args, f"no_{method}") else method
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if checkpoint else os.path.join(
        args.runs_dir, args.run_name or f"{method}_{args.dataset}_{args.model}_{args.strategy}_{variant}_seed{args.seed}")
    check_writable(run_dir)
    return run_dir


def is_checkpoint(loaded) -> bool:
    """Whether what read_torch_file returned is a checkpoint of fsr.py or cifs.py (else: an official file)."""
    return isinstance(loaded, dict) and "method" in loaded and "args" in loaded


# ---- torchrun (DistributedDataParallel) ---------------------------------------------------------


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) this process joins the group (NCCL on GPUs, gloo
    on the CPU); a plain `python fsr.py` gets (0, 1) and no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def process_group(args):
    """(rank, world size) inside torchrun's process group, if any, left on exit."""
    try:
        yield init_distributed(pick_device(args.device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the processes of a data-parallel run (the tensor itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def shard(split: ImageSplit, rank: int, world_size: int) -> ImageSplit:
    """This process's contiguous share of an evaluation split (shares differ by at most one image)."""
    begin, end = len(split) * rank // world_size, len(split) * (rank + 1) // world_size
    return dataclasses.replace(split, images=split.images[begin:end], labels=split.labels[begin:end])


def data_parallel(update: nn.Module, device) -> nn.Module:
    """DDP around the update passes, without DDP's per-forward buffer broadcast (broadcast_buffers
    below runs after each step instead). Recent torch renamed that switch forward_sync_buffers."""
    from torch.nn.parallel import DistributedDataParallel
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return DistributedDataParallel(update, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def broadcast_buffers(model: nn.Module, sync_bn: bool = False) -> None:
    """Rank 0's BatchNorm running statistics to every process after each update, coalesced (one flat
    broadcast, one foreach copy): the next attack and the validation then see the same network everywhere
    (DDP's own buffer broadcast, turned off here, would come at its next forward, after the attack). None
    under --sync-bn (statistics of the global batch: already equal), never num_batches_tracked (equal)."""
    buffers = [buffer for name, buffer in model.named_buffers() if not name.endswith("num_batches_tracked")]
    for dtype in () if sync_bn else dict.fromkeys(buffer.dtype for buffer in buffers):  # one: fp32 statistics
        group = [buffer for buffer in buffers if buffer.dtype == dtype]
        flat = torch.cat([buffer.reshape(-1) for buffer in group])
        dist.broadcast(flat, 0)
        torch._foreach_copy_(group, [v.view_as(b) for b, v in zip(group, flat.split([b.numel() for b in group]))])


def rng_states(device) -> list:
    """[(cpu state, cuda state or None)] of every process, in rank order (for exact resumption)."""
    state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return [(cpu.cpu(), None if cuda is None else cuda.cpu()) for cpu, cuda in states]


def restore_rng(saved: list, rank: int, world_size: int, device, args, start_epoch: int, log) -> None:
    """Each process continues its own random stream; with another process count, fresh seeded
    streams (valid, but not bitwise an uninterrupted run), said."""
    if len(saved) == world_size:
        torch.set_rng_state(saved[rank][0])
        if device.type == "cuda" and saved[rank][1] is not None:
            torch.cuda.set_rng_state(saved[rank][1], device)
        return
    torch.manual_seed(args.seed + 1_000_003 * rank + start_epoch)
    log(f"note: {args.resume} was written by {len(saved)} process(es), this run has {world_size}: "
        f"the attack noise is re-seeded")


# ---- data and monitoring ----------------------------------------------------------------------

MONITOR_SEED = 0  # the monitored test images are the same for every run (comparable curves)


def data_loaders(args, device, memory_format, rank: int, world_size: int, log):
    """(training loader, {"val" / "monitor": loader}, description): the training split on the device as
    uint8 (under torchrun in every process, each taking its share of a global batch); --train-size keeps a
    seeded class-balanced subset, --val-size holds images of it out for best.pt, --monitor-size takes a fixed
    class-balanced subset of the test split (monitoring only). Held-out splits are sharded over processes."""
    shape = input_shape(args)
    train_split = load_dataset(args.dataset, args.data_root, train=True, synthetic_shape=shape,
                               synthetic_size=args.synthetic_size, seed=args.seed)
    log(f"loaded {args.dataset} from {train_split.source}" if args.dataset != "synthetic" else "synthetic images generated")
    if args.train_size is not None:
        train_split = subset(train_split, balanced_subset(train_split.labels, args.train_size,
                                                          train_split.num_classes, args.seed))
    train_split, val_split = split_validation(train_split, args.val_size, seed=args.seed)
    monitor_split = None
    if args.monitor_size:
        test_split = load_dataset(args.dataset, args.data_root, train=False, synthetic_shape=shape, seed=args.seed)
        monitor_split = subset(test_split, balanced_subset(test_split.labels, args.monitor_size,
                                                           test_split.num_classes, MONITOR_SEED))
    train_loader = DeviceLoader(train_split, args.batch_size, device, shuffle=True, augment=args.augment,
                                padding=dataset_info(args.dataset).padding or 4,  # crop_flip forced on any dataset
                                seed=args.seed, channels_last=memory_format == torch.channels_last,
                                rank=rank, world_size=world_size)
    images, classes = len(train_split), train_split.num_classes
    if images < max(args.batch_size, classes):  # allowed (quick runs), said
        log(f"note: only {images} training images, fewer than " + (f"the {classes} classes: some have none" if
            images < classes else f"one batch of {args.batch_size}: one step per epoch"))
    held_out = {name: DeviceLoader(shard(split, rank, world_size), 500, device, shuffle=False)
                for name, split in (("val", val_split), ("monitor", monitor_split)) if split is not None}
    description = (f"{len(train_split)} training images"
                   + (f", {len(val_split)} held out for best.pt" if val_split else "")
                   + (f", {len(monitor_split)} test images monitored" if monitor_split else ""))
    return train_loader, held_out, description


@torch.no_grad()
def _count_correct(model, x, y):
    return (model(x)[0].argmax(1) == y).sum()


def format_seconds(seconds: float) -> str:  # h:mm:ss, for ETAs (here and in progress.py)
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


HELD_OUT_NAMES = {"val": "held-out", "monitor": "test (monitoring only)"}  # data_loaders' held-out loaders


def clean_and_robust_accuracy(model, loader, args, log=None, label: str = "monitor") -> tuple[float, float]:
    """Clean and PGD accuracy (eval_steps of eps/10, no random start: the papers' test protocol) in fp32;
    under torchrun each process takes its share and the counts are summed (the single-process figures).
    With `log`: a progress line with ETA after 5 s, then every --log-interval seconds (as EpochProgress)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=loader.device)  # clean, robust, total
    started = time.time()
    next_print = started + min(5.0, args.log_interval)
    for step, (x, y) in enumerate(loader.epoch(0), 1):
        x_adv = attacks.pgd(model, x, y, args.epsilon, args.epsilon / 10, args.eval_steps, random_start_kind=None)
        counts[0] += _count_correct(model, x, y)
        counts[1] += _count_correct(model, x_adv, y)
        counts[2] += len(y)
        now = time.time()
        if log is not None and now >= next_print and step < len(loader):
            next_print = now + args.log_interval
            left = (now - started) / step * (len(loader) - step)
            log(f"  {HELD_OUT_NAMES.get(label, label)}: clean and PGD-{args.eval_steps} accuracy, batch {step}/{len(loader)} | "
                f"{format_seconds(now - started)} | ETA {format_seconds(left)}")
    clean, robust, total = all_reduce_sum(counts).tolist()
    return clean / max(total, 1), robust / max(total, 1)


# ---- the run folder ---------------------------------------------------------------------------


@contextlib.contextmanager
def run_folder(run_dir: str, args, resumed: bool, history: list, log):
    """The run folder for the run's life: created, locked against a second run (taking over, said, the lock
    of a killed run), cleared of interrupted saves' temporary files, with args.json and a metrics.jsonl
    that holds exactly the epochs of the checkpoint resumed."""
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
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (console()): say where, and how to go on
        last = os.path.join(run_dir, "last.pt")
        raise type(stop)(f"interrupted at epoch {REACHED['epoch']}, step {REACHED['step']}: " + (
            f"continue with --resume {last} (it keeps epoch {len(history)})" if history else
            "no epoch was finished, nothing to resume")) from None
    finally:
        os.remove(lock)


REACHED = {"epoch": 0, "step": 0}  # where the training loop is (EpochProgress keeps it): for an interrupted run's line


@contextlib.contextmanager
def console():
    """main()'s frame: console lines reach a redirected stdout (nohup, SLURM, > log) as they are printed;
    SIGTERM stops the run as Ctrl-C does (the run folder released); an expected failure is one line
    'error: ...' without traceback, exit status 1 (130 after Ctrl-C, 143 after SIGTERM)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except KeyboardInterrupt as stop:
        print(f"error: {stop or 'interrupted before the first epoch began: nothing was written'}", file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
    except (CheckpointError, RunStopped, FileExistsError, FileNotFoundError, ImportError, ValueError) as error:
        sys.exit(f"error: {error}")
    except (MemoryError, RuntimeError) as error:  # the allocator's refusal (CPU, or CUDA's OutOfMemoryError)
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        sys.exit(f"error: out of memory ({(str(error).strip() or 'no details').splitlines()[0][-80:]}): lower --batch-size or the "
                 f"network's size (--model, --hidden), or use a device with more memory")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated()


def take_lock(path: str, log) -> None:
    """Create the lock file holding this host and process id; if a live process holds it, refuse."""
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as file:
                host, _, pid = file.read().strip().partition(" ")
            if host != socket.gethostname() or process_alive(int(pid or 0)):
                raise FileExistsError(f"{os.path.dirname(path)} is in use by process {pid} on {host}: wait for it, "
                                      f"or pass another --run-name (if that process is gone, delete {path})") from None
            log(f"note: taking over the lock of process {pid}, which is no longer running")
            os.remove(path)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{socket.gethostname()} {os.getpid()}")
        return
    raise FileExistsError(f"could not take the lock {path}")


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def write_metrics(run_dir: str, history: list) -> None:
    """metrics.jsonl, a line per finished epoch, rewritten whole (atomically) from the checkpoint's history:
    a kill between the checkpoint and the log line loses nothing."""
    write_text_atomically(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history))
