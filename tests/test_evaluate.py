"""evaluate.py: the main table, the CIFS adaptive sweep, attacks through the CIFS mask and the
worst-case columns, CIFS's own AutoAttack, black-box attacks, the FSR analysis (Table 5), the
gradient-masking report, the CIFS channel analysis, mean ± std over seeds, and the CLI's handling
of bad checkpoints and flags.

Everything runs on the CPU: tiny smallcnn checkpoints on 3x16x16 synthetic images, trained once per
session, evaluated on class-balanced subsets of 10-30 test images (the shared CPU is slow: every
attack budget here is the smallest that still makes the check meaningful).
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import attacks
import cifs
import evaluate
import fsr
from conftest import EPS

QUIET = dict(log=lambda *a: None)
MAIN = "natural,fgsm,pgd20,pgd100,cw"


def train_args(module, tmp_dir, name, **kw):
    settings = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=800, device="cpu",
                    strategy="natural", epochs=4, val_size=100, monitor_size=0, eval_steps=1, log_interval=1e9,
                    runs_dir=str(tmp_dir), attack_steps=2, run_name=name)
    settings.update(kw)
    return module.Args(**settings)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"fsr", "cifs", "natural"}: paths of tiny checkpoints of both scripts."""
    runs = tmp_path_factory.mktemp("eval_runs")
    fsr.train(train_args(fsr, runs, "fsr", epochs=1, synthetic_size=300), **QUIET)
    fsr.train(train_args(fsr, runs, "natural", no_fsr=True), **QUIET)
    # CIFS needs a few hundred steps before its probes, mask and accuracy take shape (8 epochs of 700
    # images reach about 55 % clean accuracy); settings explicit, the training defaults may change.
    cifs.train(train_args(cifs, runs, "cifs", batch_size=32, epochs=8, synthetic_size=800, softmax_scale=2.0,
                          positions="conv2,conv3", probes="mlp,linear"), **QUIET)
    return {name: str(runs / name / "last.pt") for name in ("fsr", "cifs", "natural")}


def run_main(path, out, *flags):
    results = evaluate.main([path, "--device", "cpu", "--log-interval", "1e9", "--out", str(out), *flags])
    with open(os.path.join(out, evaluate.result_name(path) + ".json")) as file:
        return results[0], json.load(file)


@pytest.fixture(scope="session")
def fsr_report(checkpoints, tmp_path_factory):
    """The JSON of the vanilla checkpoint under the main table and the opt-in analyses (the FSR
    analysis of a model without FSR modules runs only its k-NN part)."""
    out = tmp_path_factory.mktemp("eval_main")
    _, report = run_main(checkpoints["natural"], out, "--n-examples", "20", "--attacks", MAIN, "--cw-steps", "5",
                         "--fsr-analysis", "--knn-train-examples", "200",
                         "--channel-analysis", "--transfer-source", checkpoints["natural"], "--ti-iterative")
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


@pytest.mark.parametrize("flags, message", [
    (["--ti-kernel", "4"], "--ti-kernel 4"), (["--di-prob", "1.5"], "--di-prob 1.5"),
    (["--ti-iterative"], "--transfer-source"), (["--aa-attacks", "apgd-ce"], "--aa-version custom"),
    (["--autoattack-cifs-examples", "0"], "--autoattack-cifs-examples 0")])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message):
    # The checkpoint does not exist: the flag is refused before anything is loaded.
    with pytest.raises(SystemExit) as raised:
        evaluate.main([str(tmp_path / "missing.pt"), "--device", "cpu", "--out", str(tmp_path), *flags])
    assert str(raised.value.code).startswith("error: --") and message in str(raised.value.code)


@pytest.mark.parametrize("kind", ["newer-version", "other-weights"])
def test_a_checkpoint_of_another_version_is_one_line_naming_what_differs(checkpoints, tmp_path, kind):
    state = torch.load(checkpoints["fsr"], map_location="cpu", weights_only=True)
    if kind == "newer-version":  # settings this version does not know, and one it needs
        state["args"]["gradient_magic"] = True
        del state["args"]["train_size"]
        expected = ("gradient_magic", "train_size")
    else:  # weights that do not fit the network its settings build
        state["model"]["inserted.conv3.head.weight"] = torch.zeros(3, 3)
        del state["model"]["classifier.bias"]
        expected = ("inserted.conv3.head.weight", "classifier.bias")
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(SystemExit) as raised:
        evaluate.main([str(tmp_path / "last.pt"), "--device", "cpu", "--out", str(tmp_path / "eval")])
    message = str(raised.value.code)
    assert message.startswith("error:") and "\n" not in message and all(key in message for key in expected)
    assert not (tmp_path / "eval").exists()


def test_last_and_best_of_one_run_are_two_results_and_nothing_is_overwritten(tmp_path):
    fsr.train(train_args(fsr, tmp_path, "run", no_fsr=True, epochs=2, synthetic_size=300, eval_every=1), **QUIET)
    run = tmp_path / "run"
    assert (run / "best.pt").exists()
    flags = ["--device", "cpu", "--log-interval", "1e9", "--n-examples", "10", "--attacks", "natural,fgsm"]
    evaluate.main([str(run / "last.pt"), str(run / "best.pt"), *flags])
    out = run / "eval"
    assert {"run_last.json", "run_best.json", "run_last.csv", "run_best.csv", "table.md"} <= set(os.listdir(out))
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| run/")]
    assert [row.split(":")[0] for row in rows] == ["| run/last.pt", "| run/best.pt"]
    first = (out / "run_last.json").read_bytes()
    with pytest.raises(SystemExit) as raised:  # the same checkpoint again: refused, the first result kept
        evaluate.main([str(run / "last.pt"), *flags])
    assert "--overwrite" in str(raised.value.code) and (out / "run_last.json").read_bytes() == first
    evaluate.main([str(run / "last.pt"), *flags, "--attacks", "natural", "--overwrite"])
    assert "fgsm" not in json.loads((out / "run_last.json").read_text())["accuracy"]
    assert len([line for line in (out / "table.md").read_text().splitlines() if line.startswith("| run/")]) == 2


def test_a_bad_second_checkpoint_fails_before_the_first_attack(checkpoints, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: calls.append(a))
    with pytest.raises(SystemExit) as raised:
        evaluate.main([checkpoints["natural"], str(tmp_path / "missing.pt"), "--device", "cpu",
                       "--out", str(tmp_path / "eval")])
    assert "missing.pt" in str(raised.value.code) and calls == [] and not (tmp_path / "eval").exists()


def test_each_result_is_written_as_soon_as_it_is_done(checkpoints, tmp_path, monkeypatch):
    evaluate_checkpoint = evaluate.evaluate_checkpoint

    def second_fails(path, *rest):
        if path == checkpoints["cifs"]:
            raise ValueError("the second checkpoint failed")
        return evaluate_checkpoint(path, *rest)
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", second_fails)
    with pytest.raises(SystemExit):
        evaluate.main([checkpoints["natural"], checkpoints["cifs"], "--device", "cpu", "--log-interval", "1e9",
                       "--n-examples", "10", "--attacks", "natural", "--out", str(tmp_path)])
    assert os.path.exists(tmp_path / (evaluate.result_name(checkpoints["natural"]) + ".json"))


def test_load_model_is_a_plain_logits_module_for_other_tools(checkpoints):
    model = evaluate.load_model(checkpoints["cifs"], device="cpu")
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():  # the CIFS mask takes its gradient inside the forward itself
        logits = model(x)
    assert logits.shape == (4, 10)
    network = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))[0]
    torch.testing.assert_close(logits, network(x)[0])


def test_autoattack_runs_on_load_model_as_documented(checkpoints):
    """The README's AutoAttack snippet, on 20 points with APGD-CE alone (the package's own API)."""
    from pyautoattack import AutoAttack
    from data import load_dataset
    model = evaluate.load_model(checkpoints["natural"], device="cpu")
    test = load_dataset("synthetic", train=False, synthetic_shape=(3, 16, 16))
    x, y = test.images[:20].float() / 255, test.labels[:20]
    adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="custom", attacks=["apgd-ce"], device="cpu",
                           seed=0)
    adversary.apgd.n_iter, adversary.apgd.n_restarts = 10, 1  # cheaper than the standard 100 x 5
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=20)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).sum() <= (model(x).argmax(1) == y).sum()


def test_curves_overlay_several_runs(checkpoints, tmp_path):
    pytest.importorskip("matplotlib")
    runs = [os.path.dirname(checkpoints[name]) for name in ("fsr", "natural")]
    evaluate.main([*runs, "--curves", "--out", str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as raised:
        evaluate.main([*runs, "--curves", "--out", str(tmp_path)])
    assert "--overwrite" in str(raised.value.code)


# --------------------------------------------------------------------------------------------
# Across seeds
# --------------------------------------------------------------------------------------------


def test_seeds_of_one_configuration_get_mean_and_std(tmp_path):
    tiny = dict(no_fsr=True, epochs=1, synthetic_size=300)
    for name, extra in (("s0", dict(seed=0)), ("s1", dict(seed=1)), ("other", dict(seed=0, lr=0.01))):
        fsr.train(train_args(fsr, tmp_path / "runs", name, **tiny, **extra), **QUIET)
    paths = [str(tmp_path / "runs" / name / "last.pt") for name in ("s0", "other", "s1")]
    out = tmp_path / "eval"
    results = evaluate.main([*paths, "--device", "cpu", "--log-interval", "1e9", "--out", str(out),
                             "--n-examples", "10", "--attacks", "natural,fgsm"])
    with open(out / "summary.json") as file:
        (group,) = json.load(file)["seed_groups"]  # "other" differs in lr: a configuration of its own
    assert group["seeds"] == [0, 1] and group["checkpoints"] == [paths[0], paths[2]]
    for column in ("natural", "fgsm"):
        a, b = results[0]["accuracy"][column], results[2]["accuracy"][column]
        assert group["mean"][column] == pytest.approx((a + b) / 2)
        assert group["std"][column] == pytest.approx(abs(a - b) / 2 ** 0.5)  # sample std of two values
    table = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    names = [line.split(" | ")[0] for line in table[2:]]
    assert names == ["| s0/last.pt: smallcnn natural (vanilla), seed 0, 10 images",
                     "| s1/last.pt: smallcnn natural (vanilla), seed 1, 10 images",
                     "| smallcnn natural (vanilla), mean ± std (seeds 0, 1)",
                     "| other/last.pt: smallcnn natural (vanilla), seed 0, 10 images"]
    assert f"{100 * group['mean']['fgsm']:.2f} ± {100 * group['std']['fgsm']:.2f}" in table[4]


# --------------------------------------------------------------------------------------------
# CIFS adaptive attacks and attacks through the mask
# --------------------------------------------------------------------------------------------


def test_adaptive_sweep_takes_the_minimum_and_the_per_example_and(checkpoints, tmp_path):
    result, _ = run_main(checkpoints["cifs"], tmp_path, "--n-examples", "20", "--attacks", "natural,fgsm",
                         "--adaptive", "--no-through-mask")
    assert result["through_mask"] == {"applied": False, "reason": "--no-through-mask"}
    assert not any(name.endswith(("-tm", "-worst")) for name in result["accuracy"])
    for name in ("fgsm",):
        sweep = result["adaptive"][name]
        assert set(sweep) == set(evaluate.ADAPTIVE_BETAS)
        assert result["accuracy"][name] == min(sweep.values())
        and_accuracy = sum(result["per_example"][name]) / len(result["per_example"][name])  # integer counts, as the JSON
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


def test_through_mask_gradient_is_the_gradient_of_the_model_function(checkpoints):
    """The attack through the mask climbs the true input gradient of the model's function (mask
    included): its gradient matches central finite differences in float64; the papers' gradient
    (mask a constant) does not."""
    model, run_args, _ = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))
    model = model.double()
    x, y = evaluate.load_split(run_args, "data", train=False)
    x, y = x[:6].double(), y[:6]

    def loss(output, labels):  # CE in float64 (the attacks' own CE computes in fp32)
        return F.cross_entropy(output[0], labels, reduction="none")

    def attack_gradient(view):
        seen = []
        with evaluate.attack_view(model, view):
            attacks.pgd(model, x, y, EPS, EPS / 10, 1, loss_fn=loss, random_start_kind=None,
                        grad_transform=lambda grad: seen.append(grad) or grad)
        return seen[0]

    @torch.no_grad()
    def slope(v, h=1e-5):
        return ((loss(model(x + h * v), y).sum() - loss(model(x - h * v), y).sum()) / (2 * h)).item()

    through, standard = attack_gradient(evaluate.THROUGH_MASK), attack_gradient(evaluate.STANDARD)
    torch.manual_seed(0)
    for v in [torch.randn_like(x) for _ in range(3)] + [through - standard]:
        v = v / v.norm()
        assert (through * v).sum().item() == pytest.approx(slope(v), rel=1e-5, abs=1e-9)
    v = (through - standard) / (through - standard).norm()
    assert abs((standard * v).sum().item() - slope(v)) > 1e-2 * abs(slope(v))


def run_cifs(checkpoints, out, *flags):
    return run_main(checkpoints["cifs"], out, "--n-examples", "10", *flags)[0]


def test_cifs_default_table_adds_through_mask_and_worst_case_columns(checkpoints, fsr_report, tmp_path):
    swept = run_cifs(checkpoints, tmp_path / "swept", "--attacks", "natural,fgsm,pgd20", "--adaptive")
    full = run_cifs(checkpoints, tmp_path / "full", "--attacks", MAIN, "--cw-steps", "2")
    for result in (swept, full):
        accuracy, per_example = result["accuracy"], result["per_example"]
        worst_of = result["through_mask"]["worst_case_of"]
        for name in (n for n in evaluate.WHITE_BOX if n in accuracy):
            assert worst_of[name + "-worst"] == [name, name + "-tm"]
            both = torch.tensor([per_example[name], per_example[name + "-tm"]]).bool()
            assert per_example[name + "-worst"] == both.all(0).int().tolist()
            # Never above any column it is the minimum of, every beta_atk of either view included.
            members = [accuracy[name], accuracy[name + "-tm"]]
            members += [*result["adaptive"].get(name, {}).values(), *result["adaptive"].get(name + "-tm", {}).values()]
            assert accuracy[name + "-worst"] <= min(members) + 1e-9
    assert set(swept["adaptive"]["pgd20-tm"]) == set(evaluate.ADAPTIVE_BETAS)
    members = ["natural", *(n + "-worst" for n in evaluate.WHITE_BOX)]
    assert full["through_mask"]["worst_case_of"]["ensemble-worst"] == members
    vectors = torch.tensor([full["per_example"][n] for n in members]).bool()
    assert full["per_example"]["ensemble-worst"] == vectors.all(0).int().tolist()
    assert full["accuracy"]["ensemble-worst"] <= min(full["accuracy"]["ensemble"],
                                                     *(full["accuracy"][n] for n in members))
    # Models without CIFS are unchanged.
    assert "through_mask" not in fsr_report
    assert not any(name.endswith(("-tm", "-worst")) for name in fsr_report["accuracy"])


# --------------------------------------------------------------------------------------------
# Black-box attacks (FSR Table 3)
# --------------------------------------------------------------------------------------------


def test_transfer_columns_and_budget(checkpoints, fsr_report):
    assert fsr_report["transfer"]["ti-fgsm"]["steps"] == 1 and fsr_report["transfer"]["di-fgsm"]["steps"] == 10
    assert "the DI paper's" in fsr_report["transfer"]["di-fgsm"]["transform"]
    for name in ("ti-fgsm", "ti-i-fgsm", "di-fgsm"):
        assert 0.0 <= fsr_report["accuracy"][name] <= 1.0
        assert len(fsr_report["per_example"][name]) == 20
    source, run_args, _ = evaluate.load_network(checkpoints["natural"], torch.device("cpu"))
    target, _, _ = evaluate.load_network(checkpoints["fsr"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    x, y = x[:32], y[:32]
    target_state = copy.deepcopy(target.state_dict())
    crafts = evaluate.transfer_attacks(source, EPS, evaluate.Args(ti_iterative=True, di_shrink=True))
    assert set(crafts) == {"ti-fgsm", "ti-i-fgsm", "di-fgsm"}
    for name, craft in crafts.items():
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
# AutoAttack: CIFS's own protocol, and warnings attributed to the right model
# --------------------------------------------------------------------------------------------


def test_cifs_autoattack_has_the_authors_settings_and_climbs_the_joint_loss(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    with torch.no_grad():  # points the attacks must work on (the tiny fixture's accuracy varies with rounding)
        correct = model.eval()(x)[0].argmax(1) == y
    x, y = x[correct][:8], y[correct][:8]
    joint = evaluate.sweep_loss("ce", evaluate.CIFS_AUTOATTACK_BETA, 50.0)
    adversary = attacks.cifs_autoattack_adversary(model, EPS, joint)
    assert adversary.attacks_to_run == ["apgd-ce", "square"]
    assert (adversary.apgd.n_restarts, adversary.apgd.n_iter, adversary.apgd.eps) == (5, 100, EPS)
    assert (adversary.square.n_queries, adversary.square.p_init, adversary.square.n_restarts) == (5000, 0.8, 1)
    # By hand on the tiny model (two probes): CE(final) + (2 / 2) (CE(p_1) + CE(p_2)), and its gradient.
    with attacks.attack_mode(model):
        x_req = x.clone().requires_grad_(True)
        logits, emitted = model(x_req)
        assert len(emitted) == 2
        hand = F.cross_entropy(logits, y, reduction="none") + \
            (2.0 / 2) * sum(F.cross_entropy(e["probe"], y, reduction="none") for e in emitted)
        (hand_grad,) = torch.autograd.grad(hand.sum(), x_req)
        final, apgd_loss, apgd_grad = adversary.apgd.model.get_logits_loss_grad_xent(x, y)
        margin, square_loss = adversary.square.margin_and_loss(x, y)
    assert torch.allclose(apgd_loss, hand.detach(), atol=1e-5) and torch.allclose(apgd_grad, hand_grad, atol=1e-6)
    assert torch.allclose(square_loss, -hand.detach(), atol=1e-5)  # Square minimises: the negated joint loss
    assert torch.equal(margin > 0, final.argmax(1) == y)  # success is judged on the final logits
    # APGD and Square take their loss from there: a short run calls it at every step.
    calls = []
    counted = attacks.cifs_autoattack_adversary(model, EPS, lambda out, labels: calls.append(1) or joint(out, labels),
                                                n_restarts=1, n_iter=4, n_queries=3)
    attacks.run_adversary(counted, model, x, y)
    assert len(calls) >= 4 + 1


def test_autoattack_in_one_run_flags_no_model_and_cifs_protocol_is_bounded(checkpoints, tmp_path):
    # eps 0.3: APGD breaks every point in its first restart, so neither the standard nor the CIFS
    # AutoAttack spends its later restarts or Square queries; the checks run all the same.
    paths = [checkpoints[name] for name in ("natural", "cifs", "fsr")]
    results = evaluate.main([*paths, "--device", "cpu", "--log-interval", "1e9", "--out", str(tmp_path),
                             "--n-examples", "4", "--attacks", "natural,autoattack", "--aa-version", "custom",
                             "--aa-attacks", "apgd-ce", "--epsilon", "0.3", "--autoattack-cifs",
                             "--autoattack-cifs-examples", "20"])
    flagged = [any("dynamic defense" in w for w in r["autoattack_warnings"]) for r in results]
    assert flagged == [False, False, False]  # CIFS's mask is a closed form: no gradient inside its forward
    for r in results:
        cifs_run = r["autoattack_cifs"]
        _, y_all = evaluate.load_split(evaluate.load_network(r["checkpoint"], torch.device("cpu"))[1], "data",
                                       train=False)
        assert torch.bincount(y_all[cifs_run["indices"]], minlength=10).tolist() == [2] * 10
        robust, natural = torch.tensor(cifs_run["per_example"]), torch.tensor(cifs_run["natural_per_example"])
        assert (robust <= natural).all() and cifs_run["accuracy"] <= cifs_run["natural"]
        assert r["accuracy"]["autoattack-cifs"] == cifs_run["accuracy"]
    assert "AutoAttack (CIFS protocol)" in (tmp_path / "table.md").read_text()


def test_cifs_autoattack_never_above_natural_at_8_255(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    args = evaluate.Args(autoattack_cifs_examples=40, log_interval=1e9)
    result, _ = evaluate.run_autoattack_cifs(model, x, y, 10, args, EPS, lambda *a: None, n_restarts=1, n_iter=10,
                                             n_queries=30)
    robust, natural = torch.tensor(result["per_example"]), torch.tensor(result["natural_per_example"])
    assert natural.sum() >= 5  # the fixture learned: the bound is not met by an empty set
    assert (robust <= natural).all() and result["accuracy"] < result["natural"]


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
                assert torch.allclose(module(feature)[0], value, atol=1e-6)
            assert not module._forward_hooks  # the selection is gone after the block
        assert torch.equal(module(feature)[0], full)  # the module itself always passes on f~
        assert torch.allclose(full, expected["robust"] + recalibrated, atol=1e-6)


def test_fsr_analysis_is_table_5(checkpoints, fsr_report, tmp_path):
    result, _ = run_main(checkpoints["fsr"], tmp_path, "--n-examples", "10", "--attacks", ",".join(evaluate.MAIN_ATTACKS),
                         "--cw-steps", "2", "--aa-version", "custom", "--aa-attacks", "apgd-ce", "--fsr-analysis",
                         "--knn-train-examples", "100")
    analysis = result["fsr_analysis"]
    assert list(analysis["outputs"]) == list(evaluate.FSR_OUTPUTS)  # f+, f-, f~-, f~
    for output, row in analysis["outputs"].items():
        assert set(row["accuracy"]) == {*evaluate.TABLE5_COLUMNS, "ensemble"}
        per = {name: torch.tensor(v).bool() for name, v in row["per_example"].items()}
        assert torch.equal(per["ensemble"], torch.stack([per[n] for n in evaluate.ENSEMBLE_OF]).all(0))
        assert (per["autoattack"] <= per["natural"]).all()
    # f~ is what the main table attacked: its row is the table's, reused rather than recomputed.
    assert analysis["reused_from_table"] == list(evaluate.TABLE5_COLUMNS)
    for name in (*evaluate.TABLE5_COLUMNS, "ensemble"):
        assert analysis["outputs"]["full"]["per_example"][name] == result["per_example"][name]
    knn = analysis["knn"]
    assert set(knn["accuracy"]) == {"input", "robust", "non_robust", "recalibrated", "full"}
    assert knn["train_examples"] == 100
    for values in knn["accuracy"].values():
        assert set(values) == {f"{kind}_k{k}" for kind in ("natural", "adversarial") for k in evaluate.KNN_K}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    vanilla = fsr_report["fsr_analysis"]  # a vanilla model: no FSR to replace, k-NN of its penultimate feature
    assert vanilla["outputs"] == {} and set(vanilla["knn"]["accuracy"]) == {"penultimate"}
    assert vanilla["knn"]["train_examples"] == 200


def test_fsr_features_are_the_features_fsr_passes_on(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["fsr"], torch.device("cpu"))
    x, _ = evaluate.load_split(run_args, "data", train=False)
    x = x[:10]
    features = evaluate.fsr_features(model, x, evaluate.Args(batch_size=4))  # three batches
    (module,) = [m for m in model.modules() if isinstance(m, fsr.FSR)]
    seen = []
    hook = module.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out[0])))
    try:
        for output in evaluate.FSR_OUTPUTS:
            seen.clear()
            with torch.no_grad(), evaluate.fsr_output(model, output):
                model(x)
            (feature, passed_on), = seen
            # Each pooled feature is what FSR passes on when told to pass it on (Table 5 (a)).
            assert torch.allclose(features[output], fsr.pool(passed_on), atol=1e-5), output
    finally:
        hook.remove()
    assert torch.allclose(features["input"], fsr.pool(feature), atol=1e-6)
    with torch.no_grad():  # FSR after the last unit: f~ pooled is the classifier's input
        assert torch.allclose(features["full"], model.features(x)[0], atol=1e-5)
    plain, _, _ = evaluate.load_network(checkpoints["natural"], torch.device("cpu"))
    assert set(evaluate.fsr_features(plain, x, evaluate.Args())) == {"penultimate"}


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
    assert report["attack"] == evaluate.STANDARD and "through_mask_gap" not in report["checks"]


def test_masking_report_reuses_the_tables_fgsm_and_pgd20(checkpoints, tmp_path, monkeypatch):
    calls = {}
    pgd = attacks.pgd

    def counted(model, x, y, eps, step_size, steps, *rest, **kw):  # FGSM is one PGD step of size eps
        key = (round(eps, 8), round(step_size, 8), steps)
        calls[key] = calls.get(key, 0) + 1
        return pgd(model, x, y, eps, step_size, steps, *rest, **kw)

    monkeypatch.setattr(attacks, "pgd", counted)
    result, _ = run_main(checkpoints["natural"], tmp_path, "--n-examples", "10", "--attacks", "natural,fgsm,pgd20",
                         "--masking-report")
    report = result["masking_report"]
    assert report["reused_from_table"] == ["fgsm (standard)", "pgd20 (standard)"]
    # One batch: each attack ran once, for the table; the report's FGSM, PGD-20 and eps = 8/255 reused it.
    assert calls[(round(EPS, 8), round(EPS, 8), 1)] == 1 and calls[(round(EPS, 8), round(EPS / 10, 8), 20)] == 1
    assert report["fgsm"] == result["accuracy"]["fgsm"] and report["pgd20"] == result["accuracy"]["pgd20"]
    assert report["eps"][f"{EPS:.6g}"] == result["accuracy"]["pgd20"]
    # With a random start the table's PGD-20 is another attack: nothing is reused.
    again, _ = run_main(checkpoints["natural"], tmp_path / "rs", "--n-examples", "10", "--attacks", "natural,pgd20",
                        "--random-start", "--masking-report")
    assert again["masking_report"]["reused_from_table"] == []


def test_masking_report_on_cifs_attacks_through_the_mask_and_fails_a_large_gap(checkpoints):
    model, run_args, _ = evaluate.load_network(checkpoints["cifs"], torch.device("cpu"))
    x, y = evaluate.load_split(run_args, "data", train=False)
    x, y = x[:10], y[:10]
    args, sweep = evaluate.Args(log_interval=1e9), dict(steps=(1,), eps_factors=(1,))
    dynamic = "it seems to be a dynamic defense! The evaluation with AutoAttack might be insufficient."
    lines = []
    report, _ = evaluate.masking_report(model, x, y, EPS, args, lines.append, aa_warnings=[dynamic], **sweep)
    assert report["attack"] == evaluate.THROUGH_MASK and "masking report: attacks through the mask" in lines[0]
    gap = report["through_mask_gap"]
    difference = gap["standard_pgd20"] - gap["through_mask_pgd20"]
    assert report["checks"]["through_mask_gap"] == ("FAIL" if difference > 0.02 and round(10 * difference) > 1
                                                    else "PASS")
    # CIFS's dynamic-defence flag is a note, not a FAIL; on a model without CIFS it fails the check.
    assert report["checks"]["autoattack_warnings"] == "PASS" and "expected for CIFS" in report["notes"][0]
    assert any(line.startswith("  NOTE") for line in lines)
    plain, _, _ = evaluate.load_network(checkpoints["natural"], torch.device("cpu"))
    assert evaluate.masking_report(plain, x, y, EPS, args, **QUIET, aa_warnings=[dynamic], **sweep)[0][
        "checks"]["autoattack_warnings"] == "FAIL"
    # A standard-attack accuracy well above the through-the-mask one: FAIL, with both numbers.
    known = {("pgd20", evaluate.STANDARD): 0.9, ("pgd20", evaluate.THROUGH_MASK): 0.5,
             ("fgsm", evaluate.THROUGH_MASK): 0.6}
    planted, _ = evaluate.masking_report(model, x, y, EPS, args, **QUIET, known=known, **sweep)
    assert planted["checks"]["through_mask_gap"] == "FAIL" and not planted["passed"]
    assert "90.00%" in planted["lines"]["through_mask_gap"] and "50.00%" in planted["lines"]["through_mask_gap"]
    known.update({("pgd20", evaluate.STANDARD): 0.8, ("pgd20", evaluate.THROUGH_MASK): 0.7})  # one example in ten
    assert evaluate.masking_report(model, x, y, EPS, args, **QUIET, known=known, **sweep)[0][
        "checks"]["through_mask_gap"] == "PASS"


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
    assert sorted(os.listdir(tmp_path / "bare")) == [f"{evaluate.result_name(result['checkpoint'])}.{ext}"
                                                     for ext in ("csv", "json")] + ["summary.json", "table.md"]
    assert any("matplotlib is not installed" in m for m in messages)


def test_fp32_is_said_precisely_and_strict_fp32_turns_tf32_off(checkpoints, tmp_path):
    """run_support.set_tf32: what fp32 means on the device (TF32 convolutions on Ampere/Hopper GPUs by
    default, as PyTorch's cudnn.allow_tf32; none on the CPU); --strict-fp32 in evaluate.py and both
    training scripts turns TF32 off."""
    from run_support import set_tf32
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        assert set_tf32(True, "cuda") == "fp32 (TF32 convolutions allowed)"
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert set_tf32(False, torch.device("cuda", 0)) == "strict fp32"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert set_tf32(True, "cpu") == "fp32"
        for module in (fsr, cifs):
            module.device_settings(module.Args(device="cpu", strict_fp32=True))
            assert not torch.backends.cudnn.allow_tf32, module.__name__
            module.device_settings(module.Args(device="cpu"))
            assert torch.backends.cudnn.allow_tf32, module.__name__
        helps = [m.Args.__dataclass_fields__["strict_fp32"].metadata["help"] for m in (fsr, cifs)]
        assert helps[0] == helps[1]
        result, saved_json = run_main(checkpoints["natural"], tmp_path / "strict", "--n-examples", "10", "--attacks",
                                      "natural", "--strict-fp32")
        assert result["protocol"]["precision"] == saved_json["protocol"]["precision"] == "fp32"  # CPU: no TF32
        assert not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
