"""evaluate.py: the main table, the CIFS adaptive sweep, the differentiable-mask attack, black-box
attacks, the FSR analysis, the gradient-masking report, the CIFS channel analysis, and the CLI's
handling of bad checkpoints.

Everything runs on the CPU: tiny smallcnn checkpoints on 3x16x16 synthetic images, trained once per
session, evaluated on class-balanced subsets of 10-30 test images (the shared CPU is slow: every
attack budget here is the smallest that still makes the check meaningful).
"""

import copy
import json
import os

import pytest
import torch

import attacks
import cifs
import evaluate
import fsr
from conftest import EPS

QUIET = dict(log=lambda *a: None)
MAIN = "natural,fgsm,pgd20,pgd100,cw"


def train_args(module, tmp_dir, name, **kw):
    settings = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=800, device="cpu",
                    strategy="natural", epochs=4, val_size=100, eval_steps=1, log_interval=1e9,
                    runs_dir=str(tmp_dir), attack_steps=2, run_name=name)
    settings.update(kw)
    return module.Args(**settings)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"fsr", "cifs", "natural"}: paths of tiny checkpoints of both scripts."""
    runs = tmp_path_factory.mktemp("eval_runs")
    fsr.train(train_args(fsr, runs, "fsr", epochs=1, synthetic_size=300), **QUIET)
    fsr.train(train_args(fsr, runs, "natural", no_fsr=True), **QUIET)
    cifs.train(train_args(cifs, runs, "cifs", batch_size=32, epochs=3, synthetic_size=400), **QUIET)
    return {name: str(runs / name / "last.pt") for name in ("fsr", "cifs", "natural")}


def run_main(path, out, *flags):
    results = evaluate.main([path, "--device", "cpu", "--log-interval", "1e9", "--out", str(out), *flags])
    stem = os.path.basename(os.path.dirname(path))
    with open(os.path.join(out, stem + ".json")) as file:
        return results[0], json.load(file)


@pytest.fixture(scope="session")
def fsr_report(checkpoints, tmp_path_factory):
    """The JSON of the vanilla checkpoint under the main table and the opt-in analyses (the FSR
    analysis of a model without FSR modules runs only its k-NN part)."""
    out = tmp_path_factory.mktemp("eval_main")
    _, report = run_main(checkpoints["natural"], out, "--n-examples", "20", "--attacks", MAIN, "--cw-steps", "5",
                         "--differentiable-mask", "--fsr-analysis", "--knn-train-examples", "200",
                         "--channel-analysis", "--transfer-source", checkpoints["natural"])
    return report


LIGHT = ("--n-examples", "20", "--attacks", "natural,fgsm,pgd20", "--channel-analysis")


# --------------------------------------------------------------------------------------------
# Main table
# --------------------------------------------------------------------------------------------


def test_ensemble_is_the_and_of_its_columns(fsr_report):
    accuracy, per_example = fsr_report["accuracy"], fsr_report["per_example"]
    vectors = torch.tensor([per_example[name] for name in evaluate.ENSEMBLE_OF]).bool()
    assert torch.equal(torch.tensor(per_example["ensemble"]).bool(), vectors.all(0))
    for name in evaluate.ENSEMBLE_OF:
        assert accuracy["ensemble"] <= accuracy[name]
    assert accuracy["ensemble"] == pytest.approx(vectors.all(0).float().mean().item())


def test_same_checkpoint_twice_gives_the_same_json(checkpoints, tmp_path):
    _, once = run_main(checkpoints["natural"], tmp_path / "a", *LIGHT)
    _, again = run_main(checkpoints["natural"], tmp_path / "b", *LIGHT)
    first = {k: v for k, v in once.items() if k != "timings"}
    second = {k: v for k, v in again.items() if k != "timings"}
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_autoattack_is_not_weaker_than_pgd20(checkpoints, tmp_path):
    # eps 0.1: APGD-CE then breaks every point, so the official `standard` run ends after its first
    # attack instead of spending minutes of Square queries on the CPU (same points, same eps for both).
    result, _ = run_main(checkpoints["natural"], tmp_path, "--n-examples", "20", "--epsilon", "0.1",
                         "--attacks", "natural,pgd20,autoattack", "--aa-version", "standard")
    aa, pgd20 = torch.tensor(result["per_example"]["autoattack"]), torch.tensor(result["per_example"]["pgd20"])
    assert result["accuracy"]["autoattack"] <= result["accuracy"]["pgd20"]
    # AutoAttack starts from the clean points: what it leaves robust is at most natural-correct.
    assert (aa <= torch.tensor(result["per_example"]["natural"])).all()
    assert aa.sum() <= pgd20.sum()


def test_balanced_subset_is_balanced_seeded_sorted():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    a = evaluate.balanced_subset(labels, 105, 10, seed=3)
    assert len(a) == 105 and len(set(a.tolist())) == 105
    assert torch.equal(a, a.sort().values)
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts[:5].tolist() == [11] * 5
    assert torch.equal(a, evaluate.balanced_subset(labels, 105, 10, seed=3))
    assert not torch.equal(a, evaluate.balanced_subset(labels, 105, 10, seed=4))


def test_subset_indices_are_saved(fsr_report, checkpoints):
    run_args = fsr.Args(**fsr_report["run"])
    _, y = evaluate.load_split(run_args, "data", train=False)
    expected = evaluate.balanced_subset(y, 20, 10, seed=0)
    assert fsr_report["indices"] == expected.tolist()
    assert fsr_report["labels"] == y[expected].tolist()
    assert torch.bincount(y[expected], minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("kind", ["missing", "foreign", "truncated"])
def test_bad_checkpoints_give_a_clear_error(checkpoints, tmp_path, kind):
    path = str(tmp_path / "bad.pt")
    if kind == "foreign":
        state = torch.load(checkpoints["fsr"], map_location="cpu", weights_only=True)
        state["method"] = "something-else"
        torch.save(state, path)
    elif kind == "truncated":
        with open(checkpoints["fsr"], "rb") as file:
            data = file.read()
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
    with pytest.raises(SystemExit) as raised:
        evaluate.main([path, "--device", "cpu", "--out", str(tmp_path)])
    message = str(raised.value.code)
    assert message.startswith("error:")
    assert {"missing": "does not exist", "foreign": "not a checkpoint written by",
            "truncated": "unreadable"}[kind] in message


# --------------------------------------------------------------------------------------------
# CIFS adaptive attacks and the differentiable mask
# --------------------------------------------------------------------------------------------


def test_adaptive_sweep_takes_the_minimum_and_the_per_example_and(checkpoints, tmp_path):
    result, _ = run_main(checkpoints["cifs"], tmp_path, "--n-examples", "20", "--attacks", "natural,fgsm",
                         "--adaptive")
    for name in ("fgsm",):
        sweep = result["adaptive"][name]
        assert set(sweep) == set(evaluate.ADAPTIVE_BETAS)
        assert result["accuracy"][name] == min(sweep.values())
        and_accuracy = torch.tensor(result["per_example"][name]).float().mean().item()
        assert and_accuracy <= result["accuracy"][name]
    # The per-example vector is the AND over beta_atk: re-run one beta and compare.
    model, run_args, _ = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    index = torch.tensor(result["indices"])
    args = evaluate.Args(log_interval=1e9)
    worst = None
    for beta in evaluate.ADAPTIVE_BETAS:
        verdicts, _ = evaluate.run_attack(model, evaluate.attack_fn("fgsm", run_args, args, EPS, beta),
                                          x[index], y[index], args, beta, lambda *a: None)
        worst = verdicts["final"] if worst is None else worst & verdicts["final"]
    assert worst.int().tolist() == result["per_example"]["fgsm"]


def input_gradient(model, x, y):
    with attacks.attack_mode(model):
        x = x.clone().requires_grad_(True)
        loss = attacks.cross_entropy_loss(model(x), y).sum()
        return torch.autograd.grad(loss, x)[0]


def test_differentiable_mask_changes_the_attack_gradient_and_is_restored(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    x, y = x[:16], y[:16]
    modules = [m for m in model.modules() if isinstance(m, cifs.CIFS)]
    assert modules and not any(m.differentiable_mask for m in modules)
    detached = input_gradient(model, x, y)
    with torch.no_grad():
        logits = model(x)[0]
    with evaluate.differentiable_masks(model) as switched:
        assert switched == modules and all(m.differentiable_mask for m in modules)
        through_mask = input_gradient(model, x, y)
        with torch.no_grad():  # the verdict forward itself does not change
            assert torch.allclose(model(x)[0], logits, atol=1e-6)
    assert not any(m.differentiable_mask for m in modules)
    assert torch.equal(input_gradient(model, x, y), detached)
    assert (through_mask - detached).abs().max() > 1e-6 * detached.abs().max()
    with pytest.raises(RuntimeError):
        with evaluate.differentiable_masks(model):
            raise RuntimeError
    assert not any(m.differentiable_mask for m in modules)


def test_differentiable_mask_columns_on_cifs_and_a_noop_elsewhere(checkpoints, fsr_report, tmp_path):
    result, _ = run_main(checkpoints["cifs"], tmp_path, "--n-examples", "10", "--attacks", MAIN,
                         "--differentiable-mask", "--cw-steps", "2")
    for name in ("fgsm-dm", "pgd20-dm", "pgd100-dm", "cw-dm", "ensemble-dm"):
        assert 0.0 <= result["accuracy"][name] <= 1.0
    members = result["differentiable_mask"]["ensemble_dm_of"]
    assert set(members) == set(evaluate.ENSEMBLE_OF) | {"fgsm-dm", "pgd20-dm", "pgd100-dm", "cw-dm"}
    vectors = torch.tensor([result["per_example"][n] for n in members]).bool()
    assert result["per_example"]["ensemble-dm"] == vectors.all(0).int().tolist()
    assert result["accuracy"]["ensemble-dm"] <= result["accuracy"]["ensemble"]
    assert fsr_report["differentiable_mask"] == {"applied": False, "reason": "no CIFS module"}
    assert not any(name.endswith("-dm") for name in fsr_report["accuracy"])


# --------------------------------------------------------------------------------------------
# Black-box attacks (FSR Table 3)
# --------------------------------------------------------------------------------------------


def test_transfer_columns_and_budget(checkpoints, fsr_report):
    for name in ("ti-fgsm", "di-fgsm"):
        assert 0.0 <= fsr_report["accuracy"][name] <= 1.0
        assert len(fsr_report["per_example"][name]) == 20
    source, run_args, _ = evaluate.load_network(checkpoints["natural"], torch.device("cpu"))
    target, _, _ = evaluate.load_network(checkpoints["fsr"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    x, y = x[:32], y[:32]
    target_state = copy.deepcopy(target.state_dict())
    for name, craft in evaluate.transfer_attacks(source, EPS).items():
        torch.manual_seed(0)
        x_adv = craft(target, x, y)
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv != x).any()
    for key, value in target.state_dict().items():
        assert torch.equal(value, target_state[key])


def test_nattack_respects_its_budget(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["fsr"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    args = evaluate.Args(nattack_examples=10, nattack_queries=61, nattack_population=20, nattack_batch_size=4,
                         log_interval=1e9)
    result, _ = evaluate.run_nattack(model, x, y, 10, args, EPS, lambda *a: None)
    assert len(result["indices"]) == 10 and torch.bincount(y[result["indices"]], minlength=10).tolist() == [1] * 10
    assert max(result["queries"]) <= 61
    assert 0.0 <= result["accuracy"] <= result["natural"] <= 1.0
    again, _ = evaluate.run_nattack(model, x, y, 10, args, EPS, lambda *a: None)
    assert again == result


# --------------------------------------------------------------------------------------------
# FSR analysis (Table 5)
# --------------------------------------------------------------------------------------------


def test_fsr_output_selects_the_feature(checkpoints):
    model, _, _ = evaluate.load_network(checkpoints["fsr"], torch.device("cpu"))
    (module,) = [m for m in model.modules() if isinstance(m, fsr.FSR)]
    feature = torch.rand(4, *model.feature_shapes[model.unit_names[-1]])
    with torch.no_grad():
        full, heads = module(feature)
        mask = heads["mask"]
        recalibrated = (1 - mask) * feature + (1 - mask) * module.recalibration((1 - mask) * feature)
        expected = {"robust": mask * feature, "non_robust": (1 - mask) * feature, "recalibrated": recalibrated}
        for output, value in expected.items():
            with evaluate.fsr_output(model, output):
                assert module.output == output
                assert torch.allclose(module(feature)[0], value, atol=1e-6)
        assert module.output == "full"
        assert torch.allclose(full, expected["robust"] + recalibrated, atol=1e-6)


def test_fsr_analysis_report(checkpoints, fsr_report, tmp_path):
    result, _ = run_main(checkpoints["fsr"], tmp_path, "--n-examples", "10", "--attacks", "natural,fgsm",
                         "--fsr-analysis", "--knn-train-examples", "100")
    analysis = result["fsr_analysis"]
    assert set(analysis["outputs"]) == set(evaluate.FSR_OUTPUTS)
    for columns in analysis["outputs"].values():
        assert set(columns) == {"natural", "fgsm"}
        assert all(0.0 <= a <= 1.0 for a in columns.values())
    assert fsr_report["fsr_analysis"]["outputs"] == {}  # a vanilla model: k-NN only
    knn = fsr_report["fsr_analysis"]["knn"]
    assert knn["train_examples"] == 200 and analysis["knn"]["train_examples"] == 100
    for key in ("natural_k5", "adversarial_k5", "natural_k20", "adversarial_k20"):
        assert 0.0 <= knn[key] <= 1.0


def test_knn_on_its_own_reference_set_is_accurate():
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 16)
    features = centres[labels] + 0.3 * torch.randn(200, 16)
    predicted = evaluate.knn_predict(features, features, labels, 5, 4)
    assert (predicted == labels).float().mean() > 0.95
    # A query sitting on one reference point of class 2, far from the rest, follows its weights.
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert evaluate.knn_predict(torch.tensor([[1.0, 0.0]]), reference, torch.tensor([2, 1, 1]), 3, 3).item() == 2


# --------------------------------------------------------------------------------------------
# Gradient-masking report (FSR appendix C)
# --------------------------------------------------------------------------------------------


class Quantized(torch.nn.Module):
    """A planted gradient mask: the input is rounded to the 256 pixel levels by torch.round, whose
    gradient is zero (the test images are already on those levels, so predictions do not change)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


def test_masking_report_passes_honest_and_flags_a_planted_mask(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["natural"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    with torch.no_grad():
        correct = (model(x[:300])[0].argmax(1) == y[:300]).nonzero().squeeze(1)[:12]
    assert len(correct) >= 5
    x, y = x[correct], y[correct]  # clean accuracy 100 %: an attack that cannot move leaves it there
    sweep = dict(steps=(1, 5, 20), eps_factors=(1 / 2, 1, 4))
    args = evaluate.Args(log_interval=1e9)
    report, _ = evaluate.masking_report(model, x, y, EPS, args, **QUIET, **sweep)
    assert report["passed"], report
    assert set(report["checks"].values()) == {"PASS"} and report["unbounded"] == 0.0
    masked, _ = evaluate.masking_report(Quantized(model), x, y, EPS, args, **QUIET, **sweep)
    assert not masked["passed"]
    assert masked["checks"]["unbounded"] == "FAIL" and masked["unbounded"] == 1.0
    with_aa, _ = evaluate.masking_report(model, x, y, EPS, args, aa_warnings=["a warning"], **QUIET,
                                         steps=(1,), eps_factors=(1,))
    assert with_aa["checks"]["autoattack_warnings"] == "FAIL"


# --------------------------------------------------------------------------------------------
# CIFS channel analysis
# --------------------------------------------------------------------------------------------


def test_channel_analysis_shapes_and_ranges(fsr_report):
    analysis = fsr_report["channel_analysis"]
    channels = analysis["channels"]
    assert set(analysis["classes"]) == {str(c) for c in range(10)}
    for entry in analysis["classes"].values():
        assert sorted(entry["order"]) == list(range(channels))
        assert entry["weights"] == sorted(entry["weights"], reverse=True)
        for kind in ("natural", "adversarial"):
            for stat in ("magnitude", "frequency"):
                values = torch.tensor(entry[kind][stat])
                assert values.shape == (channels,)
                assert values.min() >= 0 and values.max() <= 1
            assert max(entry[kind]["magnitude"]) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Plots (optional: only with matplotlib)
# --------------------------------------------------------------------------------------------


def _is_png(path):
    with open(path, "rb") as file:
        return file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_with_and_without_matplotlib(checkpoints, fsr_report, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # .ci/run installs it; the plots are optional at run time
    model, run_args, _ = evaluate.load_network(checkpoints["natural"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    report, _ = evaluate.masking_report(model, x[:6], y[:6], EPS, evaluate.Args(log_interval=1e9), **QUIET,
                                        steps=(1, 5), eps_factors=(1, 2))
    result = {**fsr_report, "masking_report": report}
    written = evaluate.write_plots(result, str(tmp_path / "model"))
    assert written == [str(tmp_path / "model_masking.png"), str(tmp_path / "model_channels.png")]
    assert all(_is_png(path) and os.path.getsize(path) > 5000 for path in written)
    # Without matplotlib: the JSON and CSV are written, no PNG, and the log says why.
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import now raises ImportError
    messages = []
    evaluate.write_outputs([result], str(tmp_path / "bare"), log=messages.append)
    assert sorted(os.listdir(tmp_path / "bare")) == [f"{os.path.basename(os.path.dirname(result['checkpoint']))}.{ext}"
                                                     for ext in ("csv", "json")] + ["table.md"]
    assert any("matplotlib is not installed" in m for m in messages)
