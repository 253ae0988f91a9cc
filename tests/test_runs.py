"""The training loop shared by fsr.py and cifs.py, as a user meets it: settings refused before any
work, nothing lost to a kill at any moment, one run per folder, resume with changed flags, a
quick run on part of a dataset, what the run folder records, progress lines and curves.

CPU only: smallcnn on 3x16x16 synthetic images, runs of a second or two.
"""

import json
import os
import signal
import subprocess
import sys

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
]
BAD_FSR = [(["--tau", "0"], "--tau"), (["--lambda-sep", "-1"], "--lambda-sep"),
           (["--no-fsr", "--positions", "conv3"], "--positions")]
BAD_CIFS = [(["--probes", "mlp,linear,linear"], "--probes"), (["--probes", "mlp,conv"], "--probes"),
            (["--top-k", "11"], "--top-k"), (["--beta", "-2"], "--beta"), (["--softmax-scale", "0"], "--softmax-scale")]
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
                          timeout=120)
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
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
    assert saved["positions"] == ("conv3" if method == "fsr" else "conv2,conv3") and saved["random_start"] is True


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
