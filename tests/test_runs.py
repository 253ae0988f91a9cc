"""The training loop shared by fsr.py and cifs.py, as a user meets it: settings refused before any
work, nothing lost to a kill at any moment, one run per folder, resume with changed flags, a
quick run on part of a dataset, what the run folder records, progress lines and curves.

CPU only: smallcnn on 3x16x16 synthetic images, runs of a second or two.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cifs
import evaluate
import fsr
import data
import progress
import run_support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_WORKER = os.path.join(ROOT, "tests", "kill_worker.py")
METHODS = {"fsr": fsr, "cifs": cifs}
TINY = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=200, batch_size=50, epochs=2,
            strategy="at", attack_steps=1, eval_every=1, eval_steps=1, monitor_size=20, device="cpu",
            log_interval=1e9)


def tiny(module, tmp_path, **overrides):
    return module.Args(**{**TINY, "runs_dir": str(tmp_path), "run_name": "run", **overrides})


def snapshot(folder) -> dict:
    """Every file below `folder` with its bytes: what a refused command must leave unchanged."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                found[os.path.relpath(path, folder)] = file.read()
    return found


# --------------------------------------------------------------------------------------------
# Refused before any work: one line that names the flag, nothing on disk
# --------------------------------------------------------------------------------------------

BASE = ["--dataset", "synthetic", "--synthetic-shape", "3,16,16", "--synthetic-size", "100", "--device", "cpu",
        "--epochs", "1"]
# (flags, the text the one-line message must contain: the flag it names)
BAD_TRAINING = [
    (["--attack-steps", "0"], "--attack-steps"),
    (["--attack-step-size", "0"], "--attack-step-size"),
    (["--attack-step-size", "-0.01"], "--attack-step-size"),
    (["--eval-steps", "0"], "--eval-steps"),
    (["--strategy", "trades", "--no-random-start"], "--no-random-start"),
    (["--strategy", "mart", "--no-random-start"], "--no-random-start"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--trades-beta", "-1"], "--trades-beta"),
    (["--mart-beta", "-6"], "--mart-beta"),
    (["--weight-decay", "-5e-4"], "--weight-decay"),
    (["--milestones", "75;90"], "--milestones"),
    (["--milestones", "90,75"], "--milestones"),
    (["--milestones", "0"], "--milestones"),
    (["--synthetic-shape", "3,16"], "--synthetic-shape"),
    (["--synthetic-shape", "3,a,16"], "--synthetic-shape"),
    (["--positions", "conv9"], "--positions"),
    (["--positions", "conv3,,conv2"], "--positions"),
    (["--val-size", "100"], "--val-size"),
    (["--val-size", "-1"], "--val-size"),
    (["--train-size", "1000"], "--train-size"),
    (["--device", "cuda"], "--device"),
    (["--device", "gpu"], "--device"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--epsilon", "8"], "--epsilon"),
    (["--epochs", "ten"], "--epochs"),
    (["--strategy", "pgd"], "--strategy"),
    (["--monitor-size", "-5"], "--monitor-size"),
    (["--init-from", "nowhere.pt"], "--init-from"),
    (["--resume", "nowhere.pt", "--init-from", "nowhere.pt"], "--resume"),
    (["--sync-bn"], "--sync-bn"),  # torch's nn.SyncBatchNorm needs CUDA
    # Issue #27: non-finite floats (inf passed every range test and trained to NaN), seeds, run names as paths,
    # settings the data cannot satisfy, a folder given as a checkpoint.
    *[([name, value], f"{name} {value} must be a finite number") for name, value in (
        ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"), ("--attack-step-size", "inf"),
        ("--fat-omega", "inf"), ("--momentum", "inf"), ("--epsilon", "nan"), ("--trades-beta", "inf"),
        ("--log-interval", "inf"))],
    (["--seed", "-1"], "--seed -1 must be in [0, 2**32)"),
    (["--run-name", "../../x"], "--run-name ../../x must be a plain folder name"),
    (["--run-name", "/tmp/x"], "--run-name /tmp/x must be a plain folder name"),
    (["--run-name", ".."], "--run-name"),
    (["--monitor-size", "1000000"], "--monitor-size 1000000 is above the 1000 test images"),
    (["--train-size", "10", "--val-size", "5"], "--val-size 5 leaves 5 training images"),
    (["--resume", "."], "--resume '.' is a folder, not a checkpoint"),
    (["--init-from", "."], "--init-from '.' is a folder, not a checkpoint"),
]
BAD_FSR = [(["--tau", "0"], "--tau"), (["--lambda-sep", "-1"], "--lambda-sep"),
           (["--no-fsr", "--positions", "conv3"], "--positions"),
           (["--lambda-sep", "inf"], "--lambda-sep inf must be a finite number"), (["--tau", "inf"], "--tau inf"),
           (["--hidden", "1000000000000"], "out of memory")]  # died in the allocator with a traceback
BAD_CIFS = [(["--probes", "mlp,linear,linear"], "--probes"), (["--probes", "mlp,conv"], "--probes"),
            (["--top-k", "11"], "--top-k"), (["--beta", "-2"], "--beta"), (["--softmax-scale", "0"], "--softmax-scale"),
            (["--softmax-scale", "inf"], "--softmax-scale inf must be a finite number"), (["--beta", "nan"], "--beta nan"),
            (["--probes", "mlp", "--hidden", "1000000000000"], "out of memory")]  # smallcnn's default probe is linear
CASES = [("fsr", *case) for case in BAD_TRAINING + BAD_FSR] + [("cifs", *case) for case in BAD_TRAINING + BAD_CIFS]


@pytest.mark.parametrize("method, flags, names", CASES, ids=[f"{m}:{' '.join(f)}" for m, f, _ in CASES])
def test_bad_setting_is_refused_in_one_line_before_any_work(tmp_path, capsys, method, flags, names):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "keep.txt").write_text("an earlier result")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        METHODS[method].main([*BASE, *flags, "--runs-dir", str(runs), "--data-root", str(tmp_path / "data")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert names in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # nothing created or changed


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    runs = tmp_path_factory.mktemp("eval_input")
    fsr.train(fsr.Args(**{**TINY, "runs_dir": str(runs), "run_name": "run", "epochs": 1, "strategy": "natural",
                          "monitor_size": 0}), log=lambda *_: None)
    return str(runs / "run" / "last.pt")


BAD_EVALUATION = [
    (["--n-examples", "0"], "--n-examples"),
    (["--n-examples", "5000"], "--n-examples"),  # the synthetic test split has 1,000 images
    (["--restarts", "0"], "--restarts"),
    (["--batch-size", "0"], "--batch-size"),
    (["--cw-steps", "0"], "--cw-steps"),
    (["--aa-version", "strongest"], "--aa-version"),
    (["--attacks", ""], "--attacks"),
    (["--attacks", "natural,pgd7"], "--attacks"),
    (["--epsilon", "8"], "--epsilon"),
    (["--official", "trades"], "--official"),
    (["--ti-kernel", "4"], "--ti-kernel"),
    (["--nattack-queries", "0"], "--nattack-queries"),
    (["--knn-train-examples", "0"], "--knn-train-examples"),
    (["--transfer-source", "nowhere.pt"], "nowhere.pt"),
    (["EXTRA:nowhere.pt"], "nowhere.pt"),  # a second checkpoint that does not exist
    (["EXTRA:args.json"], "args.json"),  # a second path that is not a checkpoint
    # Issue #27
    (["--kappa", "nan"], "--kappa nan must be a finite number"), (["--di-prob", "inf"], "--di-prob inf must be"),
    (["--epsilon", "inf"], "--epsilon inf must be"), (["--seed", "-1"], "--seed -1"),
    (["--attacks", "natural, pgd20"], "no spaces around the commas (--attacks natural,pgd20)"),
    (["EXTRA:."], "is a folder, not a checkpoint: give "),  # the run folder given as a checkpoint
]


@pytest.mark.parametrize("flags, names", BAD_EVALUATION, ids=[" ".join(f) for f, _ in BAD_EVALUATION])
def test_bad_evaluation_setting_is_refused_in_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys,
                                                                     flags, names):
    run = os.path.dirname(tiny_checkpoint)
    extra = [os.path.join(run, flag[6:]) for flag in flags if flag.startswith("EXTRA:")]
    flags = [flag for flag in flags if not flag.startswith("EXTRA:")]
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([tiny_checkpoint, *extra, *flags, "--device", "cpu", "--out", str(tmp_path / "eval")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and names in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(run) == before and not (tmp_path / "eval").exists()


def test_bad_setting_exits_with_status_1_and_one_line_on_stderr(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "fsr.py"), *BASE, "--lr", "0",
                           "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)  # a guard against hangs only
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: --lr 0.0"), done.stderr
    assert os.listdir(tmp_path) == []


def test_unwritable_runs_folder_is_refused_before_the_first_epoch(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="--runs-dir"):
        fsr.train(tiny(fsr, blocker / "runs"), log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["file"]


# --------------------------------------------------------------------------------------------
# Nothing lost: a kill at any moment, then --resume
# --------------------------------------------------------------------------------------------

def kill_flags(runs, name):
    return ["--dataset", "synthetic", "--synthetic-shape", "3,16,16", "--synthetic-size", "120", "--batch-size", "40",
            "--epochs", "3", "--strategy", "at", "--attack-steps", "1", "--eval-every", "2", "--eval-steps", "1",
            "--monitor-size", "20", "--device", "cpu", "--runs-dir", str(runs), "--run-name", name]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = tmp_path_factory.mktemp("kill")
    fsr.train(run_support.parse_args(fsr.Args, kill_flags(runs, "whole")), log=lambda *_: None)
    return runs


@pytest.mark.parametrize("when", ["during-save", "after-save"])
def test_sigkill_then_resume_loses_nothing(uninterrupted, when):
    runs = uninterrupted
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, KILL_WORKER, "fsr", when, "2", "--", *kill_flags(runs, when)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    run = runs / when
    killed = run_support.load_checkpoint(str(run / "last.pt"), "fsr")
    assert killed["epoch"] == (1 if when == "during-save" else 2)
    if when == "during-save":
        assert any(".tmp" in name for name in os.listdir(run))  # the half-written file is still there
    else:  # the checkpoint of epoch 2 is saved, its metrics line not yet written
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    lines = []
    fsr.train(run_support.parse_args(fsr.Args, ["--resume", str(run / "last.pt"), "--device", "cpu"]), log=lines.append)
    assert not any(".tmp" in name for name in os.listdir(run))
    assert (when == "during-save") == any("interrupted save" in line for line in lines)
    final, whole = run_support.load_checkpoint(str(run / "last.pt"), "fsr"), run_support.load_checkpoint(str(runs / "whole" / "last.pt"), "fsr")
    assert final["epoch"] == 3
    for key, value in whole["model"].items():
        assert torch.equal(value, final["model"][key]), key
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    reference = [json.loads(line) for line in (runs / "whole" / "metrics.jsonl").read_text().splitlines()]
    timing = ("images_per_second", "epoch_seconds")
    assert [{k: v for k, v in m.items() if k not in timing} for m in metrics] == \
        [{k: v for k, v in m.items() if k not in timing} for m in reference]


# --------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------

def test_a_live_run_holds_its_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(f"{__import__('socket').gethostname()} {os.getpid()}")  # this process: alive
    with pytest.raises(FileExistsError, match=f"in use by process {os.getpid()}"):
        fsr.train(tiny(fsr, tmp_path), log=lambda *_: None)
    assert sorted(os.listdir(run)) == ["run.lock"]


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(f"{__import__('socket').gethostname()} {dead.pid}")
    lines = []
    fsr.train(tiny(fsr, tmp_path, epochs=1), log=lines.append)
    assert any(f"lock of process {dead.pid}" in line for line in lines)
    assert "run.lock" not in os.listdir(run) and "last.pt" in os.listdir(run)  # released at the end


# --------------------------------------------------------------------------------------------
# --resume with other flags
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    runs = tmp_path_factory.mktemp("resume")
    cifs.train(tiny(cifs, runs, epochs=1), log=lambda *_: None)
    return runs / "run" / "last.pt"


def test_resume_refuses_a_changed_recipe_naming_the_flag(finished):
    before = snapshot(finished.parent)
    for flags, name in ((["--lr", "0.5"], "--lr"), (["--beta", "1"], "--beta"), (["--run-name", "x"], "--run-name"),
                        (["--epochs", "2", "--amp"], "--amp")):
        with pytest.raises(SystemExit) as exit_info:
            cifs.main(["--resume", str(finished), "--device", "cpu", *flags])
        assert name in str(exit_info.value.code) and str(exit_info.value.code).startswith("error:")
    assert snapshot(finished.parent) == before


def test_finished_run_says_so(finished):
    lines = []
    cifs.train(cifs.Args(resume=str(finished), device="cpu"), log=lines.append)
    assert len(lines) == 1 and "already run all 1 epochs" in lines[0]


def test_resume_extends_a_run_and_announces_it(finished, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("last.pt", "args.json", "metrics.jsonl"):
        (copy / name).write_bytes((finished.parent / name).read_bytes())
    lines = []
    metrics = cifs.train(cifs.Args(resume=str(copy / "last.pt"), device="cpu", epochs=2, log_interval=1e8),
                         log=lines.append)
    assert metrics["epoch"] == 2
    assert any(line.startswith("resume: --epochs 1 -> 2") for line in lines)
    assert any(line.startswith("resume: --log-interval") for line in lines)
    assert json.loads((copy / "args.json").read_text())["epochs"] == 2
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------------------------
# What a run records and shows
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fsr", "cifs"])
def test_args_json_records_the_settings_actually_used(tmp_path, method):
    module = METHODS[method]
    module.train(tiny(module, tmp_path, epochs=1), log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    resolved_fields = ["model", "epochs", "lr", "weight_decay", "milestones", "augment", "epsilon", "attack_steps",
                       "attack_step_size", "random_start", "positions"]
    resolved_fields += ["probes", "softmax_scale", "hidden"] if method == "cifs" else []
    assert all(saved[name] is not None for name in resolved_fields), saved
    assert saved["positions"] == "conv3" and saved["random_start"] is True  # smallcnn: both methods on conv3


def test_train_size_is_a_seeded_class_balanced_subset(tmp_path):
    lines = []
    fsr.train(tiny(fsr, tmp_path, epochs=1, synthetic_size=400, train_size=60), log=lines.append)
    assert any("60 training images" in line for line in lines)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["train_size"] == 60
    labels = data.load_dataset("synthetic", synthetic_shape=(3, 16, 16), synthetic_size=400).labels
    chosen = data.balanced_subset(labels, 60, 10, seed=0)
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [6] * 10
    assert torch.equal(chosen, data.balanced_subset(labels, 60, 10, seed=0))
    assert not torch.equal(chosen, data.balanced_subset(labels, 60, 10, seed=1))


def test_monitoring_is_on_the_test_set_and_never_picks_a_checkpoint(tmp_path):
    lines = []
    metrics = fsr.train(tiny(fsr, tmp_path), log=lambda line: lines.append(line))
    assert "val_robust" not in metrics and 0 <= metrics["monitor_robust"] <= metrics["monitor_clean"]
    assert not (tmp_path / "run" / "best.pt").exists()  # no held-out split: nothing to choose with
    assert any("test (monitoring only) clean" in line and "pgd1 (step eps/10)" in line for line in lines)
    with_val = fsr.train(tiny(fsr, tmp_path, run_name="val", val_size=40, synthetic_size=240), log=lambda *_: None)
    assert "val_robust" in with_val and (tmp_path / "val" / "best.pt").exists()


def test_progress_lines_show_the_epoch_and_run_eta(tmp_path):
    lines = []
    cifs.train(tiny(cifs, tmp_path, log_interval=0.0), log=lines.append)
    progress = [line for line in lines if line.startswith("  epoch 1/2 step")]
    assert progress and all("epoch ETA" in line and "run ETA" in line for line in progress)
    summary = [line for line in lines if line.startswith("epoch 1/2 |")][0]
    assert "true label" in summary  # CIFS training accuracy says what its masks used


def test_curves_png_holds_the_metrics_file(tmp_path):
    pytest.importorskip("matplotlib")
    fsr.train(tiny(fsr, tmp_path), log=lambda *_: None)
    run = tmp_path / "run"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = progress.training_curves_figure([str(run), str(run)])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses, accuracy, held_out = figure.axes
    plotted = {line.get_label(): list(line.get_ydata()) for line in losses.lines}
    assert plotted["run: loss"] == [m["loss"] for m in metrics] and plotted["run: rec"] == [m["rec"] for m in metrics]
    assert list(accuracy.lines[0].get_ydata()) == [100 * m["train_accuracy"] for m in metrics]
    robust = [line for line in held_out.lines if line.get_label() == "run: monitor robust"][0]
    assert list(robust.get_ydata()) == [100 * m["monitor_robust"] for m in metrics]
    assert len(accuracy.lines) == 2  # two runs overlaid


def test_resuming_a_checkpoint_of_another_version_names_the_settings(finished, tmp_path):
    checkpoint = torch.load(finished, map_location="cpu", weights_only=True)
    checkpoint["args"]["warp_drive"] = 9
    del checkpoint["args"]["monitor_size"]
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu"])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "warp_drive" in message and "monitor_size" in message
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


# --------------------------------------------------------------------------------------------
# Issue #27: nothing silently wrong (NaN runs, full disks, signals, unreadable checkpoints, log files)
# --------------------------------------------------------------------------------------------

def one_line_exit(exit_info, capsys) -> str:
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = fsr.objective, []

    def turns_nan(*args, **kwargs):  # epoch 2, step 2 (4 steps per epoch)
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 6 else loss), parts

    monkeypatch.setattr(fsr, "objective", turns_nan)
    with pytest.raises(SystemExit) as exit_info:
        fsr.main([*BASE, "--synthetic-size", "200", "--batch-size", "50", "--epochs", "3", "--attack-steps", "1",
                  "--monitor-size", "0", "--runs-dir", str(tmp_path), "--run-name", "run"])
    message = one_line_exit(exit_info, capsys)
    assert "the training loss became non-finite at epoch 2, step 2 (check --lr 0.05" in message, message
    assert message.endswith("of this run): last.pt keeps epoch 1"), message
    checkpoint = run_support.load_checkpoint(str(tmp_path / "run" / "last.pt"), "fsr")
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values()
                                            if v.is_floating_point())
    assert sorted(os.listdir(tmp_path / "run")) == ["args.json", "last.pt", "metrics.jsonl"]  # no lock, no NaN state


def test_a_huge_learning_rate_stops_at_the_first_epoch_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifs.main([*BASE, "--lr", "1e30", "--batch-size", "20", "--monitor-size", "0", "--runs-dir", str(tmp_path),
                   "--run-name", "run"])
    message = one_line_exit(exit_info, capsys)
    assert "non-finite at epoch 1" in message and "--lr 1e+30" in message and "no epoch was saved" in message
    assert "last.pt" not in os.listdir(tmp_path / "run") and "run.lock" not in os.listdir(tmp_path / "run")


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real, saves = torch.save, []

    def disk_full(state, path, *args, **kwargs):  # the third save: last.pt of epoch 2 (after last.pt 1, ...)
        saves.append(path)
        if len(saves) == 2:
            with open(path, "wb") as file:
                file.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(run_support.torch, "save", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        fsr.main([*BASE, "--epochs", "2", "--attack-steps", "1", "--monitor-size", "0", "--runs-dir", str(tmp_path),
                  "--run-name", "run"])
    message = one_line_exit(exit_info, capsys)
    last = tmp_path / "run" / "last.pt"
    assert message.startswith(f"error: could not write {last}: No space left on device"), message
    assert run_support.load_checkpoint(str(last), "fsr")["epoch"] == 1
    assert sorted(os.listdir(tmp_path / "run")) == ["args.json", "last.pt", "metrics.jsonl"]  # no .tmp, no lock


def test_a_real_file_size_limit_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """`ulimit -f 64` (the full disk of the issue): torch.save's RuntimeError from inline_container.cc."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    done = subprocess.run([sys.executable, os.path.join(ROOT, "fsr.py"), *BASE, "--attack-steps", "1",
                           "--monitor-size", "0", "--runs-dir", str(tmp_path), "--run-name", "run"],
                          cwd=tmp_path, capture_output=True, text=True, preexec_fn=limit, timeout=900)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: could not write {tmp_path / 'run' / 'last.pt'}: "), done.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["args.json", "metrics.jsonl"]


@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_in_one_line_and_progress_reaches_a_log_file(tmp_path, sent, status):
    """stdout redirected to a file (nohup, SLURM, > log) gets each line as it is printed: the epoch summary is
    in the file while the run lives; then the signal ends it in one line, the lock released, last.pt intact."""
    log, err = tmp_path / "log", tmp_path / "err"
    flags = kill_flags(tmp_path / "runs", "run") + ["--epochs", "100", "--synthetic-size", "400", "--log-interval", "0"]
    with open(log, "w") as out, open(err, "w") as errors:
        run = subprocess.Popen([sys.executable, os.path.join(ROOT, "fsr.py"), *flags], cwd=ROOT, stdout=out,
                               stderr=errors, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 900  # a guard against hangs only
            while "epoch 1/100 |" not in log.read_text() and run.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert run.poll() is None and "  epoch 1/100 step 1/" in log.read_text(), err.read_text()
            run.send_signal(sent)
            assert run.wait(timeout=900) == status
        finally:
            run.kill()
    message = err.read_text()
    folder = tmp_path / "runs" / "run"
    assert message.count("\n") == 1 and message.startswith("error: interrupted at epoch "), message
    assert f"continue with --resume {folder / 'last.pt'} (it keeps epoch " in message and "Traceback" not in message
    assert "run.lock" not in os.listdir(folder)
    assert run_support.load_checkpoint(str(folder / "last.pt"), "fsr")["epoch"] >= 1


class NotATensor:
    pass


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_files")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "random.pt").write_bytes(bytes(range(256)) * 40)
    torch.save({"model": NotATensor()}, folder / "objects.pt")  # loading it would run code from the file
    return folder


@pytest.mark.parametrize("kind, says", [("empty.pt", "it is empty (0 bytes"), ("random.pt", "is unreadable: not a "
                                        "complete file written by torch.save"), ("", "is a folder, not a checkpoint"),
                                        ("objects.pt", "holds Python objects besides tensors")])
@pytest.mark.parametrize("reader", ["--resume", "--init-from", "evaluate"])
def test_unreadable_checkpoints_are_one_line_in_every_reader(bad_files, tmp_path, capsys, reader, kind, says):
    """A 0-byte file ended in IndexError (a regression); random bytes got torch's advice to load with
    weights_only=False (which runs code from the file); a folder was "does not exist"."""
    path = str(bad_files / kind) if kind else str(bad_files)
    before = snapshot(bad_files)
    with pytest.raises(SystemExit) as exit_info:
        if reader == "evaluate":
            evaluate.main([path, "--device", "cpu", "--out", str(tmp_path / "eval")])
        else:
            fsr.main([*BASE, reader, path, "--runs-dir", str(tmp_path / "runs")])
    message = one_line_exit(exit_info, capsys)
    assert says in message and path in message and "weights_only" not in message, message
    assert reader == "evaluate" or reader in message
    assert snapshot(bad_files) == before and os.listdir(tmp_path) == []


def test_an_unavailable_device_is_refused_by_evaluate_as_by_the_training_scripts(tiny_checkpoint, tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit) as exit_info:  # a traceback, while the training scripts refused it
        evaluate.main([tiny_checkpoint, "--device", "cuda:7", "--out", str(tmp_path / "eval")])
    assert "--device cuda:7" in one_line_exit(exit_info, capsys) and os.listdir(tmp_path) == []


def test_a_run_folder_for_a_checkpoint_points_to_its_last_pt(finished, capsys):
    for main, flags in ((cifs.main, ["--resume"]), (evaluate.main, [])):
        with pytest.raises(SystemExit) as exit_info:
            main([*flags, str(finished.parent), "--device", "cpu"])
        assert f"is a folder, not a checkpoint: give {finished}" in one_line_exit(exit_info, capsys)


def test_resuming_best_pt_is_refused_with_the_fix(finished, tmp_path, capsys):
    """It rolled the run back to best.pt's epoch and overwrote last.pt: a run continues from its last.pt."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "args.json", "metrics.jsonl"):
        (run / name).write_bytes((finished.parent / name).read_bytes())
    (run / "best.pt").write_bytes((finished.parent / "last.pt").read_bytes())
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        cifs.main(["--resume", str(run / "best.pt"), "--device", "cpu", "--epochs", "2"])
    message = one_line_exit(exit_info, capsys)
    assert f"pass --resume {run / 'last.pt'}, or --init-from {run / 'best.pt'}" in message, message
    assert snapshot(run) == before


def test_init_from_a_checkpoint_of_the_other_method_names_the_right_script(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifs.main([*BASE, "--init-from", tiny_checkpoint, "--runs-dir", str(tmp_path)])
    message = one_line_exit(exit_info, capsys)
    assert "is a fsr checkpoint, which cifs.py cannot use: pass it to fsr.py --init-from" in message, message
    assert "resume" not in message and os.listdir(tmp_path) == []


def test_too_few_images_for_one_batch_is_said(tmp_path):
    lines = []
    fsr.train(tiny(fsr, tmp_path, epochs=1, batch_size=300, monitor_size=0), log=lines.append)
    assert "note: only 200 training images, fewer than one batch of 300: one step per epoch" in lines


def test_help_shows_every_default_and_every_resumable_setting(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    for module in (fsr, cifs):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        assert "seed of weights, data order, augmentation and attack noise (default: 0)" in text  # 0 == False hid it
        assert "(the paper trains on all images and reports the last epoch) (default: 0)" in text  # --val-size
        resume = next(line for line in text.splitlines() if line.strip().startswith("--resume"))
        assert all(run_support.flag(name) in resume for name in run_support.RESUMABLE), resume


def test_evaluating_two_runs_whose_folders_share_a_name_keeps_the_first_result(tmp_path, capsys):
    """Both write <out>/run_last.json: the second is refused, and --overwrite is not advised as the fix."""
    for where in ("a", "b"):
        fsr.train(tiny(fsr, tmp_path / where, epochs=1, strategy="natural", monitor_size=0), log=lambda *_: None)
    quick = ["--attacks", "natural", "--n-examples", "20", "--device", "cpu", "--out", str(tmp_path / "eval")]
    evaluate.main([str(tmp_path / "a" / "run" / "last.pt"), *quick])
    first = (tmp_path / "eval" / "run_last.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path / "b" / "run" / "last.pt"), *quick])
    message = one_line_exit(exit_info, capsys)
    assert "run_last.json (of " in message and "another checkpoint from a run folder of the same name: pass another " \
        "--out" in message, message
    assert (tmp_path / "eval" / "run_last.json").read_bytes() == first
