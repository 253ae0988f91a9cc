"""The CPU-scale Fashion-MNIST study: FSR and CIFS, each against its own baseline, on real data.

    python benchmarks/fmnist_study.py        # 1 h 39 min on 2 cores (2026-12-07): runs/fmnist_study/study.md
    python benchmarks/fmnist_study.py --models fsr_vanilla,fsr --seeds 0 --out runs/fsr_only   # a part of it

Per seed, seven models with identical settings on the same seeded class-balanced training subset (MODELS):
`fsr.py --no-fsr` (FSR's baseline), `fsr.py`, two capacity controls (`fsr.py --hidden 2`: an FSR module that
adds the paper's share of parameters, about 11 %, instead of 4x the network; `fsr.py --no-fsr --model
smallcnn_wide`: a vanilla network with as many parameters and FLOPs as smallcnn + FSR), `cifs.py --no-cifs`
(CIFS's baseline), `cifs.py` (its smallcnn defaults, docs/cifs.md) and `cifs.py --probes mlp` (whose mask
depends on the input, so that attacking through it can matter). Each run trains one epoch per process and
continues with --resume (bitwise the uninterrupted run), keeping every epoch's checkpoint as epoch<N>.pt, so
the study, stopped, continues where it stopped when run again. Then evaluate.py on the same class-balanced
test images (every white-box column, APGD-CE, and for CIFS the through-the-mask and worst-case columns), FSR
appendix C's masking checks on every epoch of the seed-0 FSR runs and their baseline (the swing of the
monitored accuracy), and for CIFS the accuracy with masks built from the true label (as in training) beside
the masks it uses. Writes <out>/study.md, curves.png, eval/, swing/, logs/ and runs/. A CPU-scale study on
a 0.09 M-parameter network, not a reproduction of either paper (docs/fmnist-study.md).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/fmnist_study.py` puts benchmarks/ on the path, not the root
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import evaluate as ev  # noqa: E402
from cifs import CIFS  # noqa: E402
from data import balanced_subset  # noqa: E402
from run_support import arg, check_finite, format_seconds, int_list, parse_args, write_text_atomically  # noqa: E402

# name: (script, its extra flags, the baseline it is compared with)
MODELS = {
    "fsr_vanilla": ("fsr.py", ["--no-fsr"], None),
    "fsr": ("fsr.py", [], "fsr_vanilla"),
    "fsr_hidden2": ("fsr.py", ["--hidden", "2"], "fsr_vanilla"),
    "fsr_vanilla_wide": ("fsr.py", ["--no-fsr", "--model", "smallcnn_wide"], "fsr_vanilla"),
    "cifs_vanilla": ("cifs.py", ["--no-cifs"], None),
    "cifs": ("cifs.py", [], "cifs_vanilla"),
    "cifs_mlp": ("cifs.py", ["--probes", "mlp"], "cifs_vanilla"),  # a mask that depends on the input: see report
}
LABELS = {"fsr_vanilla": "vanilla AT, 94 k parameters (`fsr.py --no-fsr`)", "fsr": "AT + FSR, 465 k (`fsr.py`)",
          "fsr_hidden2": "AT + FSR of hidden width 2, 105 k: the paper's +11 % (`fsr.py --hidden 2`)",
          "fsr_vanilla_wide": "vanilla AT, 465 k (`fsr.py --no-fsr --model smallcnn_wide`)",
          "cifs_vanilla": "vanilla AT (`cifs.py --no-cifs`)", "cifs": "AT + CIFS (`cifs.py`)",
          "cifs_mlp": "AT + CIFS, MLP probe (`cifs.py --probes mlp`)"}
# evaluate.py's keys: -tm, through the CIFS mask; -worst, per example the worst of both views (CIFS only)
COLUMNS = ("natural", "fgsm", "pgd20", "pgd100", "cw", "ensemble", "autoattack", "pgd20-tm", "pgd100-tm",
           "pgd100-worst", "ensemble-worst")
TITLES = {**ev.COLUMN_TITLES, "autoattack": "APGD-CE"}  # the study runs AutoAttack's APGD-CE alone


@dataclasses.dataclass
class Args:
    models: str = arg(",".join(MODELS), "comma-separated models to train and evaluate")
    train_size: int = arg(10_000, "class-balanced training images (the same subset for every model of a seed)")
    epochs: int = arg(8, "training epochs")
    milestones: str = arg("6", "epochs run before each 10x lr drop")
    batch_size: int = arg(32, "training batch size")
    attack_steps: int = arg(5, "PGD steps of the training attack (eps 0.3)")
    attack_step_size: float = arg(0.08, "step of the training attack")
    seeds: str = arg("0,1", "comma-separated seeds (each: every model)")
    monitor_size: int = arg(1000, "test images monitored after every epoch (clean and PGD-20, as the scripts)")
    n_examples: int = arg(1000, "class-balanced test images of the evaluation (the same for every model)")
    swing_examples: int = arg(200, "test images of the masking checks on every epoch of seed-0 fsr and fsr_vanilla "
                              "(0: skip)")
    jobs: int = arg(2, "processes at a time, one torch thread each")
    data_root: str = arg(None, "Fashion-MNIST folder (default: data, or Debian's copy; docs/data.md)", str)
    out: str = arg("runs/fmnist_study", "output folder")
    dataset: str = arg("fmnist", "fmnist, or synthetic (a test of this script without Fashion-MNIST)",
                       choices=("fmnist", "synthetic"))


def check(args: Args) -> list:
    """One-line errors before any work; returns the seeds and the models."""
    for name in ("train_size", "epochs", "batch_size", "attack_steps", "monitor_size", "n_examples", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.swing_examples < 0:
        raise ValueError(f"--swing-examples {args.swing_examples}: must be 0 (skip) or more")
    check_finite(args)
    if not args.attack_step_size > 0:
        raise ValueError(f"--attack-step-size {args.attack_step_size}: must be positive")
    int_list("milestones", args.milestones, increasing=True)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {args.seeds!r}: distinct non-negative integers, e.g. 0,1,2")
    models = args.models.split(",")
    if not set(models) <= set(MODELS) or len(set(models)) != len(models):
        raise ValueError(f"--models {args.models!r}: distinct names among {','.join(MODELS)}")
    return seeds, [m for m in MODELS if m in models]


def python(script: str, flags: list, log: str) -> None:
    """Run one of our scripts with one torch thread, appending its output to `log`; stop the study on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, os.path.join(REPO, script), *flags]
    with open(log, "a") as file:
        file.write(f"$ {shlex.join(command)}\n")
        file.flush()
        done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, env=env)  # our cwd: paths agree
    if done.returncode:
        raise RuntimeError(f"{script} exited with {done.returncode}: see {log}")


def run_folder(args: Args, model: str, seed: int) -> str:
    return os.path.join(os.path.abspath(args.out), "runs", f"{model}_s{seed}")


def data_root(args: Args) -> list:
    return ["--data-root", args.data_root] if args.data_root else []


def result(args: Args, folder: str, checkpoint: str) -> str:
    """Where evaluate.py --out <out>/<folder> writes the JSON of a checkpoint (its own naming rule)."""
    return os.path.join(args.out, folder, ev.result_name(checkpoint) + ".json")


def train(args: Args, model: str, seed: int) -> str:
    """Train one model one epoch per process, keeping epoch<N>.pt; continue from what is already there."""
    script, extra, _ = MODELS[model]
    folder, log = run_folder(args, model, seed), os.path.join(args.out, "logs", f"{model}_s{seed}.log")
    for epoch in range(1, args.epochs + 1):
        if os.path.exists(os.path.join(folder, f"epoch{epoch}.pt")):
            continue
        last = os.path.join(folder, "last.pt")
        if os.path.exists(last) and torch.load(last, map_location="cpu", weights_only=True)["epoch"] == epoch:
            shutil.copyfile(last, os.path.join(folder, f"epoch{epoch}.pt"))  # stopped before its copy
            continue
        if os.path.exists(last):  # the run's own settings; only --epochs grows
            flags = ["--resume", last, "--epochs", str(epoch), "--device", "cpu"]
        else:
            backbone = [] if "--model" in extra else ["--model", "smallcnn"]
            flags = ["--dataset", args.dataset, *backbone, *extra, "--train-size", str(args.train_size),
                     "--batch-size", str(args.batch_size), "--attack-steps", str(args.attack_steps),
                     "--attack-step-size", str(args.attack_step_size), "--epochs", str(epoch),
                     "--milestones", args.milestones, "--monitor-size", str(args.monitor_size), "--eval-every", "1",
                     "--seed", str(seed), "--device", "cpu", "--runs-dir", os.path.dirname(folder),
                     "--run-name", os.path.basename(folder), *data_root(args)]
            if args.dataset == "synthetic":  # small images: the script's own test
                flags += ["--synthetic-shape", "3,16,16", "--synthetic-size", str(args.train_size)]
        python(script, flags, log)
        shutil.copyfile(last, os.path.join(folder, f"epoch{epoch}.pt"))
    return os.path.join(folder, "last.pt")


def evaluate(args: Args, model: str, seed: int) -> None:
    """evaluate.py on the seed's last.pt: the papers' columns, APGD-CE, CIFS's through-the-mask columns."""
    checkpoint = os.path.join(run_folder(args, model, seed), "last.pt")
    if os.path.exists(result(args, "eval", checkpoint)):
        return
    flags = [checkpoint, "--n-examples", str(args.n_examples), "--attacks", "natural,fgsm,pgd20,pgd100,cw,autoattack",
             "--aa-version", "custom", "--aa-attacks", "apgd-ce", "--device", "cpu", "--out",
             os.path.join(args.out, "eval"), *data_root(args)]
    python("evaluate.py", flags, os.path.join(args.out, "logs", f"eval_{model}_s{seed}.log"))


def swing_checks(args: Args, model: str) -> None:
    """FSR appendix C's masking checks (evaluate.py --masking-report) on every epoch of the seed-0 run."""
    paths = [os.path.join(run_folder(args, model, 0), f"epoch{e}.pt") for e in range(1, args.epochs + 1)]
    todo = [p for p in paths if not os.path.exists(result(args, "swing", p))]
    if todo:
        flags = [*todo, "--n-examples", str(args.swing_examples), "--attacks", "natural,fgsm,pgd20",
                 "--masking-report", "--device", "cpu", "--out", os.path.join(args.out, "swing"), *data_root(args)]
        python("evaluate.py", flags, os.path.join(args.out, "logs", f"swing_{model}.log"))


def cifs_masks(path: str, n_examples: int, data_root: str | None) -> dict:
    """Clean accuracy of a CIFS checkpoint with the masks it uses (the probe's top-2, as at test time) and with
    the masks built from the true label (as in training), and its probe's top-1 / top-2 accuracy."""
    torch.set_num_threads(1)
    net, run_args, _ = ev.load_network(path, torch.device("cpu"))
    x, y = ev.load_split(run_args, data_root, train=False)
    chosen = balanced_subset(y, n_examples, net.num_classes, 0)  # evaluate.py's subset (--subset-seed 0)
    x, y = x[chosen], y[chosen]
    with torch.no_grad():
        logits, emitted = net(x)
        for module in net.modules():
            if isinstance(module, CIFS):
                module.train()  # train-mode masks: the true label's logit (BatchNorm stays in eval mode)
        label_logits, _ = net(x, y)
        net.eval()
    probe = emitted[-1]["probe"]
    ranked = probe.topk(2, dim=1).indices
    return {"clean": (logits.argmax(1) == y).float().mean().item(),
            "clean_label_masks": (label_logits.argmax(1) == y).float().mean().item(),
            "probe_top1": (ranked[:, 0] == y).float().mean().item(),
            "probe_top2": (ranked == y[:, None]).any(1).float().mean().item()}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {cpu}, torch {torch.__version__}, fp32, one torch thread per process"


def mean_std(values: list) -> str:
    if not values:
        return ""
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.fmean(values):.1f}{spread}"


def read_json(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def report(args: Args, seeds: list, models: list, invocations: list) -> str:
    """study.md: the table (mean ± std over seeds, and each method minus its own baseline), the swing, CIFS."""
    evaluated = {(m, s): read_json(result(args, "eval", os.path.join(run_folder(args, m, s), "last.pt")))
                 for m in models for s in seeds}
    results = {m: {s: evaluated[m, s]["accuracy"] for s in seeds} for m in models}
    columns = [c for c in COLUMNS if any(c in results[m][s] for m in models for s in seeds)]
    run = {m: read_json(os.path.join(run_folder(args, m, seeds[0]), "args.json")) for m in models}
    recipe = ", ".join(f"{MODELS[m][0]} lr {run[m]['lr']:g}, weight decay {run[m]['weight_decay']:g}"
                       for m in models if m in ("fsr_vanilla", "cifs_vanilla"))
    protocol = ev.describe_protocol(evaluated[models[0], seeds[0]]["protocol"], args.dataset, COLUMNS)
    title = "Fashion-MNIST at CPU scale" if args.dataset == "fmnist" else "Synthetic data (a test of the script)"
    lines = [f"# {title}: each method against its own baseline", "",
             "; ".join(f"`{i['command']}` on {i['date']}: {format_seconds(i['seconds'])}" for i in invocations)
             + f" ({hardware()}; an invocation continues the one before). Settings: smallcnn (0.09 M parameters), "
             f"{args.train_size} class-balanced training images, Madry AT at eps {run[models[0]]['epsilon']:g} with "
             f"PGD-{args.attack_steps} of step {args.attack_step_size}, batch {args.batch_size}, {args.epochs} epochs, the lr cut 10x after epoch(s) {args.milestones}; the scripts' "
             f"own recipe otherwise ({recipe or 'see args.json'}); seeds {', '.join(map(str, seeds))}. Evaluated "
             f"by evaluate.py on the same {args.n_examples} class-balanced test images; APGD-CE is AutoAttack's "
             "(100 iterations). Mean ± sample std over the seeds, in %. A CPU-scale study, not a reproduction.", "",
             protocol, "",
             "| model | " + " | ".join(TITLES[c] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for model in models:
        baseline = MODELS[model][2] if MODELS[model][2] in models else None
        cells = [mean_std([results[model][s][c] for s in seeds if c in results[model][s]]) for c in columns]
        lines.append(f"| {LABELS[model]} | " + " | ".join(cells) + " |")
        if baseline:
            gains = [mean_std([results[model][s][c] - results[baseline][s][c] for s in seeds])
                     if all(c in results[model][s] and c in results[baseline][s] for s in seeds) else ""
                     for c in columns]
            lines.append(f"| &nbsp;&nbsp;minus its baseline, per seed | " + " | ".join(gains) + " |")
    lines += ["", "## Monitored after every epoch (clean / PGD-20 of step eps/10 on the monitoring images, %)", "",
              "| model, seed | " + " | ".join(f"epoch {e}" for e in range(1, args.epochs + 1)) + " |",
              "|---|" + "---|" * args.epochs]
    for model in models:
        for seed in seeds:
            with open(os.path.join(run_folder(args, model, seed), "metrics.jsonl")) as file:
                rows = [json.loads(line) for line in file]
            lines.append(f"| {model} s{seed} | " + " | ".join(
                f"{100 * r['monitor_clean']:.1f} / {100 * r['monitor_robust']:.1f}" for r in rows) + " |")
    swing = os.path.join(args.out, "swing")
    if args.swing_examples and os.path.isdir(swing):
        lines += ["", f"## Masking checks (FSR appendix C, evaluate.py --masking-report) per epoch, seed 0, "
                  f"{args.swing_examples} test images", "",
                  "| model, epoch | clean | FGSM | PGD-20 | PGD-n of step 2.5 eps/n, n: accuracy | unbounded | "
                  "failed checks |", "|---|---|---|---|---|---|---|"]
        for model in [m for m in ("fsr_vanilla", "fsr") if m in models]:
            for epoch in range(1, args.epochs + 1):
                checks = read_json(result(args, "swing", os.path.join(run_folder(args, model, 0), f"epoch{epoch}.pt")))
                masking, acc = checks["masking_report"], checks["accuracy"]
                by_steps = sorted(masking["steps"].items(), key=lambda item: int(item[0]))
                steps = ", ".join(f"{n}: {100 * v:.1f}" for n, v in by_steps)
                failed = ", ".join(k for k, v in masking["checks"].items() if v != "PASS") or "none"
                lines.append(f"| {model} epoch {epoch} | {100 * acc['natural']:.1f} | {100 * acc['fgsm']:.1f} | "
                             f"{100 * acc['pgd20']:.1f} | {steps} | {100 * masking['unbounded']:.1f} | {failed} |")
    cifs_models = [m for m in models if m in ("cifs", "cifs_mlp")]
    lines += ["", "## CIFS: the masks it uses against the masks built from the true label", "",
              "| model, seed | clean (probe's top-2 masks, as tested) | clean (true-label masks, as trained) | "
              "probe top-1 | probe top-2 |", "|---|---|---|---|---|"] if cifs_models else []
    for model in cifs_models:
        for seed in seeds:
            m = cifs_masks(os.path.join(run_folder(args, model, seed), "last.pt"), args.n_examples, args.data_root)
            lines.append(f"| {model} s{seed} | {100 * m['clean']:.1f} | {100 * m['clean_label_masks']:.1f} | "
                         f"{100 * m['probe_top1']:.1f} | {100 * m['probe_top2']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(Args, argv, description=__doc__.split("\n")[0])
    try:
        seeds, models = check(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    command = shlex.join(["python", "benchmarks/fmnist_study.py", *(sys.argv[1:] if argv is None else argv)])
    settings = {k: v for k, v in dataclasses.asdict(args).items()
                if k not in ("models", "seeds", "jobs", "data_root", "out")}
    saved = os.path.join(args.out, "settings.json")  # a continued study keeps the settings it started with
    if os.path.exists(saved):
        changed = [k for k, v in read_json(saved).items() if settings.get(k) != v]
        if changed:
            sys.exit(f"error: {', '.join('--' + k.replace('_', '-') for k in changed)}: {args.out} holds a study "
                     "made with other values (its settings.json); pass another --out")
    for folder in ("logs", "runs", "eval", "swing"):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    write_text_atomically(saved, json.dumps(settings, indent=1))
    started, start_date = time.time(), datetime.datetime.now().isoformat(timespec="minutes")
    print(f"{args.dataset} study: {len(models)} models x {len(seeds)} seed(s), {args.jobs} processes at a time; logs in "
          f"{os.path.join(args.out, 'logs')}", flush=True)
    def study_one(model, seed):  # no job waits for another: a worker is never idle while work remains
        train(args, model, seed)
        evaluate(args, model, seed)
        if seed == 0 and args.swing_examples and model in ("fsr_vanilla", "fsr"):
            swing_checks(args, model)
        return f"{model} seed {seed} trained and evaluated"

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # seed by seed: a stopped study has seeds done
        futures = [pool.submit(study_one, model, seed) for seed in seeds for model in models]
        try:
            for future in concurrent.futures.as_completed(futures):
                print(f"  {future.result()} ({format_seconds(time.time() - started)} in)", flush=True)
        except (RuntimeError, KeyboardInterrupt) as error:
            for future in futures:
                future.cancel()
            if isinstance(error, RuntimeError):
                sys.exit(f"error: {error}; run the same command again to continue")
            print("interrupted: run the same command again to continue", file=sys.stderr)
            sys.exit(130)  # as the training scripts on Ctrl-C
    if importlib.util.find_spec("matplotlib"):  # optional, as everywhere: curves.png of the seed-0 runs
        python("evaluate.py", ["--curves", *[run_folder(args, m, seeds[0]) for m in models], "--out", args.out,
                               "--overwrite"],  # redrawn from every epoch so far, on each invocation
               os.path.join(args.out, "logs", "curves.log"))
    with open(os.path.join(args.out, "invocations.jsonl"), "a") as file:  # what each invocation took
        file.write(json.dumps({"command": command, "date": start_date,
                               "seconds": round(time.time() - started)}) + "\n")
    with open(os.path.join(args.out, "invocations.jsonl")) as file:
        text = report(args, seeds, models, [json.loads(line) for line in file])
    write_text_atomically(os.path.join(args.out, "study.md"), text)
    print("\n" + text + f"\nwritten to {os.path.join(args.out, 'study.md')}", flush=True)


if __name__ == "__main__":
    main()
