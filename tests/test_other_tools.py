"""Our models in other tools (docs/other-tools.md): the README's snippets run as written from a folder outside the
repository; torchattacks' FGSM and PGD equal attacks.fgsm / attacks.pgd on a trained FSR and a trained CIFS model;
a direct pyautoattack call on load_model equals evaluate.py's AutoAttack column, verdict for verdict; the
weights-only export loads in load_model, a plain load_state_dict and RobustBench's loader; --robustbench-json
writes RobustBench's model_info or refuses in one line; accuracies are ratios of integer counts; the end-of-epoch
evaluation shows a progress line. torchattacks is a test-only dependency (.ci/run installs it).

    python -m pytest -p no:cacheprovider tests/test_other_tools.py -k torchattacks -s   # prints the agreement
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attacks
import cifs
import evaluate
import fsr
from data import DeviceLoader, load_dataset
from run_support import clean_and_robust_accuracy
from test_dataset_formats import no_md5, write_cifar10  # noqa: F401 (no_md5 is a fixture)

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *a: None)
EPS = 8 / 255
N_AGREEMENT = 500  # synthetic test images of the torchattacks comparison
MODULES = {"fsr": fsr, "cifs": cifs}


def train(module, runs, name, **settings):
    args = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=800, device="cpu", strategy="natural",
                batch_size=32, epochs=4, val_size=100, monitor_size=0, eval_steps=1, log_interval=1e9,
                runs_dir=str(runs), attack_steps=2, run_name=name)
    module.train(module.Args(**{**args, **settings}), **QUIET)
    return str(Path(runs) / name / "last.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{"fsr", "cifs"}: checkpoints of both scripts, trained until they classify (about 20 % and 70 % clean)."""
    runs = tmp_path_factory.mktemp("other_tools")
    return {"fsr": train(fsr, runs, "fsr"),
            "cifs": train(cifs, runs, "cifs", epochs=8, softmax_scale=2.0, positions="conv2,conv3",
                          probes="mlp,linear")}


def test_share_is_a_ratio_of_integer_counts():
    assert evaluate.share(torch.tensor([True, True] + [False] * 18)) == 0.1  # float32's mean: 0.10000000149011612
    assert evaluate.share(torch.tensor([1, 0, 1])) == 2 / 3


# --------------------------------------------------------------------------------------------
# The README's block, as written, from outside the repository
# --------------------------------------------------------------------------------------------


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Our models in other tools"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippets_run_as_written_outside_the_repository(tmp_path):
    pytest.importorskip("torchattacks")
    snippet = readme_snippet()
    checkpoint = re.search(r'load_model\("([^"]+)"', snippet).group(1)
    run_name = Path(checkpoint).parent.name
    # The checkpoint the snippet names, at its place under the folder it runs in (fewer images than its command).
    fsr.train(fsr.Args(dataset="synthetic", device="cpu", strategy="natural", epochs=1, synthetic_size=200,
                       val_size=0, monitor_size=0, log_interval=1e9, runs_dir=str(tmp_path / "runs"),
                       run_name=run_name), **QUIET)
    checks = ("\nassert x_adv.shape == x.shape and (x_adv - x).abs().max() <= eps + 1e-6\n"
              "assert (x_fgsm - x).abs().max() <= eps + 1e-6 and (x_pgd20 - x).abs().max() <= eps + 1e-6\n"
              "print('snippet ran on', device)\n")
    (tmp_path / "snippet.py").write_text(snippet + checks)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "snippet ran on cpu" in done.stdout


# --------------------------------------------------------------------------------------------
# torchattacks against attacks.py
# --------------------------------------------------------------------------------------------


def differences(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """(images that differ at all, images that differ by more than 1e-6 (a sign flipped), the largest difference
    of the others)."""
    per_image = (a - b).flatten(1).abs().amax(1)
    small = per_image[per_image <= 1e-6]
    return int((per_image > 0).sum()), int((per_image > 1e-6).sum()), float(small.max()) if len(small) else 0.0


def batch_mean(output, y):
    """Our per-example CE divided by the batch size: the gradient of torchattacks' batch-mean loss."""
    return attacks.cross_entropy_loss(output, y) / len(y)


@pytest.mark.parametrize("name", ["fsr", "cifs"])
def test_torchattacks_fgsm_and_pgd_equal_ours(trained, name):
    torchattacks = pytest.importorskip("torchattacks")
    model = evaluate.load_model(trained[name])
    test = load_dataset("synthetic", train=False, synthetic_shape=(3, 16, 16))
    x, y = test.images[:N_AGREEMENT].float() / 255, test.labels[:N_AGREEMENT]
    found = {}
    # FGSM: bit for bit (the loss's scale does not change the sign of a one-step gradient here).
    assert torch.equal(torchattacks.FGSM(model, eps=EPS)(x, y), attacks.fgsm(model, x, y, EPS))
    # torchattacks' defaults (uniform start, 10 steps of 2/255), the same seed.
    for seed in (0, 1):
        torch.manual_seed(seed)
        theirs = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10)(x, y)
        for loss, tag in ((batch_mean, "loss/N"), (attacks.cross_entropy_loss, "sum")):
            torch.manual_seed(seed)
            ours = attacks.pgd(model, x, y, EPS, 2 / 255, 10, loss_fn=loss, random_start_kind="uniform")
            found[f"uniform seed {seed}, {tag}"] = differences(theirs, ours)
    # Our PGD-20 column: from x, 20 steps of eps/10.
    theirs = torchattacks.PGD(model, eps=EPS, alpha=EPS / 10, steps=20, random_start=False)(x, y)
    for loss, tag in ((batch_mean, "loss/N"), (attacks.cross_entropy_loss, "sum")):
        ours = attacks.pgd(model, x, y, EPS, EPS / 10, 20, loss_fn=loss, random_start_kind=None)
        found[f"PGD-20 from x, {tag}"] = differences(theirs, ours)
    print(f"\n{name}, {len(y)} images: (images differing, of which by > 1e-6, largest other difference)")
    for key, value in found.items():
        print(f"  {key}: {value}")
    for key, (_, flipped, largest) in found.items():
        assert largest <= 4e-9, key  # at most one float32 ulp near 0.03-0.06, from the projection's arithmetic
        assert flipped == 0 if "loss/N" in key else flipped <= len(y) // 100, key
    assert found["uniform seed 0, loss/N"][0] == found["uniform seed 1, loss/N"][0] == 0  # bit for bit


@pytest.mark.parametrize("name", ["fsr", "cifs"])
def test_pyautoattack_on_load_model_equals_evaluate_py_column(trained, name, tmp_path):
    from pyautoattack import AutoAttack
    result = evaluate.main([trained[name], "--device", "cpu", "--log-interval", "1e9", "--out", str(tmp_path),
                            "--attacks", "natural,autoattack", "--n-examples", "20"])[0]
    network, run_args, _ = evaluate.load_network(trained[name], torch.device("cpu"))
    x_all, y_all = evaluate.load_split(run_args, "data", train=False)
    x, y = x_all[result["indices"]], y_all[result["indices"]]
    adversary = AutoAttack(evaluate.load_model(trained[name]), norm="Linf", eps=EPS, version="standard",
                           device="cpu", seed=0)
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=500)
    verdicts = (y_adv == y).int().tolist()
    assert verdicts == result["per_example"]["autoattack"]
    assert 0 < sum(verdicts) < sum(result["per_example"]["natural"])  # it attacked, and some points held
    with open(tmp_path / f"{evaluate.result_name(trained[name])}.json") as file:
        written = json.load(file)["accuracy"]
    assert written["autoattack"] == sum(verdicts) / 20  # an exact ratio: 0.1, not 0.10000000149011612


# --------------------------------------------------------------------------------------------
# The weights-only export and RobustBench's model_info
# --------------------------------------------------------------------------------------------


def robustbench_state_dict(checkpoint: dict) -> dict:
    """What robustbench 1.1.1's utils.load_model passes to load_state_dict: checkpoint['state_dict'] with the
    first len('module.') and then len('model.') characters cut from every key that contains them."""
    state = checkpoint["state_dict"]
    for substring in ("module.", "model."):
        state = {key[len(substring):] if substring in key else key: value for key, value in state.items()}
    return state


@pytest.mark.parametrize("name", ["fsr", "cifs"])
def test_weights_only_export_loads_in_ours_a_plain_loader_and_robustbench(trained, name, tmp_path):
    path = str(tmp_path / "export.pt")
    assert evaluate.main([trained[name], "--export-weights", path]) == []
    x = torch.rand(6, 3, 16, 16)
    expected = evaluate.load_model(trained[name])(x)
    assert torch.equal(evaluate.load_model(path)(x), expected)  # ours
    export = torch.load(path)  # weights_only: tensors and plain values only
    assert set(export) == {"method", "settings", "origin", "state_dict"} and export["method"] == name
    module = MODULES[export["method"]]
    network = module.build_network(module.Args(**export["settings"]))
    network.load_state_dict(export["state_dict"])  # a plain loader (strict)
    assert torch.equal(network.eval()(x)[0], expected)
    # RobustBench's: its model zoo builds a module whose forward returns logits, with the network's own keys.
    zoo = module.build_network(module.Args(**export["settings"]))
    zoo.forward = lambda images, forward=zoo.forward: forward(images)[0]  # docs/other-tools.md
    zoo.load_state_dict(robustbench_state_dict(torch.load(path)), strict=True)
    assert torch.equal(zoo.eval()(x), expected)


def test_robustbench_json_of_a_qualifying_run_and_the_refusal(tmp_path, no_md5):  # noqa: F811
    write_cifar10(tmp_path / "data", per_batch=8, n_test=10)  # the full test set: 10 images
    checkpoint = train(fsr, tmp_path / "runs", "fsr_cifar10", dataset="cifar10", synthetic_shape=None,
                       synthetic_size=None, model="smallcnn", data_root=str(tmp_path / "data"), epochs=1,
                       val_size=0, batch_size=8)
    common = [checkpoint, "--device", "cpu", "--log-interval", "1e9", "--data-root", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as refused:
        evaluate.main([*common, "--out", str(tmp_path / "no"), "--attacks", "natural,pgd20", "--n-examples", "5",
                       "--robustbench-json", "Ours"])
    message = str(refused.value)
    assert "\n" not in message and "standard AutoAttack" in message and "the full test set" in message
    assert "natural column" not in message and "eps" not in message.split("lacks")[1]
    assert not (tmp_path / "no").exists()  # refused before any work
    result = evaluate.main([*common, "--out", str(tmp_path / "eval"), "--attacks", "natural,autoattack",
                            "--robustbench-json", "Ours"])[0]
    with open(tmp_path / "eval" / "Ours.json") as file:
        info = json.load(file)
    assert set(info) == {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                         "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}
    assert info["venue"] == "CVPR 2023" and info["link"] == "https://arxiv.org/abs/2303.13846"
    assert info["dataset"] == "cifar10" and info["eps"] == "8/255" and info["architecture"] == "SmallCNN + FSR"
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert info["clean_acc"] == f"{100 * sum(result['per_example']['natural']) / 10:.2f}"
    assert info["autoattack_acc"] == f"{100 * sum(result['per_example']['autoattack']) / 10:.2f}"
    assert all(re.fullmatch(r"\d+\.\d\d", info[key]) for key in ("clean_acc", "reported", "autoattack_acc"))
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(evaluate.load_model(str(tmp_path / "eval" / "Ours.pt"))(x), evaluate.load_model(checkpoint)(x))


# --------------------------------------------------------------------------------------------
# The end-of-epoch evaluation shows a progress line
# --------------------------------------------------------------------------------------------


def test_monitoring_evaluation_prints_progress_with_eta(trained):
    network, run_args, _ = evaluate.load_network(trained["fsr"], torch.device("cpu"))
    run_args.log_interval = 0.0  # a line after every batch but the last
    split = load_dataset("synthetic", train=False, synthetic_shape=(3, 16, 16))
    loader = DeviceLoader(split, 40, shuffle=False)
    lines = []
    quiet = clean_and_robust_accuracy(network, loader, run_args)
    assert clean_and_robust_accuracy(network, loader, run_args, lines.append, "monitor") == quiet
    assert len(lines) == len(loader) - 1
    assert lines[0].startswith(f"  test (monitoring only): clean and PGD-{run_args.eval_steps} accuracy, batch 1/"
                               f"{len(loader)} |") and "ETA" in lines[0]
