"""benchmarks/fmnist_study.py, the one-command CPU-scale study: its settings are refused before any work,
each run trained one epoch per process equals the run trained in one go, the table compares each method with
its own baseline, a second invocation continues instead of training again, and a run stopped between its
save and the study's copy of it continues without training that epoch again.

CPU only: synthetic 3x16x16 images, two models (cifs.py --no-cifs and cifs.py), two epochs of 64 images.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import fmnist_study  # noqa: E402

FLAGS = ["--dataset", "synthetic", "--models", "cifs_vanilla,cifs", "--seeds", "0", "--train-size", "64",
         "--epochs", "2", "--milestones", "1", "--batch-size", "16", "--monitor-size", "20", "--n-examples", "20",
         "--swing-examples", "0", "--jobs", "2"]


@pytest.mark.parametrize("flags, named", [
    (["--seeds", "0,0"], "--seeds"), (["--seeds", "a"], "--seeds"), (["--models", "fsr,nope"], "--models"),
    (["--epochs", "0"], "--epochs"), (["--milestones", "3,2"], "--milestones"), (["--swing-examples", "-1"],
                                                                                "--swing-examples"),
    (["--attack-step-size", "nan"], "--attack-step-size")])
def test_bad_settings_are_refused_in_one_line_before_any_work(tmp_path, capsys, flags, named):
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as stop:
        fmnist_study.main(["--out", str(out), *flags])
    assert str(stop.value).startswith("error: ") and named in str(stop.value) and "\n" not in str(stop.value)
    assert not out.exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder, before = tmp_path_factory.mktemp("study"), os.getcwd()
    os.chdir(folder)  # a relative --out, as a user types it: the scripts the study runs must agree on it
    try:
        fmnist_study.main([*FLAGS, "--out", "out"])
    finally:
        os.chdir(before)
    return folder / "out"


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_each_epoch_is_kept_and_the_chunked_run_equals_one_uninterrupted_run(study, tmp_path):
    folder = study / "runs" / "cifs_s0"
    last, second = weights(folder / "last.pt"), weights(folder / "epoch2.pt")
    assert (folder / "epoch1.pt").exists() and last.keys() == second.keys()
    assert all(torch.equal(last[k], second[k]) for k in last)
    assert not all(torch.equal(last[k], weights(folder / "epoch1.pt")[k]) for k in last)  # it trained
    # The same run in one process (the settings the study passed, from its args.json), compared bit for bit.
    command = [sys.executable, os.path.join(ROOT, "cifs.py"), "--dataset", "synthetic", "--model", "smallcnn",
               "--synthetic-shape", "3,16,16", "--synthetic-size", "64", "--train-size", "64", "--batch-size", "16",
               "--attack-steps", "5", "--attack-step-size", "0.08", "--epochs", "2", "--milestones", "1",
               "--monitor-size", "20", "--eval-every", "1", "--seed", "0", "--device", "cpu",
               "--runs-dir", str(tmp_path), "--run-name", "whole"]
    subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    whole = weights(tmp_path / "whole" / "last.pt")
    assert whole.keys() == last.keys() and all(torch.equal(whole[k], last[k]) for k in whole)


def test_the_table_compares_each_method_with_its_own_baseline(study):
    text = (study / "study.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| vanilla AT (`cifs.py --no-cifs`) |") for line in table)
    cifs_row = next(i for i, line in enumerate(table) if line.startswith("| AT + CIFS (`cifs.py`) |"))
    assert table[cifs_row + 1].startswith("| &nbsp;&nbsp;minus its baseline")
    header = table[0]
    assert "Natural" in header and "APGD-CE" in header and "PGD-100 (through mask)" in header
    # Its numbers are the evaluations': natural accuracy of the CIFS run, in %, one seed (no ± part).
    natural = json.loads((study / "eval" / "cifs_s0_last.json").read_text())["accuracy"]["natural"]
    assert table[cifs_row].split("|")[2].strip() == f"{100 * natural:.1f}"
    assert "## CIFS: the masks it uses against the masks built from the true label" in text


def test_a_second_invocation_continues_instead_of_training_again(study):
    before = {p: os.path.getmtime(p) for p in (study / "runs").rglob("*.pt")}
    logs = {p: p.read_text() for p in (study / "logs").glob("*_s0.log")}
    fmnist_study.main([*FLAGS, "--out", str(study)])
    assert {p: os.path.getmtime(p) for p in (study / "runs").rglob("*.pt")} == before
    assert {p: p.read_text() for p in logs} == logs  # no training or evaluation ran again


def test_a_study_is_continued_only_with_the_settings_it_started_with(study, capsys):
    before = sorted(str(p) for p in study.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        fmnist_study.main([*FLAGS, "--epochs", "3", "--out", str(study)])
    assert str(stop.value).startswith("error: --epochs: ") and "\n" not in str(stop.value)
    assert sorted(str(p) for p in study.rglob("*")) == before


def test_an_epoch_saved_but_not_yet_copied_is_copied_not_trained_again(tmp_path):
    """A stop between the script's save of last.pt and the study's copy to epoch<N>.pt (a Ctrl-C there)."""
    out = tmp_path / "out"
    flags = [*FLAGS, "--models", "cifs_vanilla", "--epochs", "1", "--out", str(out)]
    fmnist_study.main(flags)
    folder = out / "runs" / "cifs_vanilla_s0"
    (folder / "epoch1.pt").unlink()
    log = out / "logs" / "cifs_vanilla_s0.log"
    before = log.read_text()
    fmnist_study.main(flags)
    assert log.read_text() == before  # no cifs.py process ran
    assert (folder / "epoch1.pt").read_bytes() == (folder / "last.pt").read_bytes()
