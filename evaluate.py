"""Evaluate checkpoints of fsr.py and cifs.py under the papers' protocol.

    python evaluate.py runs/a_s0/last.pt runs/a_s1/last.pt --n-examples 2000  # main table, mean ± std of seeds
    python evaluate.py runs/cifs/last.pt --adaptive --autoattack-cifs --channel-analysis  # CIFS B.3, B.1, Fig. 1/3
    python evaluate.py runs/a/last.pt --transfer-source runs/natural/last.pt --nattack    # FSR Table 3
    python evaluate.py runs/a/last.pt --fsr-analysis --masking-report  # FSR Table 5 (a) and (b), appendix C
    torchrun --standalone --nproc_per_node=8 evaluate.py runs/a/last.pt   # sharded over 8 GPUs

Protocol (both authors' test scripts, wkim97/FSR test.py and HanshuYAN/CIFS CIFAR10_Res18_CIFS_test.py), every
column, flag and output file: docs/evaluation.md. Under torchrun the table and the JSON equal those of one process.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import attacks
from cifs import CIFS, OFFICIAL_SOFTMAX_SCALES
from data import DATASETS, balanced_subset, dataset_info, load_dataset
from fsr import FSR, pool as fsr_pool
from models import MODELS
from progress import plot_training_curves
from run_support import (AT_LEAST_1, NON_NEGATIVE, RANGES, SEED, CheckpointError, RunStopped, arg,
                         args_from_checkpoint, check_device, check_finite, check_writable, flag, init_distributed,
                         load_weights, parse_args, pick_device, read_torch_file, save_checkpoint, set_tf32,
                         write_text_atomically)

METHODS = ("fsr", "cifs")
MAIN_ATTACKS = ("natural", "fgsm", "pgd20", "pgd100", "cw", "autoattack")
ENSEMBLE_OF = ("natural", "fgsm", "pgd20", "pgd100", "cw")  # FSR Eq. 6 (with natural-correct)
WHITE_BOX = ("fgsm", "pgd20", "pgd100", "cw")  # the columns that also run through the CIFS mask
# How an attack sees a CIFS model: the papers' (the mask is a constant for the input gradient) or
# through the mask (the true gradient of the model's function). Models without CIFS: standard only.
STANDARD, THROUGH_MASK = "standard", "through the mask"
TITLES = {"natural": "Natural", "fgsm": "FGSM", "pgd20": "PGD-20", "pgd100": "PGD-100", "cw": "C&W",
          "ensemble": "Ensemble"}
COLUMN_TITLES = {**TITLES, "autoattack": "AutoAttack", "autoattack-cifs": "AutoAttack (CIFS protocol)",
                 **{f"{n}-tm": f"{TITLES[n]} (through mask)" for n in WHITE_BOX},
                 **{f"{n}-worst": f"Worst-case {TITLES[n]}" for n in (*WHITE_BOX, "ensemble")},
                 "ti-fgsm": "TI-FGSM", "ti-i-fgsm": "TI-I-FGSM", "di-fgsm": "DI-FGSM", "nattack": "NAttack"}
# FSR Table 5: what each FSR module passes on instead of f~ ("full"; see fsr_output), in the table's order.
FSR_OUTPUTS = ("robust", "non_robust", "recalibrated", "full")
FEATURE_NAMES = {"input": "f", "robust": "f+", "non_robust": "f-", "recalibrated": "f~-", "full": "f~",
                 "penultimate": "penultimate"}
TABLE5_COLUMNS = (*ENSEMBLE_OF, "autoattack")  # Table 5 (a) reports the Ensemble and AutoAttack
KNN_K = (5, 20)
KNN_TEMPERATURE = 0.07  # gamma of the k-NN weights exp(cos / gamma): FSR §4.3 leaves it open; Wu et al.'s 0.07
# Gradient-masking report (FSR appendix C): PGD step counts (step 2.5 eps / steps, Madry et al.'s rule, so
# every count can reach the boundary of the ball) and budgets as multiples of eps, each PGD-20 of step eps'/10.
MASKING_STEPS = (1, 2, 5, 10, 20, 50, 100)
MASKING_EPS_FACTORS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16)
MASKING_TOLERANCE = 0.01  # "non-increasing" allows this accuracy rise (or one example, if more)
# "Well above": a CIFS model whose standard PGD-20 accuracy exceeds its through-the-mask PGD-20
# accuracy by more than this (and by more than one example) fails the masking report.
MASK_GAP_THRESHOLD = 0.02
# beta_atk of the adaptive attacks (CIFS Table B.3, sweep_loss): "inf" attacks the heads only, "inf-k" the k-th.
ADAPTIVE_BETAS = ("0", "0.1", "1", "2", "10", "100", "inf", "inf-1", "inf-2")
# Auxiliary heads trained towards the true label (the sweep attacks them): CIFS's p_l, FSR's h(f+) and h(f~-).
LABEL_HEADS = ("probe", "robust", "recalibrated")
# CIFS's own AutoAttack (appendix B.1): both attacks climb Eq. 3's joint loss with beta = 2.
CIFS_AUTOATTACK_BETA = "2"
# Run settings that do not change what a checkpoint is (where, how fast, under which name): two
# checkpoints that differ only in these and `seed` are seeds of one configuration.
BOOKKEEPING = ("seed", "run_name", "runs_dir", "resume", "device", "log_interval", "data_root", "compile",
               "deterministic", "channels_last", "init_from", "strict_fp32", "official_softmax_scale")
# An official state dict's "run" in the result: the settings its network is built from (not our recipe's).
OFFICIAL_NETWORK_SETTINGS = {"fsr": ("model", "dataset", "positions", "hidden", "tau"),
                             "cifs": ("model", "dataset", "no_cifs", "positions", "probes", "hidden", "mask_fn",
                                      "softmax_scale", "top_k")}
# RobustBench's model_info (robustbench/utils.py ModelInfo; docs/other-tools.md): each method's paper, the datasets
# RobustBench lists that we train (both at eps 8/255), the names it gives our backbones.
PAPERS = {"fsr": {"link": "https://arxiv.org/abs/2303.13846", "venue": "CVPR 2023", "name": "Feature Separation and "
                  "Recalibration for Adversarial Robustness", "authors": "Woo Jae Kim, Yoonki Cho, Junsik Jung, "
                  "Sung-Eui Yoon"},
          "cifs": {"link": "https://arxiv.org/abs/2102.05311", "venue": "ICML 2021", "name": "CIFS: Improving "
                   "Adversarial Robustness of CNNs via Channel-wise Importance-based Feature Selection", "authors":
                   "Hanshu Yan, Jingfeng Zhang, Gang Niu, Jiashi Feng, Vincent Y. F. Tan, Masashi Sugiyama"}}
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100")
ARCHITECTURES = {"resnet18": "ResNet-18", "resnet10": "ResNet-10", "resnet50": "ResNet-50", "vgg16": "VGG-16",
                 "wrn34_10": "WideResNet-34-10", "wrn28_10": "WideResNet-28-10", "smallcnn": "SmallCNN"}


@dataclass
class Args:
    checkpoints: list = arg(None, "checkpoints written by fsr.py or cifs.py, or state dicts saved by the official "
                            "code (with --official); with --curves, run folders", positional=True)
    attacks: str = arg(",".join(MAIN_ATTACKS), "comma-separated columns: " + ", ".join(MAIN_ATTACKS))
    n_examples: int = arg(None, "evaluate a class-balanced subset of this size (default: the full test set)", int)
    subset_seed: int = arg(0, "seed of the subset (its indices are saved)")
    random_start: bool = arg(False, "PGD and C&W from a uniform random start (default: from x)")
    restarts: int = arg(1, "PGD / C&W restarts, worst case per example")
    cw_steps: int = arg(30, "C&W steps")
    kappa: float = arg(50.0, "C&W margin kappa")
    aa_version: str = arg("standard", "AutoAttack version: standard | plus | rand | custom (with --aa-attacks)")
    aa_attacks: str = arg(None, "with --aa-version custom: comma-separated AutoAttack attacks "
                          "(apgd-ce, apgd-t, fab-t, square, apgd-dlr, fab)", str)
    adaptive: bool = arg(False, "adaptive attacks on the auxiliary heads: sweep beta_atk over "
                         + " ".join(ADAPTIVE_BETAS) + " (CIFS Table B.3); on FSR models the heads h(f+) and h(f~-) "
                         "are swept too")
    no_through_mask: bool = arg(False, "CIFS models: skip the attacks through the mask and the worst-case "
                                "columns (only the papers' columns)")
    autoattack_cifs: bool = arg(False, "CIFS's own AutoAttack (CIFS appendix B.1): APGD-CE 5 restarts + Square "
                                "5,000 queries on the joint loss, beta 2, on a class-balanced sample")
    autoattack_cifs_examples: int = arg(2000, "test images of --autoattack-cifs (class-balanced, --subset-seed)")
    epsilon: float = arg(None, "L-inf budget in image units (default: the dataset's)", float)
    batch_size: int = arg(500, "evaluation batch size")
    data_root: str = arg(None, "dataset folder (default: data; for fmnist also Debian's copy, see docs/data.md)", str)
    device: str = arg(None, "cuda | cpu (default: cuda if available)", str)
    seed: int = arg(0, "seed of random starts and AutoAttack")
    out: str = arg(None, "output folder (default: <first checkpoint's folder>/eval)", str)
    log_interval: float = arg(30.0, "seconds between progress lines within an attack")
    transfer_source: str = arg(None, "checkpoint whose TI-FGSM / DI-FGSM examples are transferred (FSR Table 3)", str)
    ti_kernel: int = arg(7, "TI-FGSM Gaussian kernel size (odd; the TI paper's 15 is for 299-pixel images)")
    ti_iterative: bool = arg(False, "also TI-I-FGSM, the iterative TI attack (column ti-i-fgsm)")
    ti_steps: int = arg(10, "TI-I-FGSM steps (step eps / steps)")
    di_steps: int = arg(10, "DI-FGSM steps (step eps / steps)")
    di_prob: float = arg(0.5, "DI-FGSM probability p of the input transform")
    di_shrink: bool = arg(False, "DI-FGSM with torchattacks' transform (shrink to [0.9 W, W), bilinear, pad back "
                          "to W) instead of the DI paper's (enlarge to [W, W 330/299), nearest, pad to W 330/299)")
    nattack: bool = arg(False, "NAttack on a class-balanced sample (FSR Table 3)")
    nattack_examples: int = arg(1000, "NAttack test images (class-balanced, from the full test split)")
    nattack_seed: int = arg(0, "seed of the NAttack sample (its indices are saved)")
    nattack_queries: int = arg(40_000, "NAttack query budget per image")
    nattack_population: int = arg(300, "NAttack population per iteration")
    nattack_batch_size: int = arg(20, "images per NAttack batch (each costs `population` forwards per step)")
    fsr_analysis: bool = arg(False, "FSR Table 5: Ensemble and AutoAttack with f+, f-, f~- or f~ passed on, and "
                             "weighted k-NN of each feature among natural training features")
    knn_train_examples: int = arg(None, "natural training images of the k-NN reference (default: the whole "
                                  "training split; N: a class-balanced subset)", int)
    masking_report: bool = arg(False, "gradient-masking checks of FSR appendix C (PASS / FAIL per check)")
    channel_analysis: bool = arg(False, "CIFS Fig. 1/3/A.2: per-class channel activations, natural and PGD-20")
    official: str = arg(None, "the paths that are not our checkpoints are state dicts saved by the official code "
                        "of this method: fsr (train.py) or cifs (CIFAR10_Res18_CIFS.py)", str)
    official_model: str = arg("resnet18", "with --official: the backbone they hold")
    official_dataset: str = arg("cifar10", "with --official: the dataset they were trained on")
    official_softmax_scale: float = arg(None, "with --official cifs: the mask scale the file was trained with, "
                                        "which it does not record (required for files with probes): 1 for the "
                                        "released models/nets/resnet_CIFS.py, 2 for the first public one (as the "
                                        "modules behind the published tables)", float)
    official_tau: float = arg(None, "with --official fsr: the Gumbel temperature the file was trained with, which "
                              "it does not record (as test.py's --tau; default 0.1, train.py's)", float)
    strict_fp32: bool = arg(False, "fp32 convolutions without TF32 on Ampere/Hopper GPUs (PyTorch's default, "
                            "which the official test scripts also get there, runs them in TF32)")
    overwrite: bool = arg(False, "replace earlier results of the same checkpoints in --out (refused otherwise)")
    curves: bool = arg(False, "draw the training curves of the given run folders, overlaid, into <out>/curves.png")
    export_weights: str = arg(None, "only write the checkpoint's weights-only export to this path (state dict and the "
                              "settings that rebuild the network; docs/other-tools.md), no attack", str)
    robustbench_json: str = arg(None, "also write RobustBench's model_info <out>/NAME.json and the weights-only "
                                "<out>/NAME.pt (needs natural and standard AutoAttack on the full test set, the "
                                "dataset's eps)", str)


# check_args's rules: (test, what a value must be), as run_support.RANGES. Unset values (None) are skipped.
RULES = {
    "attacks": (lambda v: any(v.split(",")) and set(v.split(",")) <= {"", *MAIN_ATTACKS},
                f"give one or more of {', '.join(MAIN_ATTACKS)}"),
    "n_examples": (lambda v: v >= 1, "must be at least 1 (or left out for the full test set)"),
    "epsilon": RANGES["epsilon"],  # the training scripts' rule
    "official": (lambda v: v in METHODS, "use fsr or cifs"),
    "official_model": (lambda v: v in MODELS, f"use one of {', '.join(MODELS)}"),
    "official_dataset": (lambda v: v in DATASETS, f"use one of {', '.join(DATASETS)}"),
    "log_interval": NON_NEGATIVE, "knn_train_examples": AT_LEAST_1,
    "aa_version": (lambda v: v in ("standard", "plus", "rand", "custom"), "use standard, plus, rand or custom"),
    "ti_kernel": (lambda v: v >= 1 and v % 2 == 1, "the Gaussian kernel size must be odd and positive (e.g. 7)"),
    "di_prob": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1] (the DI paper: 0.5)"),
    **dict.fromkeys(("ti_steps", "di_steps", "autoattack_cifs_examples", "restarts", "cw_steps", "batch_size",
                     "nattack_examples", "nattack_queries", "nattack_population", "nattack_batch_size"), AT_LEAST_1),
    **dict.fromkeys(("seed", "subset_seed", "nattack_seed"), SEED),
}


def check_args(args: Args) -> None:
    """Refuse settings of the attacks above before any work, naming the flag and the fix."""
    check_finite(args)
    if " " in args.attacks:
        raise ValueError(f"--attacks {args.attacks!r}: no spaces around the commas (--attacks {args.attacks.replace(' ', '')})")
    for name, (test, requirement) in RULES.items():
        value = getattr(args, name)
        if value is not None and not test(value):
            raise ValueError(f"{flag(name)} {value!r}: {requirement}")
    if args.official_softmax_scale is not None and (args.official != "cifs"
                                                    or args.official_softmax_scale not in OFFICIAL_SOFTMAX_SCALES):
        raise ValueError(f"--official-softmax-scale {args.official_softmax_scale:g}: give 1 or 2, with --official cifs")
    if args.official_tau is not None and (args.official != "fsr" or not args.official_tau > 0):
        raise ValueError(f"--official-tau {args.official_tau:g}: give a positive temperature, with --official fsr")
    if (args.aa_version == "custom") != bool(args.aa_attacks):
        raise ValueError("--aa-attacks goes with --aa-version custom (and custom needs --aa-attacks)")
    if (args.ti_iterative or args.di_shrink) and not args.transfer_source:
        raise ValueError("--ti-iterative / --di-shrink set the transfer attacks: add --transfer-source CKPT")
    check_device(args.device)
    if (args.export_weights or args.robustbench_json) and len(args.checkpoints or []) != 1:
        raise ValueError("--export-weights / --robustbench-json take one checkpoint")


# ==== Rebuilding a model from what its checkpoint records ========================================

def read_checkpoint(path: str, args: Args | None = None):
    """(method module, run Args, state dict, notes, origin: None, or which official code) of a checkpoint."""
    raw = read_torch_file(path)
    if isinstance(raw, dict) and {"method", "settings", "state_dict"} <= set(raw):  # a weights-only export
        raw = {"method": raw["method"], "args": raw["settings"], "model": raw["state_dict"]}
    if isinstance(raw, dict) and raw.get("method") in METHODS and "args" in raw and "model" in raw:
        module = importlib.import_module(raw["method"])  # fsr.py or cifs.py knows how to build its network
        return module, args_from_checkpoint(module.Args, raw["args"], path, raw["method"]), raw["model"], [], None
    if args is None or args.official is None:
        raise CheckpointError(f"{path!r} is not a checkpoint written by fsr.py or cifs.py (a state dict saved by "
                              f"the official code needs --official fsr or --official cifs)")
    module = importlib.import_module(args.official)
    # Beyond model and dataset: what the user states (the CIFS mask scale, the FSR tau; neither is in the
    # file) and for CIFS whether it is the script's vanilla ResNet-18 (`--network _`: no probe keys).
    settings = {} if args.official_tau is None else {"tau": args.official_tau}
    if args.official == "cifs":
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        vanilla = isinstance(state, dict) and bool(state) and not any(".Probe." in str(key) for key in state)
        settings = {"no_cifs": vanilla, "official_softmax_scale": None if vanilla else args.official_softmax_scale}
    run_args = module.resolve(module.Args(dataset=args.official_dataset, model=args.official_model, **settings))
    try:
        state, notes = module.official_state_dict(raw, run_args)
    except ValueError as error:
        raise CheckpointError(f"{path!r}: {error}") from None
    if args.official == "fsr":  # origin: which official code and network, for the table and the JSON
        origin = f"wkim97/FSR train.py, tau {run_args.tau:g}"
    elif run_args.no_cifs:
        origin = "HanshuYAN/CIFS CIFAR10_Res18_CIFS.py --network _ (vanilla ResNet-18, models/nets/resnet_.py)"
    else:
        scale = run_args.official_softmax_scale
        origin = f"HanshuYAN/CIFS CIFAR10_Res18_CIFS.py, mask {scale:g} x softmax ({OFFICIAL_SOFTMAX_SCALES[scale]})"
    return module, run_args, state, notes, origin


def load_network_and_origin(path: str, device, args: Args | None = None, log=None):
    """load_network, and the checkpoint's origin (read_checkpoint)."""
    module, run_args, state, notes, origin = read_checkpoint(path, args)
    for note in notes if log else ():
        log(f"{path}: {note}")
    model = module.build_network(run_args)
    load_weights(model, state, path)
    return model.to(device).eval(), run_args, module, origin


def load_network(path: str, device, args: Args | None = None, log=None):
    """(model in eval mode on `device`, the run's Args, the method's module) of a checkpoint (read_checkpoint)."""
    return load_network_and_origin(path, device, args, log)[:3]


def load_model(path: str, device="cpu", official: str | None = None, model: str = "resnet18",
               dataset: str = "cifar10", softmax_scale: float | None = None, tau: float | None = None) -> nn.Module:
    """A checkpoint's network for other tools (AutoAttack, torchattacks, RobustBench): eval mode, images in
    [0, 1] -> logits, also under torch.no_grad(); `official` and the keywords after it: the --official* flags."""
    args = Args(checkpoints=[path], official=official, official_model=model, official_dataset=dataset,
                official_softmax_scale=softmax_scale, official_tau=tau)
    check_args(args)
    return attacks.LogitsOnly(load_network(path, torch.device(device), args)[0]).eval()


def export_weights(path: str, args: Args, target: str) -> dict:
    """The weights-only export of a checkpoint (docs/other-tools.md): its network's state dict and the settings that
    rebuild it (`<method>.build_network(<method>.Args(**settings))`); load_model and RobustBench read it."""
    model, run_args, module, origin = load_network_and_origin(path, torch.device("cpu"), args)
    export = {"method": module.__name__, "settings": dataclasses.asdict(run_args), "origin": origin,
              "state_dict": model.state_dict()}
    save_checkpoint(export, target)
    return export


def robustbench_refusal(args: Args, run_args) -> list:
    """What an evaluation lacks for RobustBench's model_info ([] when it qualifies)."""
    columns, standard = args.attacks.split(","), dataset_info(run_args.dataset).epsilon
    return [need for need, missing in (
        (f"a dataset RobustBench lists ({', '.join(ROBUSTBENCH_DATASETS)}; this checkpoint's: {run_args.dataset})",
         run_args.dataset not in ROBUSTBENCH_DATASETS),
        ("the natural column (--attacks natural,autoattack)", "natural" not in columns),
        ("standard AutoAttack (autoattack in --attacks, --aa-version standard)",
         "autoattack" not in columns or args.aa_version != "standard"),
        ("the full test set (no --n-examples)", args.n_examples is not None),
        (f"the dataset's eps {standard:.5f} (no --epsilon)", args.epsilon not in (None, standard))) if missing]


def robustbench_info(result: dict) -> dict:
    """RobustBench's model_info of a qualifying result: the paper's facts, ours, accuracies as percent strings."""
    run, accuracy, method = result["run"], result["accuracy"], result["method"]
    plain = run.get("no_fsr") or run.get("no_cifs")
    network = ARCHITECTURES.get(run["model"], run["model"]) + ("" if plain else f" + {method.upper()}")
    note = (f"Trained and evaluated with the CIFS / FSR reference implementation ({method}.py, strategy "
            f"{run.get('strategy', 'official')}; evaluate.py, AutoAttack standard via pyautoattack on "
            f"{len(result['labels'])} test images); reported: that evaluation's AutoAttack accuracy, not the paper's.")
    if method == "cifs" and not plain:
        note += " AutoAttack treats CIFS's channel mask as a constant (its relevance is detached in eval mode)."
    robust = f"{100 * accuracy['autoattack']:.2f}"  # RobustBench's accuracies: percent strings, two decimals
    return {**PAPERS[method], "additional_data": False, "number_forward_passes": 1, "dataset": run["dataset"],
            "architecture": network, "eps": f"{round(result['protocol']['epsilon'] * 255)}/255",
            "clean_acc": f"{100 * accuracy['natural']:.2f}", "reported": robust, "autoattack_acc": robust, "footnote": note}


def load_split(run_args, data_root: str, train: bool):
    """A split of the run's dataset as float images in [0, 1] (synthetic data: the run's shape, seed, size)."""
    method = importlib.import_module(type(run_args).__module__)
    split = load_dataset(run_args.dataset, data_root, train=train, synthetic_shape=method.input_shape(run_args),
                         synthetic_size=run_args.synthetic_size if train else None, seed=run_args.seed)
    return split.images.float() / 255, split.labels


# ==== Attacks of the table, batch by batch: on one process, or one per GPU under torchrun ====

def rank_and_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def attack_batches(model, fn, x, y, args: Args, label: str, log, keep, batch_size: int | None = None) -> list:
    """[keep(fn(model, xb, yb), yb)] over the batches of (x, y); batch b is seeded by b, run on rank b mod N."""
    batch_size = batch_size or args.batch_size
    rank, world_size = rank_and_size()
    started = time.time()
    next_print = started + min(5.0, args.log_interval)  # the first progress line within seconds
    device = next(model.parameters()).device
    results = {}
    for index, begin in enumerate(range(0, len(y), batch_size)):
        if index % world_size != rank:
            continue
        torch.manual_seed(args.seed + index)
        xb, yb = x[begin:begin + batch_size].to(device), y[begin:begin + batch_size].to(device)
        results[index] = keep(fn(model, xb, yb), yb)
        now, done = time.time(), min(begin + batch_size, len(y))
        if now >= next_print and done < len(y):
            next_print = now + args.log_interval
            eta = (now - started) / done * (len(y) - done)
            log(f"    {label}: {done}/{len(y)} examples, {now - started:.0f} s, ETA {eta:.0f} s")
    if dist.is_initialized():  # {batch index: result} of every process
        parts = [None] * world_size
        dist.all_gather_object(parts, results)
        results = {index: value for part in parts for index, value in part.items()}
    return [results[index] for index in sorted(results)]


def step_sizes(dataset: str, eps: float) -> dict:
    """Steps of eps/10 (CIFS appendix B.1; wkim97/FSR test.py); Fashion-MNIST PGD: 0.01, 0.02 (CIFS appendix D)."""
    pgd20, pgd100 = (0.01, 0.02) if dataset == "fmnist" else (eps / 10, eps / 10)
    return {"pgd20": pgd20, "pgd100": pgd100, "cw": eps / 10}


def sweep_loss(base: str, beta: str, kappa: float):
    """Per-example loss l(final) + (beta / L) sum_l l(p_l) of the CIFS adaptive attacks, l = CE or the C&W margin
    (in every branch: the official test script silently falls back to CE for beta in {0, inf-1, inf-2})."""
    def single(logits, y):
        return attacks.cw_margin(logits, y, kappa) if base == "cw" else attacks.cross_entropy_loss(logits, y)

    def loss(output, y):
        logits, emitted = output if isinstance(output, (tuple, list)) else (output, [])
        heads = label_heads(emitted)
        if beta == "0" or not heads:
            return single(logits, y)
        if beta.startswith("inf-"):
            return single(heads[int(beta[4:]) - 1][1], y)
        head_term = sum(single(h, y) for _, h in heads) / len(heads)
        return head_term if beta == "inf" else single(logits, y) + float(beta) * head_term
    return loss


def label_heads(emitted: list) -> list:
    """[(name, logits)] of the auxiliary heads trained towards the label, in forward order."""
    return [(f"{i}.{key}", out[key]) for i, out in enumerate(emitted) for key in LABEL_HEADS if key in out]


def attack_fn(name: str, run_args, args: Args, eps: float, beta: str = "0"):
    """x_adv = fn(model, x, y) for one column (and one beta_atk of the sweep)."""
    steps = step_sizes(run_args.dataset, eps)
    start = "uniform" if args.random_start else None
    if name == "natural":
        return lambda model, x, y: x
    if name == "fgsm":
        return lambda model, x, y: attacks.fgsm(model, x, y, eps, loss_fn=sweep_loss("ce", beta, args.kappa))
    if name in ("pgd20", "pgd100", "cw"):  # C&W: PGD on the margin loss (both test scripts' _cw_loss)
        n, loss = (args.cw_steps, "cw") if name == "cw" else (int(name[3:]), "ce")
        return lambda model, x, y: attacks.pgd(model, x, y, eps, steps[name], n, sweep_loss(loss, beta, args.kappa),
                                               start, args.restarts)
    raise ValueError(f"unknown attack {name!r}; known: {', '.join(MAIN_ATTACKS)}")


def run_autoattack(model, attack, x, y, args: Args, label: str, log) -> tuple[dict, float, list]:
    """Per-example verdicts, seconds and warnings (once each) of `attack(model, xb, yb) -> (x_adv, warnings)`."""
    @torch.no_grad()
    def judge(out, yb):  # on the CPU: correctness of the final prediction, its top-2, and every auxiliary head
        logits, emitted = model(out[0])
        verdict = {"final": logits.argmax(1) == yb, "top2": (logits.topk(2, 1).indices == yb[:, None]).any(1),
                   **{f"head {name}": head.argmax(1) == yb for name, head in label_heads(emitted)}}
        return {key: v.cpu() for key, v in verdict.items()}, out[1]
    started = time.time()
    verdicts, warnings = zip(*attack_batches(model, attack, x, y, args, label, log, keep=judge))
    merged = {key: torch.cat([part[key] for part in verdicts]) for key in verdicts[0]}
    return merged, time.time() - started, list(dict.fromkeys(w for part in warnings for w in part))


def run_attack(model, fn, x, y, args: Args, label: str, log) -> tuple[dict, float]:
    """Apply `fn` batch by batch; returns per-example verdicts and seconds."""
    return run_autoattack(model, lambda m, xb, yb: (fn(m, xb, yb), []), x, y, args, label, log)[:2]


def standard_autoattack(args: Args, eps: float):
    """(model, xb, yb) -> (x_adv, warnings): AutoAttack `--aa-version` (standard: FSR Tables 3-6), seed args.seed."""
    custom = args.aa_attacks.split(",") if args.aa_attacks else None
    progress = rank_and_size()[0] == 0
    return lambda model, xb, yb: attacks.autoattack(model, xb, yb, eps, version=args.aa_version, attacks=custom,
                                                    seed=args.seed, batch_size=args.batch_size, progress=progress)


# ==== One checkpoint =============================================================================

def modules_of(model: nn.Module, kind: type) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


def load_source(args: Args):
    """The --transfer-source network on the CPU, or None."""
    return load_network(args.transfer_source, torch.device("cpu"), args)[0] if args.transfer_source else None


def prepare(path: str, args: Args, log, source=None) -> tuple:
    """Everything that can fail about a checkpoint before an attack runs (main: for all checkpoints first)."""
    source = source if source is not None else load_source(args)
    model, run_args, module, origin = load_network_and_origin(path, torch.device("cpu"), args, log)
    x_all, y_all = load_split(run_args, args.data_root, train=False)
    if args.n_examples is not None and args.n_examples > len(y_all):
        raise ValueError(f"--n-examples {args.n_examples}: {path} is evaluated on {run_args.dataset}, whose test "
                         f"split has {len(y_all)} images")
    if source is not None and (source.num_classes != model.num_classes or source.input_shape != model.input_shape):
        raise ValueError(f"--transfer-source {args.transfer_source!r} has {source.num_classes} classes and input "
                         f"{source.input_shape}; the target has {model.num_classes} and {model.input_shape}")
    return model, run_args, module, (x_all, y_all), source, origin


def evaluate_checkpoint(path: str, args: Args, log=print, prepared: tuple | None = None) -> dict:
    check_args(args)
    device = pick_device(args.device)
    init_distributed(device)  # under torchrun: joins the process group
    precision = set_tf32(not args.strict_fp32, device)
    model, run_args, module, (x_all, y_all), source, origin = prepared or prepare(path, args, log)
    model, source = model.to(device), source.to(device) if source is not None else None
    info = dataset_info(run_args.dataset)
    eps = args.epsilon if args.epsilon is not None else run_args.epsilon
    attacks.check_epsilon(eps)
    indices = torch.arange(len(y_all)) if args.n_examples is None else \
        balanced_subset(y_all, args.n_examples, info.num_classes, args.subset_seed)
    x, y = x_all[indices], y_all[indices]
    columns = [a for a in args.attacks.split(",") if a]
    with torch.no_grad():
        has_heads = bool(label_heads(model(x[:2].to(device))[1]))
    betas = ADAPTIVE_BETAS if args.adaptive and has_heads else ("0",)
    cifs_model = bool(modules_of(model, CIFS))
    settings = protocol(args, run_args, eps, betas, cifs_model, precision)
    log(f"{path}: {run_args.model} ({type(model).__name__}) on {len(y)} {run_args.dataset} test images, eps {eps:.5f}")
    log("  " + describe_protocol(settings, run_args.dataset,
                                 [*columns, *(f"{n}-tm" for n in columns if cifs_model and not args.no_through_mask)]))
    # Every verdict of the table by (column, beta_atk, view): what the analyses below reuse.
    done: dict = {}
    tables = per_example, heads, timings, sweep = {}, {}, {}, {}
    aa_warnings = []
    for name in columns:
        if name == "autoattack":
            log(f"  AutoAttack {args.aa_version} on {len(y)} images, batch by batch (APGD-CE, APGD-T, FAB-T, Square "
                f"for standard): the longest column; its own progress lines follow")
            verdicts, seconds, aa_warnings = run_autoattack(model, standard_autoattack(args, eps), x, y, args,
                                                            "autoattack", log)
            done[(name, "0", STANDARD)] = verdicts
            results = {"0": verdicts}
        else:
            results, seconds = run_column(model, name, run_args, args, eps, betas, x, y, log, done)
        record_column(name, results, seconds, tables, log)
    if all(name in per_example for name in ENSEMBLE_OF):
        per_example["ensemble"] = ensemble_of(per_example, ENSEMBLE_OF)
    extra = {}
    if cifs_model:
        extra["through_mask"] = through_mask_columns(model, columns, run_args, args, eps, betas, x, y, tables, done,
                                                     log)
    if source is not None:  # FSR Table 3: transfer from the source model
        for name, craft in transfer_attacks(source, eps, args).items():
            verdicts, seconds = run_attack(model, craft, x, y, args, name, log)
            record_column(name, {"0": verdicts}, seconds, tables, log)
        extra["transfer"] = transfer_settings(args)
    accuracy = {name: column_accuracy(name, per_example, sweep) for name in per_example}
    if args.nattack:
        extra["nattack"], timings["nattack"] = run_nattack(model, x_all, y_all, info.num_classes, args, eps, log)
        accuracy["nattack"] = extra["nattack"]["accuracy"]
    if args.autoattack_cifs:
        extra["autoattack_cifs"], timings["autoattack-cifs"] = run_autoattack_cifs(
            model, x_all, y_all, info.num_classes, args, eps, log)
        accuracy["autoattack-cifs"] = extra["autoattack_cifs"]["accuracy"]
    if args.fsr_analysis:
        extra["fsr_analysis"], timings["fsr_analysis"] = fsr_analysis(model, run_args, args, eps, x, y, done, log)
    if args.masking_report:  # with the table's FGSM and PGD-20 when they ran its protocol (from x, one restart)
        known = {} if args.random_start or args.restarts != 1 else {
            (name, view): share(verdicts["final"])
            for (name, beta, view), verdicts in done.items() if name in ("fgsm", "pgd20") and beta == "0"}
        extra["masking_report"], timings["masking_report"] = masking_report(
            model, x, y, eps, args, log, aa_warnings if "autoattack" in columns else None, known, run_args.dataset)
    if args.channel_analysis:
        extra["channel_analysis"], timings["channel_analysis"] = channel_analysis(
            model, attack_fn("pgd20", run_args, args, eps), x, y, info.num_classes, args, log)
    per_class = {name: [share(v[y == c]) for c in range(info.num_classes)]
                 for name, v in per_example.items()}
    run = dataclasses.asdict(run_args)
    if origin is not None:  # the authors' file: what it is, not our recipe's settings (which did not train it)
        run = {"official": origin, **{key: run[key] for key in OFFICIAL_NETWORK_SETTINGS[module.__name__]}}
    return {"checkpoint": path, "method": module.__name__, "official": origin, "run": run, "protocol": settings,
            "indices": indices.tolist(), "labels": y.tolist(),
            "accuracy": accuracy, "adaptive": sweep, "per_class": per_class, "heads_and_top2": heads,
            "per_example": {name: v.int().tolist() for name, v in per_example.items()},
            "autoattack_warnings": aa_warnings, "versions": versions(), "timings": timings, **extra}


def ensemble_of(per_example: dict, members) -> torch.Tensor:
    """Per-example AND of the member columns (FSR Eq. 6: the min over attacks of 1(correct))."""
    return torch.stack([per_example[name] for name in members]).all(0)


def run_column(model, name: str, run_args, args: Args, eps: float, betas, x, y, log, done: dict,
               view: str = STANDARD) -> tuple[dict, float]:
    """({beta_atk: verdicts}, seconds) of one column, attacked through `view`; each also stored in `done`."""
    results, seconds = {}, 0.0
    for beta in (betas if name != "natural" else ("0",)):
        label = f"{name} beta_atk={beta}" + (f" ({view})" if view != STANDARD else "")
        with attack_view(model, view):
            results[beta], spent = run_attack(model, attack_fn(name, run_args, args, eps, beta), x, y, args, label, log)
        done[(name, beta, view)] = results[beta]
        seconds += spent
    return results, seconds


def record_column(name: str, results: dict, seconds: float, tables: tuple, log) -> None:
    """Store one column in tables (per_example, heads, timings, sweep): the minimum over beta_atk, the
    per-example worst case (AND over beta_atk) that feeds the Ensemble, heads and top-2 at beta_atk 0, time."""
    per_example, heads, timings, sweep = tables
    per_example[name] = torch.stack([r["final"] for r in results.values()]).all(0)
    if len(results) > 1:
        sweep[name] = {beta: share(r["final"]) for beta, r in results.items()}
    heads[name] = {key: share(v) for key, v in results["0"].items() if key != "final"}
    timings[name] = seconds
    log(f"  {COLUMN_TITLES[name]:>10}: {column_accuracy(name, per_example, sweep):.2%} ({seconds:.1f} s)")


# ==== Attacks through the CIFS mask: an adaptive attack neither paper ran (default for CIFS models) ====

@contextlib.contextmanager
def differentiable_masks(model: nn.Module):
    """In the block, every CIFS module computes its relevance on the non-detached pooled feature (create_graph):
    input gradients also flow through the channel mask, the forward's value is unchanged. With a linear probe
    g = W^T e_topk does not depend on the feature, so only the MLP (Softplus) probes add a gradient path."""
    modules = modules_of(model, CIFS)
    before = [m.differentiable_mask for m in modules]
    for m in modules:
        m.differentiable_mask = True
    try:
        yield modules
    finally:
        for m, old in zip(modules, before):
            m.differentiable_mask = old


def attack_view(model: nn.Module, view: str):
    """The context an attack runs in: the papers' model (STANDARD) or differentiable_masks (THROUGH_MASK)."""
    return differentiable_masks(model) if view == THROUGH_MASK else contextlib.nullcontext()


def through_mask_columns(model, columns, run_args, args, eps, betas, x, y, tables, done, log) -> dict:
    """CIFS models: the white-box columns attacked through the mask ("<attack>-tm"), then per example
    the worst case over both views and every beta_atk ("<attack>-worst") and the Worst-case Ensemble."""
    if args.no_through_mask:
        log("  --no-through-mask: the papers' columns only (the attacks treat the CIFS mask as a constant)")
        return {"applied": False, "reason": "--no-through-mask"}
    per_example = tables[0]
    run = [name for name in columns if name in WHITE_BOX]
    for name in run:
        results, seconds = run_column(model, name, run_args, args, eps, betas, x, y, log, done, THROUGH_MASK)
        record_column(name + "-tm", results, seconds, tables, log)
    worst_of = {name + "-worst": [name, name + "-tm"] for name in run}
    if all(name in per_example for name in ENSEMBLE_OF):
        worst_of["ensemble-worst"] = ["natural", *(name + "-worst" for name in WHITE_BOX)]
    for name, members in worst_of.items():
        per_example[name] = ensemble_of(per_example, members)
        log(f"  {COLUMN_TITLES[name]:>10}: {share(per_example[name]):.2%}")
    return {"applied": True, "columns": [name + "-tm" for name in run], "worst_case_of": worst_of,
            "beta_atk": list(betas)}


# ==== Black-box attacks (FSR Table 3) ============================================================

def transfer_attacks(source, eps: float, args: Args) -> dict:
    """x_adv = fn(target, x, y), crafted on `source` only: FSR Table 3's TI-FGSM (one step, Dong et al.
    2019) and DI-FGSM (iterative DI^2-FGSM, Xie et al. 2019), and with --ti-iterative TI-I-FGSM."""
    rate, interpolation = ((attacks.DI_SHRINK_RATE, "bilinear") if args.di_shrink
                           else (attacks.DI_RESIZE_RATE, "nearest"))
    crafts = {"ti-fgsm": lambda model, x, y: attacks.ti_fgsm(source, x, y, eps, kernel_size=args.ti_kernel),
              "di-fgsm": lambda model, x, y: attacks.di_fgsm(source, x, y, eps, steps=args.di_steps, prob=args.di_prob,
                                                             resize_rate=rate, interpolation=interpolation)}
    if args.ti_iterative:
        crafts["ti-i-fgsm"] = lambda model, x, y: attacks.ti_i_fgsm(source, x, y, eps, steps=args.ti_steps,
                                                                   kernel_size=args.ti_kernel)
    return crafts


def transfer_settings(args: Args) -> dict:
    """What the transfer columns ran (for the JSON)."""
    di_transform = ("torchattacks' shrink-and-pad: resize (bilinear) to rnd in [floor(0.9 W), W), zero-pad back "
                    "to W" if args.di_shrink else "the DI paper's: resize (nearest) to rnd in [W, floor(W 330/299)), "
                    "zero-pad to floor(W 330/299)")
    settings = {"source": args.transfer_source,
                "ti-fgsm": {"steps": 1, "step_size": "eps", "kernel": args.ti_kernel, "kernel_nsig": 3},
                "di-fgsm": {"steps": args.di_steps, "step_size": "eps / steps", "prob": args.di_prob,
                            "transform": di_transform}}
    if args.ti_iterative:
        settings["ti-i-fgsm"] = {"steps": args.ti_steps, "step_size": "eps / steps", "kernel": args.ti_kernel}
    return settings


def run_nattack(model, x_all, y_all, num_classes: int, args: Args, eps: float, log) -> tuple[dict, float]:
    """NAttack on its own seeded class-balanced sample of the full test split (FSR Table 3)."""
    started = time.time()
    indices = balanced_subset(y_all, args.nattack_examples, num_classes, args.nattack_seed)

    def attack(model, xb, yb):
        with torch.no_grad():
            correct = attacks.logits_of(model(xb)).argmax(1) == yb
        x_adv, _, used = attacks.nattack(model, xb, yb, eps, max_queries=args.nattack_queries,
                                         population=args.nattack_population)
        with torch.no_grad():  # x_adv is what NAttack queried last: success == misclassified
            broken = attacks.logits_of(model(x_adv)).argmax(1) != yb
        return correct.cpu(), broken.cpu(), used.cpu()
    parts = attack_batches(model, attack, x_all[indices], y_all[indices], args, "nattack", log,
                           keep=lambda out, yb: out, batch_size=args.nattack_batch_size)
    correct, broken, queries = (torch.cat(column) for column in zip(*parts))
    robust, attacked = correct & ~broken, correct & broken
    spent = queries[attacked].float()
    result = {"indices": indices.tolist(), "accuracy": share(robust),
              "natural": share(correct), "per_example": robust.int().tolist(),
              "queries": queries.tolist(), "max_queries": args.nattack_queries,
              "population": args.nattack_population, "seed": args.nattack_seed,
              "success_rate": int(attacked.sum()) / max(1, int(correct.sum())),
              "mean_queries_successful": spent.mean().item() if len(spent) else None,
              "median_queries_successful": spent.median().item() if len(spent) else None}
    log(f"  {'NAttack':>10}: {result['accuracy']:.2%} ({time.time() - started:.1f} s)")
    return result, time.time() - started


# CIFS's own AutoAttack protocol (CIFS appendix B.1 and C; Tables B.1 and C.1)
def run_autoattack_cifs(model, x_all, y_all, num_classes: int, args: Args, eps: float, log,
                        **budget) -> tuple[dict, float]:
    """The CIFS authors' AutoAttack on its own class-balanced sample ("we sample 2000 images (200 per class)").
    `budget`: smaller n_restarts / n_iter / n_queries (tests only; the CLI uses the authors')."""
    started = time.time()
    indices = balanced_subset(y_all, args.autoattack_cifs_examples, num_classes, args.subset_seed)
    x, y = x_all[indices], y_all[indices]
    loss = sweep_loss("ce", CIFS_AUTOATTACK_BETA, args.kappa)
    show_progress = rank_and_size()[0] == 0

    def attack(model, xb, yb):
        return attacks.autoattack_cifs(model, xb, yb, eps, loss, seed=args.seed, batch_size=args.batch_size,
                                       progress=show_progress, **budget)
    natural, _ = run_attack(model, lambda m, xb, yb: xb, x, y, args, "autoattack-cifs natural", log)
    verdicts, _, warnings = run_autoattack(model, attack, x, y, args, "autoattack-cifs", log)
    result = {"indices": indices.tolist(), "accuracy": share(verdicts["final"]),
              "natural": share(natural["final"]), "per_example": verdicts["final"].int().tolist(),
              "natural_per_example": natural["final"].int().tolist(), "warnings": warnings,
              "protocol": {"attacks": ["apgd-ce", "square"], "apgd_restarts": budget.get("n_restarts", 5),
                           "apgd_iterations": budget.get("n_iter", 100),
                           "square_queries": budget.get("n_queries", 5000),
                           "loss": f"CE(final) + ({CIFS_AUTOATTACK_BETA} / L) sum_l CE(head_l)", "beta": 2.0,
                           "square_loss": "-(joint loss), as the authors' Square (standard AutoAttack: margin)",
                           "examples": len(y), "subset_seed": args.subset_seed, "seed": args.seed}}
    log(f"  {COLUMN_TITLES['autoattack-cifs']}: {result['accuracy']:.2%} on {len(y)} images "
        f"(natural {result['natural']:.2%}; {time.time() - started:.1f} s)")
    return result, time.time() - started


# ==== FSR feature analysis (FSR Table 5) =========================================================

@contextlib.contextmanager
def fsr_output(model: nn.Module, output: str):
    """In the block every FSR module passes on `output` (FSR_OUTPUTS; FSR Table 5), computed as FSR.forward
    computes it (§3.1-3.2), through a forward hook: the module itself is untouched, its heads are its own."""
    def replace(module, inputs, result):
        feature, heads = inputs[0], result[1]
        if output == "robust":
            return heads["mask"] * feature, heads
        non_robust = (1 - heads["mask"]) * feature
        if output == "recalibrated":  # f~- = f- + m- R(f-)
            return non_robust + (1 - heads["mask"]) * module.recalibration(non_robust), heads
        return non_robust, heads
    modules = modules_of(model, FSR) if output != "full" else []
    hooks = [m.register_forward_hook(replace, prepend=True) for m in modules]  # before any other hook
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def fsr_analysis(model, run_args, args: Args, eps: float, x, y, done: dict, log) -> tuple[dict, float]:
    """FSR Table 5 (§4.3). (a) The TABLE5_COLUMNS and their Ensemble (Eq. 6) with each of f+, f-, f~-, f~
    passed on (fsr_output; f~'s row reuses the main table's verdicts). (b) Weighted k-NN (knn_report)."""
    started = time.time()
    modules = modules_of(model, FSR)
    outputs, reused = {}, []
    if not modules:
        log("  --fsr-analysis: no FSR module in this model, only the k-NN part applies")
    for output in FSR_OUTPUTS if modules else ():
        if output == "recalibrated" and any(m.recalibration is None for m in modules):
            continue  # "w/o Recalibration" models have no f~-
        verdicts = {}
        with fsr_output(model, output):
            for name in TABLE5_COLUMNS:
                if output == "full" and (name, "0", STANDARD) in done:  # f~ is what the table attacked
                    verdicts[name] = done[(name, "0", STANDARD)]["final"]
                    reused.append(name)
                    continue
                label = f"{name} with {FEATURE_NAMES[output]}"
                if name == "autoattack":
                    result = run_autoattack(model, standard_autoattack(args, eps), x, y, args, label, log)[0]
                else:
                    result = run_attack(model, attack_fn(name, run_args, args, eps), x, y, args, label, log)[0]
                verdicts[name] = result["final"]
        verdicts["ensemble"] = ensemble_of(verdicts, ENSEMBLE_OF)
        outputs[output] = {"feature": FEATURE_NAMES[output],
                           "accuracy": {name: share(v) for name, v in verdicts.items()},
                           "per_example": {name: v.int().tolist() for name, v in verdicts.items()}}
        log(f"  Table 5 (a), {FEATURE_NAMES[output]} passed on: " +
            ", ".join(f"{COLUMN_TITLES[n]} {a:.2%}" for n, a in outputs[output]["accuracy"].items()))
    return {"outputs": outputs, "columns": [*TABLE5_COLUMNS, "ensemble"], "beta_atk": "0", "reused_from_table": reused,
            "knn": knn_report(model, run_args, args, eps, x, y, log)}, time.time() - started


@torch.no_grad()
def features_of(model, x, args: Args) -> torch.Tensor:
    """Pooled penultimate features (`model.features(x)[0]`), batch by batch, on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.features(x[i:i + args.batch_size].to(device))[0].float().cpu()
                      for i in range(0, len(x), args.batch_size)])


@torch.no_grad()
def fsr_features(model, x, args: Args) -> dict:
    """{feature: N x C on the CPU} at the deepest FSR module (FEATURE_NAMES), each pooled as FSR's head h;
    models without FSR: {"penultimate": the pooled feature that enters the classifier}."""
    modules = modules_of(model, FSR)
    if not modules:
        return {"penultimate": features_of(model, x, args)}
    captured = {}

    def capture(module, inputs, output):
        feature, (passed_on, heads) = inputs[0], output
        mask = heads["mask"].to(feature.dtype)
        maps = {"input": feature, "robust": mask * feature, "non_robust": (1 - mask) * feature, "full": passed_on}
        if module.recalibration is not None:
            maps["recalibrated"] = passed_on - maps["robust"]  # f~ = f+ + f~- (FSR §3.2)
        captured.clear()  # the deepest module runs last and wins
        captured.update({name: fsr_pool(value).float().cpu() for name, value in maps.items()})
    hooks = [m.register_forward_hook(capture) for m in modules]
    device = next(model.parameters()).device
    parts = []
    try:
        for i in range(0, len(x), args.batch_size):
            model(x[i:i + args.batch_size].to(device))
            parts.append(dict(captured))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def knn_predict(query: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, k: int,
                num_classes: int, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Weighted k-NN on cosine similarity (FSR §4.3): the k nearest references vote with
    w_i = exp(cos(f, v_i) / gamma), s_c = sum_{i in N_k} w_i 1(c_i = c)."""
    reference = torch.nn.functional.normalize(reference, dim=1)
    predictions = []
    for part in torch.nn.functional.normalize(query, dim=1).split(1024):
        similarity, nearest = (part @ reference.T).topk(min(k, len(reference)), dim=1)
        votes = torch.zeros(len(part), num_classes).scatter_add_(1, labels[nearest], (similarity / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def knn_report(model, run_args, args: Args, eps: float, x, y, log) -> dict:
    """FSR Table 5 (b): per feature, the k-NN accuracy of the test points, natural and after the table's PGD-20,
    among the same feature of natural training images ("we embed each feature among the features of natural images")."""
    info = dataset_info(run_args.dataset)
    x_train, y_train = load_split(run_args, args.data_root, train=True)
    chosen = torch.arange(len(y_train)) if args.knn_train_examples is None else \
        balanced_subset(y_train, args.knn_train_examples, info.num_classes, args.subset_seed)
    reference, labels = fsr_features(model, x_train[chosen], args), y_train[chosen]
    x_adv = adversarial_examples(model, attack_fn("pgd20", run_args, args, eps), x, y, args, "k-NN PGD-20", log)
    queries = {"adversarial": fsr_features(model, x_adv, args), "natural": fsr_features(model, x, args)}
    accuracy = {feature: {f"{kind}_k{k}": share(knn_predict(queries[kind][feature], reference[feature], labels, k,
                                                              info.num_classes) == y)
                          for kind in queries for k in KNN_K}
                for feature in reference}
    for feature, values in accuracy.items():
        log(f"  Table 5 (b), {FEATURE_NAMES[feature]}: " + ", ".join(f"{key} {v:.2%}" for key, v in values.items()))
    return {"accuracy": accuracy, "features": {f: FEATURE_NAMES[f] for f in reference},
            "position": "the deepest FSR module (penultimate feature without FSR)",
            "pooling": "global average pool of each feature map", "queries": "PGD-20 of the table against the "
            "model with f~ passed on (adversarial); the clean test points (natural)",
            "reference": "the same feature of natural training images", "train_examples": len(chosen),
            "k": list(KNN_K), "temperature": KNN_TEMPERATURE, "similarity": "cosine"}


def adversarial_examples(model, fn, x, y, args: Args, label: str, log) -> torch.Tensor:
    """fn's x_adv for all of x, on the CPU (attack_batches: seeded per batch, sharded under torchrun)."""
    return torch.cat(attack_batches(model, fn, x, y, args, label, log, keep=lambda x_adv, yb: x_adv.cpu()))


# ==== Gradient-masking report (FSR appendix C) ===================================================

def masking_report(model, x, y, eps: float, args: Args, log=print, aa_warnings=None, known: dict | None = None,
                   dataset: str | None = None, steps=MASKING_STEPS, eps_factors=MASKING_EPS_FACTORS) -> tuple:
    """FSR appendix C's criteria as PASS / FAIL lines (docs/evaluation.md), on CE from x, with the strongest attack
    for the model (through the mask for CIFS models). `known`: {(column, view): accuracy} not run again.
    `dataset`: the checkpoint's (the table's PGD-20 step). `steps` / `eps_factors`: shorter sweeps (tests)."""
    started = time.time()
    known, reused, notes = known or {}, [], []
    tolerance = max(MASKING_TOLERANCE, 1 / len(y))
    cifs_model = bool(modules_of(model, CIFS))
    strongest = THROUGH_MASK if cifs_model else STANDARD
    pgd20_step = step_sizes(dataset or "", eps)["pgd20"]

    def pgd(budget, step, n):
        return lambda m, xb, yb: attacks.pgd(m, xb, yb, budget, step, n, random_start_kind=None)

    @torch.no_grad()
    def correct(x_adv, yb):  # any model: logits or (logits, aux)
        return (attacks.logits_of(model(x_adv)).argmax(1) == yb).sum().item()

    def accuracy(fn, label: str, view: str = strongest, column: str | None = None) -> float:
        if (column, view) in known:
            reused.append(f"{column} ({view})")
            return known[(column, view)]
        with attack_view(model, view):
            return sum(attack_batches(model, fn, x, y, args, f"masking {label} ({view})", log, keep=correct)) / len(y)
    fgsm = accuracy(lambda m, xb, yb: attacks.fgsm(m, xb, yb, eps), "FGSM", column="fgsm")
    pgd20 = accuracy(pgd(eps, pgd20_step, 20), "PGD-20", column="pgd20")
    by_steps = {n: accuracy(pgd(eps, 2.5 * eps / n, n), f"PGD-{n}") for n in steps}
    budgets = [min(1.0, eps * f) for f in eps_factors]
    # The budget eps itself is PGD-20 of step eps/10: the column above, when its step is eps/10.
    by_eps = {f"{b:.6g}": pgd20 if b == eps and pgd20_step == eps / 10 else
              accuracy(pgd(b, b / 10, 20), f"eps {b:.4f}") for b in budgets}
    unbounded = accuracy(pgd(1.0, 0.05, 100), "unbounded")

    def non_increasing(values):
        return all(b <= a + tolerance for a, b in zip(values, values[1:]))
    checks = {"steps": non_increasing(list(by_steps.values())), "eps": non_increasing(list(by_eps.values())),
              "unbounded": unbounded == 0.0, "one_step_vs_iterative": pgd20 <= fgsm}
    lines = {"steps": "accuracy non-increasing in PGD steps " + str({n: round(a, 4) for n, a in by_steps.items()}),
             "eps": "accuracy non-increasing in eps " + str({b: round(a, 4) for b, a in by_eps.items()}),
             "unbounded": f"unbounded attack (eps 1, 100 steps of 0.05) reaches 0 %: {unbounded:.2%}",
             "one_step_vs_iterative": f"FGSM {fgsm:.2%} >= PGD-20 {pgd20:.2%}"}
    gap = None
    if cifs_model:
        standard = accuracy(pgd(eps, pgd20_step, 20), "PGD-20", STANDARD, "pgd20")
        gap = {"standard_pgd20": standard, "through_mask_pgd20": pgd20, "threshold": MASK_GAP_THRESHOLD}
        well_above = standard - pgd20 > MASK_GAP_THRESHOLD + 1e-9 and round((standard - pgd20) * len(y)) > 1
        checks["through_mask_gap"] = not well_above  # the papers' attacks overstate its robustness
        lines["through_mask_gap"] = (
            f"standard PGD-20 {standard:.2%} is not well above PGD-20 through the mask {pgd20:.2%} "
            f"(threshold {100 * MASK_GAP_THRESHOLD:g} points)" if checks["through_mask_gap"] else
            f"standard PGD-20 {standard:.2%} is {100 * (standard - pgd20):.2f} points above PGD-20 through the "
            f"mask {pgd20:.2%} (threshold {100 * MASK_GAP_THRESHOLD:g} points): the papers' attacks, which treat "
            "the mask as a constant, overstate this model's robustness; quote the worst-case columns")
    if aa_warnings is not None:  # a gradient in a CIFS forward (the official module's) is by design: a note only
        expected = [w for w in aa_warnings if cifs_model and "dynamic defense" in w]
        others = [w for w in aa_warnings if w not in expected]
        checks["autoattack_warnings"] = not others
        lines["autoattack_warnings"] = f"AutoAttack raised no warning (other than expected notes): {others}"
        if expected:
            notes.append("AutoAttack flags a dynamic defence: expected for CIFS, whose official module computes its "
                         "channel mask as a gradient inside the forward (CIFS Eq. 2); not a sign of gradient masking by itself, "
                         "the checks above decide")
    log(f"  masking report: attacks {strongest}" + (f"; reused from the table: {', '.join(reused)}" if reused else ""))
    for name, passed in checks.items():
        log(f"  {'PASS' if passed else 'FAIL'} {name}: {lines[name]}")
    for note in notes:
        log(f"  NOTE {note}")
    report = {"attack": strongest, "steps": {str(n): a for n, a in by_steps.items()}, "step_size": "2.5 eps / steps",
              "eps": by_eps, "eps_attack": "PGD-20, step eps/10", "unbounded": unbounded, "fgsm": fgsm,
              "pgd20": pgd20, "pgd20_step": pgd20_step, "through_mask_gap": gap, "tolerance": tolerance,
              "autoattack_warnings": aa_warnings, "notes": notes, "reused_from_table": reused, "lines": lines,
              "checks": {name: "PASS" if passed else "FAIL" for name, passed in checks.items()},
              "passed": all(checks.values())}
    return report, time.time() - started


# ==== CIFS channel analysis (CIFS appendix A.1, Fig. 1/3/A.2) ====================================

def channel_statistics(features: torch.Tensor) -> dict:
    """Per channel: normalised mean |activation|, and how often it exceeds 1 % of the group's largest."""
    magnitude = features.abs().mean(0)
    threshold = 0.01 * features.abs().max()
    return {"magnitude": (magnitude / magnitude.max().clamp_min(1e-12)).tolist(),
            "frequency": (features > threshold).float().mean(0).tolist()}


def channel_analysis(model, pgd20, x, y, num_classes: int, args: Args, log) -> tuple[dict, float]:
    """Per class c: channels ordered by the class's last-layer weights (largest first), and the
    channel_statistics of natural and PGD-20 images of class c in that order."""
    started = time.time()
    x_adv = adversarial_examples(model, pgd20, x, y, args, "channel PGD-20", log)
    natural, adversarial = features_of(model, x, args), features_of(model, x_adv, args)
    # The classifier's last Linear: itself for ResNets / WRN / smallcnn; VGG's classifier is an MLP.
    weights = modules_of(model.classifier, nn.Linear)[-1].weight.detach().float().cpu()
    if weights.shape[1] != natural.shape[1]:
        raise ValueError(f"last Linear has {weights.shape[1]} inputs but the features have {natural.shape[1]} channels")
    per_class = {}
    for c in range(num_classes):
        members = y == c
        if not members.any():
            continue
        order = weights[c].argsort(descending=True)
        per_class[str(c)] = {"order": order.tolist(), "weights": weights[c, order].tolist(),
                             "natural": channel_statistics(natural[members][:, order]),
                             "adversarial": channel_statistics(adversarial[members][:, order])}
    log(f"  channel analysis: {len(per_class)} classes x {natural.shape[1]} channels")
    weighs = "feature channels" if isinstance(model.classifier, nn.Linear) else \
        "hidden units of the classifier MLP (VGG): the order is only a proxy"
    return {"channels": natural.shape[1], "classes": per_class, "threshold": "1 % of the max", "weights_of": weighs,
            "order": "descending last-layer weight of the class"}, time.time() - started


# ==== Reporting and output =======================================================================

def share(verdicts: torch.Tensor) -> float:
    """The fraction of True among per-example verdicts, from integer counts (2 of 20: 0.1, not 0.10000000149)."""
    return int(verdicts.sum()) / len(verdicts) if len(verdicts) else math.nan


def column_accuracy(name: str, per_example: dict, sweep: dict) -> float:
    """A column's accuracy: the minimum over beta_atk when swept (Table B.3), else the mean."""
    return min(sweep[name].values()) if name in sweep else share(per_example[name])


def protocol(args: Args, run_args, eps: float, betas, cifs_model: bool, precision: str = "fp32") -> dict:
    """The attack settings of a result; `precision` as run_support.set_tf32 describes it."""
    steps = step_sizes(run_args.dataset, eps)
    return {"epsilon": eps, "norm": "Linf", "mode": "eval", "precision": precision,
            "random_start": args.random_start, "restarts": args.restarts,
            "fgsm": "x + eps sign(grad CE)", "pgd20": {"steps": 20, "step_size": steps["pgd20"]},
            "pgd100": {"steps": 100, "step_size": steps["pgd100"]},
            "cw": {"steps": args.cw_steps, "step_size": steps["cw"], "kappa": args.kappa},
            "ensemble": "AND of " + ", ".join(ENSEMBLE_OF),
            "autoattack": {"version": args.aa_version, "attacks": args.aa_attacks,
                           "package": "pyautoattack (PyPI repackaging of fra31/auto-attack, attack code identical)"},
            "adaptive_betas": list(betas), "n_examples": args.n_examples, "subset_seed": args.subset_seed,
            "seed": args.seed, "through_mask": (not args.no_through_mask) if cifs_model else None,
            "transfer_source": args.transfer_source,
            "nattack": {"examples": args.nattack_examples, "seed": args.nattack_seed, "queries": args.nattack_queries,
                        "population": args.nattack_population} if args.nattack else None,
            "autoattack_cifs": ({"examples": args.autoattack_cifs_examples, "beta": 2.0}
                                if args.autoattack_cifs else None),
            "knn": {"k": list(KNN_K), "temperature": KNN_TEMPERATURE, "train_examples": args.knn_train_examples}
            if args.fsr_analysis else None}


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for package in ("torch", "torchvision", "numpy", "pyautoattack"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def configuration(result: dict) -> str:
    """What a checkpoint is (method, settings but BOOKKEEPING, last.pt or best.pt), as a JSON key."""
    run = {key: value for key, value in result["run"].items() if key not in BOOKKEEPING}
    run["warm_start"] = bool(result["run"].get("init_from"))
    return json.dumps({"method": result["method"], "file": os.path.basename(result["checkpoint"]), "run": run},
                      sort_keys=True)


def seed_groups(results: list) -> list:
    """[[indices into results]] of configurations evaluated with two or more distinct seeds."""
    groups: dict = {}
    for index, result in enumerate(results):
        if not result["run"].get("official"):  # an official file has no seed of ours
            groups.setdefault(configuration(result), []).append(index)
    return [members for members in groups.values() if len(members) > 1
            and len({results[i]["run"]["seed"] for i in members}) == len(members)]


def seed_summary(results: list, members: list) -> dict:
    """Mean and sample standard deviation over the seeds of one configuration, per column all have."""
    chosen = [results[i] for i in members]
    columns = [c for c in chosen[0]["accuracy"] if all(c in r["accuracy"] for r in chosen)]
    values = {c: [r["accuracy"][c] for r in chosen] for c in columns}
    return {"checkpoints": [r["checkpoint"] for r in chosen], "seeds": [r["run"]["seed"] for r in chosen],
            "n": len(chosen), "configuration": json.loads(configuration(chosen[0])),
            "mean": {c: statistics.fmean(v) for c, v in values.items()},
            "std": {c: statistics.stdev(v) for c, v in values.items()}, "std_kind": "sample (n - 1)"}


def other_checkpoint(result: str, path: str) -> str | None:
    """The checkpoint whose result `result` (a JSON) holds, when that is another file than `path` (else None)."""
    try:
        with open(result) as file:
            other = json.load(file)["checkpoint"]
        return None if os.path.samefile(other, path) else other
    except (OSError, ValueError, KeyError, TypeError):  # no such result, or its checkpoint is gone
        return None


def run_folder(path: str) -> str:
    """The folder of a checkpoint (its run name)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"


def result_name(path: str) -> str:
    """The stem of a checkpoint's outputs: its run folder and its file, e.g. fsr_cifar10_..._seed0_last."""
    return f"{run_folder(path)}_{os.path.splitext(os.path.basename(path))[0]}"


def result_names(paths: list) -> list:
    """result_name of each path; a name that repeats within one call gets _2, _3, ... ."""
    names, seen = [], {}
    for path in paths:
        name = result_name(path)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def row_name(run: dict, method: str) -> str:
    if run.get("official"):
        return f"official {method.upper()} {run['model']} ({run['official']})"
    vanilla = run.get("no_fsr") or run.get("no_cifs")
    return f"{run['model']} {run['strategy']} " + ("(vanilla)" if vanilla else f"+ {method.upper()}")


def markdown_table(results: list, summaries: list | None = None) -> str:
    """One row per checkpoint; after the seeds of a configuration, its mean ± std row (summaries' pairs)."""
    summaries = summaries or []
    columns = [c for c in COLUMN_TITLES if any(c in r["accuracy"] for r in results)]  # in the table's order
    lines = ["| model | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    group_of = {i: group for group in summaries for i in group[0]}
    written = set()
    for index, r in enumerate(results):
        if index in written:
            continue
        members, summary = group_of.get(index, ([index], None))
        for i in members:
            result, run = results[i], results[i]["run"]
            cells = [f"{100 * result['accuracy'][c]:.2f}" if c in result["accuracy"] else "" for c in columns]
            checkpoint = f"{run_folder(result['checkpoint'])}/{os.path.basename(result['checkpoint'])}"
            seed = "" if run.get("official") else f", seed {run['seed']}"
            name = f"{checkpoint}: {row_name(run, result['method'])}{seed}, {len(result['labels'])} images"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            written.add(i)
        if summary is not None:
            cells = [f"{100 * summary['mean'][c]:.2f} ± {100 * summary['std'][c]:.2f}" if c in summary["mean"] else ""
                     for c in columns]
            seeds = ", ".join(str(seed) for seed in summary["seeds"])
            lines.append(f"| {row_name(r['run'], r['method'])}, mean ± std (seeds {seeds}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def new_figure(columns: int, rows: int = 1, size: tuple = (4.0, 3.2)):
    """A matplotlib Figure (no pyplot: no global state, no backend) and its axes; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False)


def plot_masking_report(report: dict, path: str) -> bool:
    """FSR appendix C: accuracy vs PGD steps, vs eps, and FGSM / PGD-20 / unbounded. False without matplotlib."""
    figure, axes = new_figure(3)
    if figure is None:
        return False
    checks = report["checks"]
    panels = {"steps": ([int(n) for n in report["steps"]], "PGD steps (step 2.5 eps / steps)"),
              "eps": ([255 * float(b) for b in report["eps"]], "eps (x 1/255), PGD-20")}
    for ax, (key, (xs, xlabel)) in zip(axes[0], panels.items()):
        ax.plot(xs, [100 * a for a in report[key].values()], "o-")
        ax.set(xscale="log", xlabel=xlabel, title=f"{key}: {checks[key]}")
    axes[0, 2].bar(["FGSM", "PGD-20", "unbounded"], [100 * report[key] for key in ("fgsm", "pgd20", "unbounded")])
    axes[0, 2].set(title=f"one-step {checks['one_step_vs_iterative']}, unbounded {checks['unbounded']}")
    for ax in axes[0]:
        ax.set(ylim=(0, 100), ylabel="robust accuracy (%)")
        ax.grid(alpha=0.3)
    figure.suptitle(f"gradient-masking report (attacks {report.get('attack', STANDARD)}): "
                    + ("all checks PASS" if report["passed"] else "a check FAILS"))
    figure.savefig(path, dpi=100)
    return True


def plot_channel_analysis(analysis: dict, path: str, max_classes: int = 10) -> bool:
    """CIFS Fig. 1/3/A.2 of the first `max_classes` classes, natural and PGD-20. False without matplotlib."""
    classes = list(analysis["classes"].items())[:max_classes]
    per_row = min(5, len(classes))
    figure, axes = new_figure(per_row, 2 * math.ceil(len(classes) / per_row), size=(3.2, 2.4))
    if figure is None:
        return False
    for index in range(len(classes), axes.shape[0] // 2 * per_row):  # empty cells of the last row
        for offset in (0, 1):
            axes[2 * (index // per_row) + offset, index % per_row].set_axis_off()
    for index, (label, entry) in enumerate(classes):
        for offset, stat in enumerate(("magnitude", "frequency")):  # a class: magnitude above frequency
            ax = axes[2 * (index // per_row) + offset, index % per_row]
            for kind, style in (("natural", "-"), ("adversarial", "--")):
                ax.plot(entry[kind][stat], style, linewidth=0.8, label=kind)
            ax.set(ylim=(0, 1.02), title=f"class {label}: {stat}",
                   xlabel="channel (by descending weight)" if offset else None)
    axes[0, 0].legend(fontsize="small")
    total = len(analysis["classes"])
    shown = f"first {len(classes)} of {total} classes, " if total > len(classes) else ""
    figure.suptitle(f"channel analysis ({shown}{analysis['channels']} channels; weights of {analysis['weights_of']})")
    figure.savefig(path, dpi=100)
    return True


def write_plots(result: dict, stem: str) -> list:
    """The PNGs of the analyses `result` holds; [] (and nothing written) without matplotlib."""
    written = []
    for key, suffix, draw in (("masking_report", "_masking.png", plot_masking_report),
                              ("channel_analysis", "_channels.png", plot_channel_analysis)):
        if key in result and draw(result[key], stem + suffix):
            written.append(stem + suffix)
    return written


def write_result(result: dict, out: str, name: str, log=print) -> None:
    """<name>.json (first, atomically), <name>.csv (one row per example) and the plots of its analyses."""
    stem = os.path.join(out, name)
    write_text_atomically(stem + ".json", json.dumps(result, indent=1, sort_keys=True))
    with open(stem + ".csv", "w", newline="") as file:
        writer = csv.writer(file)
        names = list(result["per_example"])
        writer.writerow(["index", "label", *names])
        for i, (index, label) in enumerate(zip(result["indices"], result["labels"])):
            writer.writerow([index, label, *(result["per_example"][n][i] for n in names)])
    # Plots last: the data are on disk before anything can go wrong in drawing them.
    if ("masking_report" in result or "channel_analysis" in result) and not write_plots(result, stem):
        log("matplotlib is not installed: no plots drawn (the data are in the JSON; pip install matplotlib)")


def write_tables(out: str) -> str:
    """table.md (returned) and summary.json of every result in the folder, this call's and earlier ones."""
    results = []  # every result JSON in the folder (written by write_result), in the order written
    for name in sorted(os.listdir(out), key=lambda name: (os.path.getmtime(os.path.join(out, name)), name)):
        if name.endswith(".json") and name != "summary.json":
            with open(os.path.join(out, name)) as file:
                result = json.load(file)
            if isinstance(result, dict) and {"checkpoint", "accuracy", "run"} <= set(result):
                results.append(result)
    summaries = [(members, seed_summary(results, members)) for members in seed_groups(results)]
    with open(os.path.join(out, "summary.json"), "w") as file:
        json.dump({"seed_groups": [summary for _, summary in summaries]}, file, indent=1, sort_keys=True)
    # What each column ran, once per distinct protocol: a number is never read without its attack.
    notes = dict.fromkeys(describe_protocol(r["protocol"], r["run"]["dataset"], r["accuracy"]) for r in results)
    table = markdown_table(results, summaries) + "\n" + "\n".join(notes) + "\n"
    with open(os.path.join(out, "table.md"), "w") as file:
        file.write(table)
    return table


def write_outputs(results: list, out: str, log=print) -> None:
    """write_result for each result (named by result_names), then write_tables."""
    os.makedirs(out, exist_ok=True)
    for result, name in zip(results, result_names([r["checkpoint"] for r in results])):
        write_result(result, out, name, log)
    write_tables(out)


def describe_protocol(p: dict, dataset: str, columns) -> str:
    """One line: what each of `columns` ran (steps and step size, start, restarts)."""
    start = "uniform random start" if p["random_start"] else "no random start"
    parts = {"fgsm": "FGSM one step of eps",
             "pgd20": f"PGD-20 {p['pgd20']['steps']} steps of {p['pgd20']['step_size']:.4g}",
             "pgd100": f"PGD-100 {p['pgd100']['steps']} steps of {p['pgd100']['step_size']:.4g}",
             "cw": f"C&W {p['cw']['steps']} steps of {p['cw']['step_size']:.4g} on the margin "
                   f"(kappa {p['cw']['kappa']:g})",
             "ensemble": f"Ensemble: {p['ensemble']}", "autoattack": f"AutoAttack {p['autoattack']['version']}"}
    described = [text for name, text in parts.items() if name in columns]
    if any(name.endswith("-tm") for name in columns):
        described.append("(through mask): the same attacks, the input gradient taken through the CIFS mask; "
                         "Worst-case: per example, the worst of every view")
    return (f"Protocol ({dataset}, eps {p['epsilon']:.4g}, {start}, {p['restarts']} restart(s), eval mode, "
            f"{p.get('precision', 'fp32')}): " + "; ".join(described))


def draw_curves(args: Args, log=print) -> str:
    """--curves: the metrics.jsonl of each run folder, overlaid in <out>/curves.png."""
    folders = [path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)) for path in args.checkpoints]
    missing = [f for f in folders if not os.path.isfile(os.path.join(f, "metrics.jsonl"))]
    if missing:
        raise FileNotFoundError(f"--curves: no metrics.jsonl in {', '.join(missing)} (give run folders)")
    out = args.out or os.path.dirname(os.path.abspath(folders[0]))
    path = os.path.join(out, "curves.png")
    if os.path.exists(path) and not args.overwrite:
        raise FileExistsError(f"{path} exists: pass another --out, or --overwrite")
    os.makedirs(out, exist_ok=True)
    if not plot_training_curves(folders, path):
        raise ImportError("--curves needs matplotlib: pip install matplotlib")
    log(f"training curves of {len(folders)} run(s) written to {path}")
    return path


def main(argv=None) -> list:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a redirected stdout as they are printed
        sys.stdout.reconfigure(line_buffering=True)
    try:
        check_args(args)
        if args.curves:
            draw_curves(args)
            return []
        if args.export_weights:
            export_weights(args.checkpoints[0], args, args.export_weights)
            print(f"weights-only export written to {args.export_weights}")
            return []
        rank = init_distributed(pick_device(args.device))[0]
        log = print if rank == 0 else (lambda *_: None)  # under torchrun only rank 0 prints and writes
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoints[0])), "eval")
        names = result_names(args.checkpoints)
        existing = [f"{name}.json" for name in names if os.path.exists(os.path.join(out, f"{name}.json"))]
        others = [f"{name}.json (of {other})" for name, path in zip(names, args.checkpoints)
                  if (other := other_checkpoint(os.path.join(out, f"{name}.json"), path))]
        if others and not args.overwrite:  # another run whose folder has the same name: --overwrite would lose its result
            raise FileExistsError(f"{out} already holds {', '.join(others)}, the result of another checkpoint from a run "
                                  f"folder of the same name: pass another --out (--overwrite would replace it)")
        if existing and not args.overwrite:  # never replace an earlier result of the same checkpoint
            raise FileExistsError(f"{out} already holds {', '.join(existing)}: pass another --out, or --overwrite "
                                  f"to replace {'it' if len(existing) == 1 else 'them'}")
        check_writable(out, "--out")
        # Every checkpoint (its file, version, weights, test split) before the first attack runs.
        source = load_source(args)
        prepared = [prepare(path, args, log, source) for path in args.checkpoints]
        missing = robustbench_refusal(args, prepared[0][1]) if args.robustbench_json else []
        if missing:
            raise ValueError("--robustbench-json: RobustBench lists standard AutoAttack on the full test set; this "
                             "evaluation lacks " + "; ".join(missing))
        results = []
        for path, name, entry in zip(args.checkpoints, names, prepared):
            results.append(evaluate_checkpoint(path, args, log, entry))
            if rank == 0:  # written as soon as it is done: a later failure loses nothing finished
                os.makedirs(out, exist_ok=True)
                write_result(results[-1], out, name, log)
        if args.robustbench_json and rank == 0:
            stem = os.path.join(out, args.robustbench_json)
            write_text_atomically(stem + ".json", json.dumps(robustbench_info(results[0]), indent=1))
            export_weights(args.checkpoints[0], args, stem + ".pt")
            log(f"RobustBench model_info {stem}.json and weights-only {stem}.pt written (docs/other-tools.md)")
    except (CheckpointError, RunStopped, ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        sys.exit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print("\n" + write_tables(out))
        print(f"written to {out}/")
    return results


if __name__ == "__main__":
    main()
