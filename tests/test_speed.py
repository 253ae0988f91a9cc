"""benchmarks/speed.py: the speed-comparison driver, on the CPU with tiny settings.

The figures themselves are timings and cannot be checked; what is checked is what they are made
of: the formulas (seconds per epoch, speed-up, overheads, TFLOP/s, peak fraction), that the
reference loop really does the old-style work (PIL DataLoader, attack gradients that fill the
weights' .grad) while the fast path does not, that the driver's fast path is the scripts' own
training step, the op counts and overheads, the target verdicts, and the JSON, profile and accuracy-check outputs.
"""

import copy
import dataclasses
import importlib.util
import json
import os
import sys

import pytest
import torch

import attacks
import cifs
import fsr
import models
from benchmarks import speed
from models import build_model
from data import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *a: None)
EPS = 8 / 255


def tiny(tmp_path, **kw) -> speed.Args:
    """Settings whose whole run takes a few seconds on one core."""
    settings = dict(device="cpu", model="smallcnn", shape="3,16,16", batch_size=16, attack_steps=2, steps=2,
                    warmup=1, eval_images=40, eval_batch_size=20, eval_steps=2, num_workers=0,
                    out=str(tmp_path / "speed.json"))
    settings.update(kw)
    return speed.Args(**settings)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("speed")
    lines = []
    results = speed.run(tiny(tmp_path, peak_tflops=2.0, rounds=2), log=lines.append)
    return results, tmp_path, lines


def test_rounds_interleave_the_variants(tiny_results):
    results, _, lines = tiny_results
    rounds = [line for line in lines if line.startswith("timing round")]
    assert rounds == ["timing round 1/2: 1 steps each of plain, +FSR, +CIFS, reference loop ...",
                      "timing round 2/2: 1 steps each of reference loop, +CIFS, +FSR, plain ..."]
    for r in results["variants"].values():
        assert len(r["round_seconds"]) == 2 and r["timed_seconds"] == pytest.approx(sum(r["round_seconds"]))
        assert r["spread"] >= 0 and r["timed_steps"] == 2
    assert speed.round_sizes(7, 3) == [3, 2, 2] and speed.round_sizes(4, 1) == [4]
    with pytest.raises(ValueError, match="rounds"):
        speed.resolve(speed.Args(device="cpu", steps=2, rounds=3))


def test_all_variants_and_the_formulas(tiny_results):
    results, _, _ = tiny_results
    variants = results["variants"]
    assert list(variants) == ["plain", "fsr", "cifs", "reference"]
    for name, r in variants.items():
        assert r["images_per_second"] > 0, name
        assert r["images_per_second"] == pytest.approx(2 * 16 / r["timed_seconds"])
        assert r["seconds_per_epoch"] == pytest.approx(50_000 / r["images_per_second"])  # cifar10's train size
        assert r["tflops_per_second"] == pytest.approx(
            r["images_per_second"] * r["forward_equivalents"] * r["forward_gflops"] * 1e9 / 1e12)
        assert r["fraction_of_peak"] == pytest.approx(r["tflops_per_second"] / 2.0)  # --peak-tflops 2
        assert r["peak_memory_gib"] is None  # CPU
    # The reference loop is credited with the fast path's (useful) FLOPs: TFLOP/s ratio = images/s ratio.
    plain, ref = variants["plain"], variants["reference"]
    assert ref["forward_equivalents"] == plain["forward_equivalents"] == 2 * 2 + 3
    assert ref["forward_gflops"] == plain["forward_gflops"]
    assert ref["executed_forward_equivalents"] == 3 * 2 + 3  # attack backward also computes weight grads
    assert (ref["precision"], ref["channels_last"], ref["attack_gradients"]) == ("fp32", False, "input and weights")
    assert plain["attack_gradients"] == "input only"
    # The modules add FLOPs and parameters to the same backbone.
    assert variants["fsr"]["forward_gflops"] > plain["forward_gflops"]
    assert variants["cifs"]["parameters"] > plain["parameters"] == ref["parameters"]
    r = results["ratios"]
    assert r["speedup_over_reference"] == pytest.approx(plain["images_per_second"] / ref["images_per_second"])
    assert r["speedup_over_reference"] == pytest.approx(plain["tflops_per_second"] / ref["tflops_per_second"])
    for method in ("fsr", "cifs"):
        expected = (plain["images_per_second"] / variants[method]["images_per_second"] - 1) * 100
        assert r[f"{method}_overhead_percent"] == pytest.approx(expected)


def test_evaluation_cost_is_extrapolated_to_10000(tiny_results):
    results, _, _ = tiny_results
    assert list(results["evaluation"]) == ["plain", "fsr", "cifs"]
    for r in results["evaluation"].values():
        assert r["images"] == 40 and r["seconds"] > 0
        assert r["seconds_per_10000"] == pytest.approx(r["seconds"] * 10000 / 40)
        assert "40 images" in r["extrapolated"]
        assert r["forward_equivalents"] == 2 * 2 + 2  # PGD-2: forward + input backward per step; 2 accuracy forwards
    assert "extrapolated" in results["report"]


def test_json_report_and_environment(tiny_results):
    results, tmp_path, _ = tiny_results
    with open(tmp_path / "speed.json") as file:
        saved = json.load(file)
    assert saved["ratios"] == results["ratios"]
    assert saved["settings"]["shape"] == "3,16,16" and saved["settings"]["train_size"] == 50_000
    env = saved["environment"]
    for key in ("device_name", "torch", "torchvision", "cuda", "cudnn", "cpu_count", "date", "command"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    for label in ("| plain |", "| +FSR |", "| +CIFS |", "| reference loop |", "Speed-up", "Targets (docs/performance.md)", "| ops, fp32 |"):
        assert label in saved["report"]


def test_targets_on_cpu(tiny_results):
    results, _, _ = tiny_results
    verdicts = [t["verdict"] for t in results["targets"]]
    assert len(verdicts) == 8 and "fp32: <= 15 s per epoch" in results["targets"][0]["target"]  # fp32 run, fp32 target
    assert verdicts[0] == verdicts[1] == "not measured (no GPU)"
    for verdict, method, limit in ((verdicts[2], "fsr", 6), (verdicts[4], "cifs", 10)):
        assert verdict.startswith("PASS" if results["ratios"][f"{method}_overhead_percent"] <= limit else "FAIL")
        assert "H100" in verdict
    for verdict, method, limit in ((verdicts[3], "fsr", 15), (verdicts[5], "cifs", 10)):  # ops, judged on the CPU
        assert verdict == ("PASS" if results["ops"]["fp32"][method]["ops_overhead_percent"] <= limit else "FAIL")
    casts = max(row["attack_casts"] for row in results["ops"]["bf16"].values())
    assert results["targets"][6]["value"] == casts and verdicts[6] == ("PASS" if casts <= 26 else "FAIL")
    assert verdicts[7] == "not measured (run with --accuracy-check)"
    assert all("issue" not in t["target"] + t["verdict"] for t in results["targets"])  # the project's targets


def fake_results(device_name, plain_epoch, speedup, fsr_overhead=5.0, cifs_overhead=12.0, precision="bf16"):
    return {"environment": {"device_name": device_name},
            "variants": {"plain": {"seconds_per_epoch": plain_epoch, "precision": precision}},
            "ratios": {"speedup_over_reference": speedup, "fsr_overhead_percent": fsr_overhead,
                       "cifs_overhead_percent": cifs_overhead}}


def test_target_verdicts_on_gpus():
    """Pure logic (no GPU needed): the H100 targets are judged only on an H100 at the issue's settings."""
    args = speed.resolve(speed.Args(device="cuda"))
    h100 = "NVIDIA H100 80GB HBM3"
    verdicts = [t["verdict"] for t in speed.check_targets(args, fake_results(h100, 7.5, 12.0))]
    assert [verdicts[i] for i in (0, 1, 2, 4)] == ["PASS", "PASS", "PASS", "FAIL"]
    assert verdicts[3] == verdicts[5] == verdicts[6] == "not measured (--no-ops)"
    verdicts = [t["verdict"] for t in speed.check_targets(args, fake_results(h100, 8.5, 9.0))]
    assert verdicts[:2] == ["FAIL", "FAIL"]
    # fp32 is judged against the fp32 target (15 s), bf16 against the bf16 one (8 s)
    fp32 = speed.check_targets(args, fake_results(h100, 12.0, 12.0, precision="fp32"))[0]
    assert fp32["verdict"] == "PASS" and "fp32: <= 15 s" in fp32["target"]
    verdicts = [t["verdict"] for t in speed.check_targets(args, fake_results("NVIDIA A100-SXM4-80GB", 7.5, 12.0))]
    assert all("defined for an H100" in v for v in verdicts[:2]) and verdicts[2].startswith("PASS (on NVIDIA A100")
    other = speed.resolve(speed.Args(device="cuda", batch_size=64))
    verdicts = [t["verdict"] for t in speed.check_targets(other, fake_results(h100, 7.5, 12.0))]
    assert all(v.startswith("not applicable") and "batch_size 64" in v for v in verdicts[:2])


def test_peak_table_matches_device_names():
    assert speed.gpu_model("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert speed.gpu_model("NVIDIA H100 PCIe") == "H100 PCIe"
    assert speed.gpu_model("NVIDIA H200") == "H200"
    assert speed.gpu_model("NVIDIA A100-SXM4-80GB") == speed.gpu_model("NVIDIA A100 80GB PCIe") == "A100"
    assert speed.gpu_model("NVIDIA H100 NVL") is None and speed.gpu_model("NVIDIA GeForce RTX 4090") is None
    for row in speed.PEAK_TFLOPS.values():
        assert row["bf16"] > row["tf32"] > row["fp32"] > 0
    args = speed.resolve(speed.Args(device="cpu"))
    assert speed.peak_tflops(args, torch.device("cpu"), "bf16") is None  # CPU: no fraction unless asked
    assert speed.peak_tflops(dataclasses.replace(args, peak_tflops=3.0), torch.device("cpu"), "fp32") == 3.0


def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model("smallcnn", 10, (3, 16, 16))


def test_reference_attack_computes_weight_gradients_and_the_fast_attack_does_not():
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model = small_model()
    speed.reference_attack(model, x, y, EPS, EPS / 4, steps=1)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model.training  # the old loop switches back to train mode itself
    model = small_model()
    attacks.pgd(model, x, y, EPS, EPS / 4, 1)
    assert all(p.grad is None for p in model.parameters())
    model = small_model()
    speed.reference_attack(model, x, y, EPS, EPS / 4, steps=1, weight_grads=False)  # the official codes' way
    assert all(p.grad is None for p in model.parameters())


def test_reference_attack_stays_in_the_budget_and_the_box():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    x[:4], x[4:8] = 0.0, 1.0  # images on the box's faces: the projection must clamp
    y = torch.randint(0, 10, (16,))
    x_adv = speed.reference_attack(small_model(), x, y, EPS, EPS / 4, steps=5)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it moved
    assert not x_adv.requires_grad


def test_reference_loader_yields_pil_transformed_tensors(tmp_path):
    split = make_synthetic(10, (3, 16, 16), 24, seed=0, train=True)
    args = speed.resolve(tiny(tmp_path, batch_size=8, num_workers=1))
    loader = speed.reference_loader(split, args)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)  # ToTensor of uint8 pixels
    transform = loader.dataset.transform
    assert [type(t).__name__ for t in transform.transforms] == ["RandomCrop", "RandomHorizontalFlip", "ToTensor"]
    # Random crop + flip: some item differs from its stored image, none changes its label.
    original = split.images.float() / 255
    items = [loader.dataset[i] for i in range(24)]
    assert any(not torch.equal(img, original[i]) for i, (img, _) in enumerate(items))
    assert [label for _, label in items] == split.labels.tolist()
    # One channel (Fashion-MNIST-like, no augmentation): PIL mode "L", ToTensor alone.
    grey = speed.resolve(speed.Args(device="cpu", dataset="fmnist", batch_size=4, num_workers=0))
    one = make_synthetic(10, (1, 28, 28), 4, seed=0, train=True)
    img, _ = speed.reference_loader(one, grey).dataset[0]
    assert img.shape == (1, 28, 28) and torch.allclose(img, one.images[0].float() / 255)


@pytest.mark.parametrize("script, variant, strategy", [(fsr, "fsr", "at"), (cifs, "cifs", "at"),
                                                       (fsr, "fsr", "trades")])
def test_profiled_step_is_the_scripts_training_step(tmp_path, script, variant, strategy):
    """labelled_training_step (the unrolled step the profiler labels) computes training_step's loss."""
    args = speed.resolve(tiny(tmp_path, strategy=strategy))
    overrides = speed.script_of(variant)[1]
    run = speed.fast_path(script, speed.script_args(script, args, **overrides), 1)
    x, y = next(run.batches)
    model = copy.deepcopy(run.model)
    torch.manual_seed(1)
    expected, _, _ = script.training_step(model, x, y, run.args, 0, run.autocast)
    torch.manual_seed(1)
    seconds = {"attack": 0.0, "update": 0.0}
    loss = speed.labelled_training_step(script, run, x, y, seconds)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert seconds["attack"] > 0 and seconds["update"] > 0
    assert any(p.grad is not None for p in run.model.parameters())  # the update ran


def test_fast_path_counts_are_those_of_the_scripts_networks(tmp_path):
    """The driver times the scripts' own networks: the FLOPs and parameters it reports are those of
    the network fsr.py / cifs.py build for the same settings (plain: the backbone alone)."""
    args = speed.resolve(tiny(tmp_path, shape="3,8,8", batch_size=8, attack_steps=1, steps=1, warmup=0))
    for script, variant in ((fsr, "fsr"), (cifs, "cifs"), (fsr, "plain")):
        network = script.build_network(script.resolve(speed.script_args(script, args, **speed.script_of(variant)[1])))
        ours = speed.time_variants(args, [variant], **QUIET)[variant]
        assert ours["forward_gflops"] == pytest.approx(speed.count_flops(network, (3, 8, 8)) / 1e9)
        assert ours["parameters"] == models.count_parameters(network)
        assert ours["images_per_second"] > 0
    assert models.count_parameters(build_model("smallcnn", 10, (3, 8, 8))) == \
        speed.time_variants(args, ["plain"], **QUIET)["plain"]["parameters"]


@pytest.mark.parametrize("variant", ["fsr", "cifs"])
def test_the_method_costs_parameters_and_flops_over_the_plain_backbone(tmp_path, variant):
    """What `fsr.py --benchmark` / `cifs.py --benchmark` reported before it moved here: speed, and
    the method's parameters and FLOPs above the backbone's."""
    args = speed.resolve(tiny(tmp_path, batch_size=16, attack_steps=2, steps=2, warmup=0))
    figures = speed.time_variants(args, ["plain", variant], **QUIET)
    assert figures[variant]["images_per_second"] > 0 and figures[variant]["tflops_per_second"] > 0
    assert figures[variant]["parameters"] > figures["plain"]["parameters"]
    assert figures[variant]["forward_gflops"] > figures["plain"]["forward_gflops"]
    assert figures[variant]["forward_equivalents"] == figures["plain"]["forward_equivalents"] == 2 * 2 + 3


def test_accuracy_check_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "acc.json"
    results = speed.main(["--device", "cpu", "--variants", "none", "--eval-images", "0", "--accuracy-check",
                          "--acc-epochs", "1", "--acc-synthetic-size", "200", "--acc-synthetic-shape", "3,8,8",
                          "--acc-val-size", "50", "--eval-steps", "1", "--out", str(out)])
    check = results["accuracy_check"]
    assert [(r["run"], r["seed"], r["amp"], r["channels_last"]) for r in check["runs"]] == [
        ("fp32", 0, False, False), ("fast", 0, True, True), ("fp32", 1, False, False), ("fast", 1, True, True)]
    for r in check["runs"]:
        assert 0 <= r["val_clean"] <= 1 and 0 <= r["val_robust"] <= 1 and r["seconds"] > 0
    robust = {label: [r["val_robust"] for r in check["runs"] if r["run"] == label] for label in ("fp32", "fast")}
    assert check["mean_robust"]["fp32"] == pytest.approx(sum(robust["fp32"]) / 2)
    assert check["robust_difference"] == pytest.approx((sum(robust["fast"]) - sum(robust["fp32"])) / 2)
    assert check["seed_sd_robust"]["fast"] == pytest.approx(abs(robust["fast"][0] - robust["fast"][1]) / 2 ** 0.5)
    assert check["standard_error"] >= check["binomial_standard_error"] > 0
    assert check["within_noise"] == (abs(check["robust_difference"]) <= 2 * check["standard_error"])
    assert results["targets"][-1]["verdict"].split()[0] in ("PASS", "FAIL")
    assert results["variants"] == {} and results["evaluation"] == {}
    assert json.loads(out.read_text())["accuracy_check"]["runs"][1]["run"] == "fast"
    assert os.listdir(tmp_path) == ["acc.json"]  # the runs went to a temporary folder, now gone
    printed = capsys.readouterr().out
    assert "Accuracy check (fsr)" in printed and "timing round" not in printed


def test_mean_and_spread():
    assert speed.mean_and_spread([0.5]) == (0.5, None)
    mean, sd = speed.mean_and_spread([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and sd == pytest.approx(0.2)


def test_profile_summary_and_trace(tmp_path):
    args = tiny(tmp_path, variants="none", eval_images=0, profile=True, profile_variant="cifs", profile_steps=1,
                warmup=0, trace=True)
    prof = speed.run(args, **QUIET)["profile"]
    assert prof["attack_share"] + prof["update_share"] == pytest.approx(1.0)
    assert 0 < prof["attack_share"] < 1  # no wall-clock comparison (attack > update failed once under load)
    assert sum(prof["groups"].values()) == pytest.approx(1.0)
    assert 0 < prof["busy_share"] <= 1.05 and prof["ops_per_step"] > 10
    assert prof["mean_op_us"] == pytest.approx(prof["op_seconds"] * 1e6 / (prof["ops_per_step"] * prof["steps"]))
    assert "convolution" in prof["groups"] and "batch norm" in prof["groups"]
    assert prof["top_ops"] and prof["top_ops"][0]["self_ms"] >= prof["top_ops"][-1]["self_ms"]
    with open(prof["trace"]) as file:
        assert json.load(file)["traceEvents"]


def test_op_groups():
    assert speed.op_group("aten::mkldnn_convolution") == "convolution"
    assert speed.op_group("aten::convolution_backward") == "convolution"
    assert speed.op_group("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert speed.op_group("aten::native_batch_norm_backward") == "batch norm"
    assert speed.op_group("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float>") == "batch norm"
    assert speed.op_group("aten::addmm") == "matmul (linear)"
    assert speed.op_group("aten::threshold_backward") == "elementwise & reductions"
    assert speed.op_group("aten::_foreach_add_") == "optimizer"


def test_cli_flags_and_refusals():
    args = speed.parse_args([])
    assert (args.model, args.batch_size, args.strategy, args.attack_steps, args.steps, args.warmup) == \
        ("resnet18", 128, "at", 10, 20, 3)
    assert (args.num_workers, args.eval_images, args.eval_batch_size, args.out) == \
        (2, 10000, 500, "runs/benchmark/speed.json")
    assert args.reference_weight_grads is True and args.amp is False
    args = speed.parse_args(["--no-reference-weight-grads", "--amp", "--shape", "3,8,8", "--peak-tflops", "100"])
    assert args.reference_weight_grads is False and args.amp is True and args.shape == "3,8,8"
    resolved = speed.resolve(speed.Args(device="cpu"))
    assert resolved.shape == "3,32,32" and resolved.attack_step_size == pytest.approx(EPS / 4)
    with pytest.raises(ValueError, match="unknown --variants"):
        speed.resolve(speed.Args(device="cpu", variants="plain,bogus"))
    with pytest.raises(ValueError, match="10-class"):
        speed.resolve(speed.Args(device="cpu", dataset="cifar100", shape="3,16,16"))
    assert all(f.metadata["help"] for f in dataclasses.fields(speed.Args))
    for name in ("epsilon", "attack_step_size", "peak_tflops"):  # every float setting is refused unless finite
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} inf must be a finite number"):
            speed.resolve(speed.Args(device="cpu", **{name: float("inf")}))
    with pytest.raises(SystemExit, match="^error: --epsilon nan must be a finite number$"):
        speed.main(["--epsilon", "nan", "--device", "cpu"])


def test_importing_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("speed_fresh", os.path.join(REPO, "benchmarks", "speed.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "speed_fresh", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert capsys.readouterr().out == "" and os.listdir(tmp_path) == []


def test_op_counter_and_the_overheads_in_ops(tmp_path):
    """The counter counts dispatched aten ops (views apart) and casts; op_counts gives every variant in
    fp32 and bf16 with its overheads over plain; the count follows the attack's steps."""
    x = torch.ones(3)
    with speed.OpCounter() as counter:
        x.add(1).view(3).to(torch.float64)
    assert (counter.ops, counter.casts) == (2, 1)  # add, _to_copy; the view is not counted
    args = speed.resolve(tiny(tmp_path))
    counts = speed.op_counts(args, **QUIET)
    for precision, row in counts.items():
        for v in ("fsr", "cifs"):
            assert row[v]["ops"] > row["plain"]["ops"] > 0, precision
            assert row[v]["ops_overhead_percent"] == pytest.approx((row[v]["ops"] / row["plain"]["ops"] - 1) * 100)
            assert row[v]["forward_flops"] > row["plain"]["forward_flops"]
    assert counts["fp32"]["plain"]["attack_casts"] == 0 < counts["bf16"]["plain"]["attack_casts"]
    assert counts["bf16"]["plain"]["ops"] > counts["fp32"]["plain"]["ops"]  # the casts
    longer = speed.op_counts(dataclasses.replace(args, attack_steps=3), **QUIET)
    assert longer["fp32"]["plain"]["ops"] > counts["fp32"]["plain"]["ops"]
