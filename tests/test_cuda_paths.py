"""Every branch of fsr.py, cifs.py, models.py, attacks.py and evaluate.py that runs only on a GPU, and
the CPU test that executes the same code (issue 22: no GPU has run this code yet, so the first GPU
run must not be the first run of these paths). benchmarks/speed.py is not on the training scripts'
paths (they never import it); its own CUDA branches are listed at the end.

Forced on the CPU (the operation exists there; the tests below run the scripts' own code):
  * channels_last, default on with CUDA (run_support.device_settings: `device.type == 'cuda' if
    args.channels_last is None`), through train()'s model.to(memory_format=...) and
    DeviceLoader(channels_last=True): Args(channels_last=True, device='cpu') ->
    test_device_settings_forced_on_the_cpu, test_amp_channels_last_training_step (every method and
    strategy), test_amp_channels_last_run_resumes_bitwise.
  * uint8 data and crop/flip on the loader's device (DeviceLoader: the split moved to `device` once,
    the epoch generator created on it, crop_flip on uint8, then float/255 in the chosen memory
    format): the loader has no CUDA-specific line, device='cpu' runs all of it ->
    test_amp_channels_last_training_step (crop_flip + channels_last batches into the step);
    tests/test_data.py checks the crops, the pairs and the channels_last layout.
  * bf16 autocast (--amp: torch.autocast(device.type, bf16), the training attack and the update
    passes of training_step): torch.autocast('cpu', dtype=torch.bfloat16) is the same code ->
    test_amp_channels_last_training_step (fsr and cifs, every strategy: craft_adversarial runs
    pgd / trades_attack / mart_attack / fat_attack under it), test_training_attacks_under_bf16_autocast
    (the attacks.py functions directly), test_amp_channels_last_run_resumes_bitwise (a whole run);
    tests/test_attacks.py::test_attack_under_bf16_autocast_keeps_the_threat_model.
  * torch.compile (--compile: train() compiles the network the attack and the update passes run
    on) -> test_compiled_run_equals_the_eager_run (fsr and cifs),
    test_compiled_fsr_and_cifs_modules_match_eager. Backend 'aot_eager' (torch.compile itself,
    Dynamo capture and AOTAutograd forward/backward graphs; the tests replace torch.compile by
    functools.partial(torch.compile, backend='aot_eager')): the default inductor backend works on
    this CPU but compiling one training run took 78 s on the 2-core VM; inductor's code generation
    is therefore not exercised. Found a bug: cifs.py --compile failed on its first training step
    ("torch.compile with aot_autograd does not currently support double backward": the CIFS
    relevance was a gradient taken with create_graph in train mode); fixed first by running it
    outside the compiled graph, now by its closed form (CIFS.relevance), which compiles whole.
  * CUDA RNG state in checkpoints (rng_states: torch.cuda.get_rng_state when device.type == 'cuda',
    else None; restore_rng: torch.cuda.set_rng_state only on CUDA and only when saved) ->
    test_amp_channels_last_run_resumes_bitwise (entries (cpu state, None), resumed bitwise),
    test_rng_states_and_restore_with_a_cuda_entry (the CUDA branch selected with
    torch.device('cuda') and torch.cuda.get/set_rng_state recorded: a GPU checkpoint's entry survives
    save/load with weights_only=True, is restored on CUDA, ignored on the CPU; a CPU checkpoint's
    None is skipped on CUDA).
  * TF32 and cuDNN settings: run_support.device_settings calls set_tf32 (fp32 convolutions on a GPU run
    at PyTorch's default, torch.backends.cudnn.allow_tf32 = True, i.e. TF32 on Ampere and later,
    unless --strict-fp32: tests/test_evaluate.py sets and checks both flags on the CPU);
    seed_everything leaves them alone and sets cudnn.benchmark (True, or False with --deterministic, which also sets
    CUBLAS_WORKSPACE_CONFIG and deterministic algorithms) -> test_cudnn_and_tf32_settings.
  * CUDA memory figures (benchmarks/speed.py, which times the scripts' training steps: peak_memory_gib
    from torch.cuda.max_memory_allocated, guarded by device.type == 'cuda') -> test_benchmark_on_the_cpu_reports_no_peak_memory.
  * --device cuda on a machine without one (check_device) -> test_device_cuda_is_refused_without_a_gpu
    (and tests/test_runs.py).

Cannot run on a CPU:
  * NCCL (init_distributed and evaluate.py's device setup under torchrun: torch.cuda.set_device,
    init_process_group('nccl')): NCCL needs CUDA devices; the same code with gloo runs in
    tests/test_distributed.py.
  * DistributedDataParallel(device_ids=[device.index]) in data_parallel: device_ids name GPUs; the
    CPU form (device_ids=None) runs in tests/test_distributed.py.
  * The default device (run_support.pick_device, for the scripts and evaluate.py: 'cuda' when torch.cuda.is_available()) and
    LOCAL_RANK -> cuda:<LOCAL_RANK> under torchrun: choose a GPU; the CPU tests pass --device cpu.
  * torch.cuda.synchronize (benchmarks/speed.py) and
    torch.cuda.reset_peak_memory_stats: CUDA-only calls that only make the timings and peak figures
    right; no arithmetic depends on them.
  * torch.cuda.set_rng_state / get_rng_state themselves (recorded, not run, above).

benchmarks/speed.py, not on the training scripts' paths: peak memory (torch.cuda.empty_cache,
reset_peak_memory_stats, memory_allocated, max_memory_allocated), the GPU's peak TFLOP/s table read
from torch.cuda.get_device_name and cudnn.allow_tf32, CUDA profiler activity, the environment
report; tests/test_speed.py covers the GPU verdicts and the peak table with device names.
"""

import dataclasses
import functools
import os

import pytest
import torch
import torch.nn.functional as F

import attacks
import cifs
import fsr
import run_support
from benchmarks import speed
from data import DeviceLoader, make_synthetic
from models import build_model

QUIET = dict(log=lambda *a: None)
SCRIPTS = pytest.mark.parametrize("script", [fsr, cifs], ids=["fsr", "cifs"])


def tiny(script, tmp_path, **kw):
    settings = dict(dataset="synthetic", synthetic_shape="3,16,16", synthetic_size=40, device="cpu",
                    strategy="at", epochs=1, batch_size=20, attack_steps=1, eval_every=1, eval_steps=1,
                    log_interval=1e9, monitor_size=10, runs_dir=str(tmp_path), run_name="run")
    settings.update(kw)
    return script.Args(**settings)


# =============================================================================================
# device_settings, channels_last, bf16 autocast
# =============================================================================================


@SCRIPTS
def test_device_settings_forced_on_the_cpu(script):
    device, amp, autocast, memory_format = run_support.device_settings(script.Args(device="cpu"))
    assert (device.type, amp, memory_format) == ("cpu", False, torch.contiguous_format)  # CPU defaults
    with autocast():
        assert not torch.is_autocast_enabled("cpu")
    device, amp, autocast, memory_format = run_support.device_settings(
        script.Args(device="cpu", amp=True, channels_last=True))
    assert amp is True and memory_format == torch.channels_last
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16


def one_step(script, tmp_path, amp, strategy):
    """The network as train() builds it + one batch of a crop_flip DeviceLoader + the update of
    train()'s epoch loop (training_step, backward, SGD step)."""
    args = script.resolve(tiny(script, tmp_path, amp=amp, channels_last=True, strategy=strategy,
                               augment="crop_flip", attack_steps=2))
    run_support.check_args(args, script.METHOD_RANGES)
    script.check_method_args(args)
    device, _, autocast, memory_format = run_support.device_settings(args)
    run_support.seed_everything(args.seed, args.deterministic)
    model = script.build_network(args).to(device, memory_format=memory_format)
    update = script.UpdatePasses(model, args.strategy)
    loader = DeviceLoader(make_synthetic(10, (3, 16, 16), 40, seed=0, train=True), 20, device, augment="crop_flip",
                          padding=2, seed=0, channels_last=memory_format == torch.channels_last)
    assert loader.images.dtype == torch.uint8
    x, y = next(loader.epoch(0))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss, parts, logits = script.training_step(model, x, y, args, 0, autocast, update)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return model, before, loss, parts, logits


@SCRIPTS
@pytest.mark.parametrize("strategy", ["natural", "at", "trades", "mart", "fat"])
def test_amp_channels_last_training_step(tmp_path, script, strategy):
    model, before, loss, parts, logits = one_step(script, tmp_path, True, strategy)
    assert logits.dtype == torch.bfloat16  # the update pass really ran under bf16 autocast
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    after = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # fp32 master weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in after if p.dim() == 4)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    # The same step in fp32 (same seed: same weights, batch and attack noise) gives nearly the same loss.
    _, _, loss32, _, logits32 = one_step(script, tmp_path, False, strategy)
    assert logits32.dtype == torch.float32
    assert abs(loss.item() - loss32.item()) < 0.05 * abs(loss32.item()) + 0.02


@pytest.mark.parametrize("attack", ["pgd", "trades", "mart", "fat"])
def test_training_attacks_under_bf16_autocast(attack):
    """The training attacks of attacks.py inside torch.autocast(bf16), as craft_adversarial runs them
    with --amp: fp32 output in the budget and the box, and it does its job (measured in fp32)."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, (3, 16, 16)).eval()
    split = make_synthetic(10, (3, 16, 16), 32, seed=0, train=False)
    x, y = split.images.float() / 255, split.labels
    eps = 8 / 255
    run = {"pgd": lambda: attacks.pgd(model, x, y, eps, eps / 4, 3),
           "trades": lambda: attacks.trades_attack(model, x, eps, eps / 4, 3),
           "mart": lambda: attacks.mart_attack(model, x, y, eps, eps / 4, 3),
           "fat": lambda: attacks.fat_attack(model, x, y, eps, eps / 4, 3, tau=3)}[attack]
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = run()
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    torch.manual_seed(1)
    x_adv32 = run()

    @torch.no_grad()
    def objective(z):  # what the attack maximises, in fp32; TRADES: KL(p(x) || p(z))
        logits = model(z)[0]
        if attack == "trades":
            return F.kl_div(F.log_softmax(logits, 1), F.softmax(model(x)[0], 1), reduction="batchmean").item()
        return F.cross_entropy(logits, y).item()
    gain, gain32 = objective(x_adv) - objective(x), objective(x_adv32) - objective(x)
    assert gain32 > 0 and gain > 0.5 * gain32  # the bf16 attack is about as strong as the fp32 one


# =============================================================================================
# RNG state in checkpoints, resume
# =============================================================================================


class Interrupt(Exception):
    pass


@SCRIPTS
def test_amp_channels_last_run_resumes_bitwise(tmp_path, script):
    """--amp --channels-last (the GPU defaults but bf16) on the CPU: the checkpoint's RNG entries are
    (CPU state, None) and a resumed run equals an uninterrupted one."""
    settings = dict(epochs=2, amp=True, channels_last=True, monitor_size=0, augment="crop_flip")

    def interrupt(line):
        if line.startswith("epoch 1/"):
            raise Interrupt
    script.train(tiny(script, tmp_path, run_name="a", **settings), **QUIET)
    with pytest.raises(Interrupt):
        script.train(tiny(script, tmp_path, run_name="b", **settings), log=interrupt)
    middle = run_support.load_checkpoint(str(tmp_path / "b" / "last.pt"), script.METHOD)
    assert middle["epoch"] == 1 and len(middle["rng"]) == 1
    cpu_state, cuda_state = middle["rng"][0]
    assert cpu_state.dtype == torch.uint8 and cuda_state is None
    script.train(script.Args(resume=str(tmp_path / "b" / "last.pt"), device="cpu"), **QUIET)
    a = run_support.load_checkpoint(str(tmp_path / "a" / "last.pt"), script.METHOD)
    b = run_support.load_checkpoint(str(tmp_path / "b" / "last.pt"), script.METHOD)
    assert a["epoch"] == b["epoch"] == 2 and a["args"]["amp"] is True
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@SCRIPTS
def test_rng_states_and_restore_with_a_cuda_entry(tmp_path, monkeypatch, script):
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append((state, device)))
    gpu = torch.device("cuda", 0)
    states = run_support.rng_states(gpu)
    assert len(states) == 1 and torch.equal(states[0][0], torch.get_rng_state())
    assert torch.equal(states[0][1], cuda_state)
    # Through a checkpoint file, loaded as the scripts load it (weights_only=True).
    run_support.save_checkpoint({"rng": states}, str(tmp_path / "c.pt"))
    saved = run_support.read_torch_file(str(tmp_path / "c.pt"))["rng"]
    args = script.Args(seed=0)
    torch.manual_seed(123)
    run_support.restore_rng(saved, 0, 1, gpu, args, 1, QUIET["log"])
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == gpu
    assert torch.equal(torch.get_rng_state(), states[0][0])
    # A GPU checkpoint resumed on the CPU: the CUDA entry is not used, the CPU stream is restored.
    torch.manual_seed(123)
    run_support.restore_rng(saved, 0, 1, torch.device("cpu"), args, 1, QUIET["log"])
    assert len(restored) == 1 and torch.equal(torch.get_rng_state(), states[0][0])
    # A CPU checkpoint (None) resumed on a GPU: nothing to set on the GPU.
    run_support.restore_rng([(states[0][0], None)], 0, 1, gpu, args, 1, QUIET["log"])
    assert len(restored) == 1


# =============================================================================================
# torch.compile
# =============================================================================================


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend (see the module docstring: inductor is too slow here)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@SCRIPTS
def test_compiled_run_equals_the_eager_run(tmp_path, script, aot_eager):
    """--compile (with channels_last) through a whole TRADES run: attack, update, monitored PGD.
    cifs.py failed here while the CIFS relevance was a nested autograd.grad (double backward)."""
    args = tiny(script, tmp_path, strategy="trades", channels_last=True)
    compile_with_aot_eager, networks = torch.compile, []
    with pytest.MonkeyPatch.context() as patch:  # record what train() compiles
        patch.setattr(torch, "compile", lambda model: networks.append(compile_with_aot_eager(model)) or networks[-1])
        compiled = script.train(dataclasses.replace(args, compile=True, run_name="compiled"), **QUIET)
    assert len(networks) == 1 and isinstance(networks[0], torch._dynamo.eval_frame.OptimizedModule)
    eager = script.train(dataclasses.replace(args, run_name="eager"), **QUIET)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    a = run_support.load_checkpoint(str(tmp_path / "compiled" / "last.pt"), script.METHOD)["model"]
    b = run_support.load_checkpoint(str(tmp_path / "eager" / "last.pt"), script.METHOD)["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_compiled_fsr_and_cifs_modules_match_eager(aot_eager):
    """The inserted modules alone, compiled: the same output and input gradient as eager, in eval
    mode (deterministic) and, for CIFS, in train mode with labels (the probe learns through the mask)."""
    torch.manual_seed(0)
    feature = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3])
    for module, train in ((fsr.FSR(8, 10).eval(), False), (cifs.CIFS(8, 10).eval(), False),
                          (cifs.CIFS(8, 10).train(), True)):
        outputs = []
        for net in (module, torch.compile(module)):
            f = feature.clone().requires_grad_(True)
            out, emitted = net(f, labels if train else None)
            loss = out.square().sum() + sum(v.square().sum() for v in emitted.values())
            params = [p for p in module.parameters()]
            grads = torch.autograd.grad(loss, [f, *params], allow_unused=True)
            outputs.append((out.detach(), grads))
        (o1, g1), (o2, g2) = outputs
        assert torch.allclose(o1, o2, atol=1e-5)
        assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


# =============================================================================================
# cuDNN / TF32 flags, CUDA memory figures, --device cuda
# =============================================================================================


@SCRIPTS
def test_cudnn_and_tf32_settings(monkeypatch, script):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    run_support.seed_everything(0, deterministic=False)
    assert torch.backends.cudnn.benchmark is True and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32  # left at defaults
    try:
        run_support.seed_everything(0, deterministic=True)
        assert torch.backends.cudnn.benchmark is False and torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("variant", ["fsr", "cifs"])
def test_benchmark_on_the_cpu_reports_no_peak_memory(variant):
    """benchmarks/speed.py (which times the scripts' training steps): the CUDA memory figure is guarded."""
    args = speed.resolve(speed.Args(device="cpu", model="smallcnn", shape="3,16,16", batch_size=8, attack_steps=1,
                                    steps=1, warmup=1, amp=True, channels_last=True, eval_images=0))
    result = speed.time_variants(args, [variant], **QUIET)[variant]
    assert result["peak_memory_gib"] is None and result["images_per_second"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@SCRIPTS
def test_device_cuda_is_refused_without_a_gpu(script):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run_support.check_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run_support.check_device("cuda:1")
