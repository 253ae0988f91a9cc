"""What a run shows while it lives: the banner, a progress line with ETA within each epoch, one summary
line per epoch, and the training-curve figure (losses, training accuracy, held-out and monitored clean
and PGD accuracy) that fsr.py and cifs.py draw into <run>/curves.png and `evaluate.py --curves` overlays
for several runs. matplotlib is optional: without it no figure is drawn. Plumbing a reader may skip."""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn as nn

from models import count_parameters
from run_support import REACHED, RunStopped, all_reduce_sum, flag, format_seconds

LOSS_NAMES = ("loss", "cls", "sep", "rec", "probe")  # what metrics.jsonl may hold as losses (FSR: sep, rec; CIFS: probe)


class EpochProgress:
    """One training epoch's running figures: loss sums and correct predictions kept on the device (no sync
    per step), a progress line with the epoch's and the run's ETA after 5 s, then every --log-interval
    seconds, and the epoch's metrics, summed over the processes of a torchrun run (global-batch figures). The first
    step with a non-finite loss is kept on the device too, and checked at each progress line and at the epoch's
    end, before anything is saved (no sync per step: the stop lags by at most one progress interval)."""

    def __init__(self, args, epoch: int, steps: int, world_size: int, log):
        self.args, self.epoch, self.steps, self.world_size, self.log = args, epoch, steps, world_size, log
        self.started = time.time()
        self.next_print = self.started + min(5.0, args.log_interval)
        self.sums, self.correct, self.seen, self.done, self.first_bad = {}, 0, 0, 0, 0
        REACHED.update(epoch=epoch + 1, step=0)

    def update(self, losses: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach() * len(y)
        self.correct, self.seen, self.done = self.correct + (logits.argmax(1) == y).sum(), self.seen + len(y), self.done + 1
        self.first_bad = torch.where((self.first_bad > 0) | torch.isfinite(losses["loss"].detach()), self.first_bad, self.done)
        REACHED["step"] = self.done
        now = time.time()
        if now >= self.next_print and self.done < self.steps:
            self.stop_if_non_finite(float(self.sums["loss"]))
            self.next_print = now + self.args.log_interval
            per_step = (now - self.started) / self.done
            epoch_left = per_step * (self.steps - self.done)
            run_left = epoch_left + (self.args.epochs - self.epoch - 1) * per_step * self.steps
            self.log(f"  epoch {self.epoch + 1}/{self.args.epochs} step {self.done}/{self.steps} | loss "
                     f"{float(self.sums['loss']) / self.seen:.4f} | {self.world_size * self.seen / (now - self.started):.0f}"
                     f" img/s | epoch ETA {format_seconds(epoch_left)} | run ETA {format_seconds(run_left)}")

    def metrics(self, lr: float) -> dict:
        totals = all_reduce_sum(torch.stack([*(self.sums[name].float() for name in self.sums), self.correct.float(),
                                             torch.tensor(float(self.seen), device=self.correct.device)])).tolist()
        seconds, seen = time.time() - self.started, totals[-1]  # .tolist() waited for the device
        self.stop_if_non_finite(totals[0])  # the loss sum of every process
        return {"epoch": self.epoch + 1, "lr": lr, **{name: total / seen for name, total in zip(self.sums, totals)},
                "train_accuracy": totals[-2] / seen, "images_per_second": seen / seconds, "epoch_seconds": seconds}

    def stop_if_non_finite(self, loss_sum: float) -> None:
        """A non-finite loss ends the run before its state is saved: last.pt keeps the previous epoch."""
        if math.isfinite(loss_sum) and not int(self.first_bad):
            return
        defaults = type(self.args)()
        suspects = [f"{flag(name)} {value:g}" for name, value in vars(self.args).items() if isinstance(value, float)
                    and name != "log_interval" and (name in ("lr", "weight_decay") or value != getattr(defaults, name))]
        raise RunStopped(f"the training loss became non-finite at epoch {self.epoch + 1}, step "
                         f"{int(self.first_bad) or '?'} (check {', '.join(suspects)}{', --amp' if self.args.amp else ''}"
                         f" of this run): " + (f"last.pt keeps epoch {self.epoch}" if self.epoch else "no epoch was saved"))


def epoch_summary(metrics: dict, args, history: list, train_accuracy_note: str) -> str:
    """The console line of an epoch: losses, accuracies (each labelled for what it measures), ETA."""
    seconds = [m["epoch_seconds"] for m in history]
    eta = (args.epochs - metrics["epoch"]) * sum(seconds) / len(seconds)
    losses = " ".join(f"{name} {metrics[name]:.4f}" for name in metrics if name in LOSS_NAMES)
    held_out = "".join(f" | {label} clean {metrics[f'{name}_clean']:.2%} pgd{args.eval_steps} (step eps/10) "
                       f"{metrics[f'{name}_robust']:.2%}"
                       for name, label in (("val", "held-out"), ("monitor", "test (monitoring only)"))
                       if f"{name}_robust" in metrics)
    return (f"epoch {metrics['epoch']}/{args.epochs} | lr {metrics['lr']:.4g} | {losses} | "
            f"train acc {metrics['train_accuracy']:.2%} ({train_accuracy_note}){held_out} | "
            f"{metrics['images_per_second']:.0f} img/s | {metrics['epoch_seconds']:.1f} s | ETA {format_seconds(eta)}")


def run_banner(method: str, args, model: nn.Module, device, data: str, run_dir: str, world_size: int) -> str:
    """The first line of a run: what is trained on what, where, how."""
    precision = "bf16 autocast" if args.amp else "fp32" if device.type != "cuda" else \
        "strict fp32" if args.strict_fp32 else "fp32 (TF32 convolutions allowed)"  # see set_tf32
    return (f"{method}: {args.model} on {args.dataset} ({data}), strategy {args.strategy}, "
            f"{count_parameters(model) / 1e6:.2f} M params, device {device}, {precision}, run {run_dir}"
            + (f", {world_size} processes x {args.batch_size // world_size} images"
               f"{' (SyncBatchNorm)' if args.sync_bn else ''}" if world_size > 1 else ""))


# ---- training curves -------------------------------------------------------------------------


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
