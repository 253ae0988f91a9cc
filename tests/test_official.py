"""Reading state dicts saved by the authors' code: fsr.official_state_dict and cifs.official_state_dict.

Each official layout below is written out from the official model files (key names and shapes):
wkim97/FSR models/resnet_fsr.py, vgg_fsr.py, wideresnet34_fsr.py (train.py saves `net.state_dict()`)
and HanshuYAN/CIFS models/nets/resnet_CIFS.py (CIFAR10_Res18_CIFS.py saves {"state_dict": ...}).
Every tensor is distinct, so a tensor that lands in the wrong place is caught.
"""

import pytest
import torch

import cifs
import run_support
import fsr

WIDTHS = (64, 128, 256, 512)


# --- the official layouts: key -> shape ----------------------------------------------------------

def batchnorm(prefix: str, channels: int) -> dict:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def official_resnet18(num_classes: int = 10, cifs_probes: bool = False) -> dict:
    """`ResNet(BasicBlock, [2, 2, 2, 2])` of resnet_fsr.py / resnet.py; with cifs_probes, `ResNet_L4` of
    resnet_CIFS.py, whose layer4 blocks carry `Probe = CSAFR(512, 10, mode)`: 'nonlinear' then 'linear'."""
    keys = {"conv1.weight": (64, 3, 3, 3)} | batchnorm("bn1", 64)
    cin = 64
    for layer, (width, stride) in enumerate(zip(WIDTHS, (1, 2, 2, 2)), 1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys |= {f"{p}.conv1.weight": (width, cin, 3, 3)} | batchnorm(f"{p}.bn1", width)
            keys |= {f"{p}.conv2.weight": (width, width, 3, 3)} | batchnorm(f"{p}.bn2", width)
            if cifs_probes and layer == 4 and block == 0:  # nlBlock(512, 128) = fc + Softplus, then Linear(128, 10)
                keys |= {f"{p}.Probe.Probe.0.fc.weight": (128, 512), f"{p}.Probe.Probe.0.fc.bias": (128,),
                         f"{p}.Probe.Probe.1.weight": (10, 128), f"{p}.Probe.Probe.1.bias": (10,)}
            if cifs_probes and layer == 4 and block == 1:  # Global_Avg_Flatten, then Linear(512, 10)
                keys |= {f"{p}.Probe.Probe.1.weight": (10, 512), f"{p}.Probe.Probe.1.bias": (10,)}
            if block == 0 and (stride != 1 or cin != width):
                keys |= {f"{p}.shortcut.0.weight": (width, cin, 1, 1)} | batchnorm(f"{p}.shortcut.1", width)
            cin = width
    return keys | {"linear.weight": (num_classes, 512), "linear.bias": (num_classes,)}


def official_fsr_module(channels: int, num_classes: int) -> dict:
    """`Separation.sep_net` and `Recalibration.rec_net` (conv-BN-ReLU, conv-BN-ReLU, conv; no conv bias)
    and `aux = Sequential(Linear(C, K))`, identical in the three official FSR model files."""
    keys = {}
    for prefix in ("separation.sep_net", "recalibration.rec_net"):
        keys |= {f"{prefix}.0.weight": (64, channels, 3, 3)} | batchnorm(f"{prefix}.1", 64)
        keys |= {f"{prefix}.3.weight": (64, 64, 3, 3)} | batchnorm(f"{prefix}.4", 64)
        keys |= {f"{prefix}.6.weight": (channels, 64, 3, 3)}
    return keys | {"aux.0.weight": (num_classes, channels), "aux.0.bias": (num_classes,)}


def official_vgg16(num_classes: int = 10) -> dict:
    """`VGG` of vgg_fsr.py: block0..block4 = Sequential(conv (bias), BN, ReLU, ...); pools without parameters."""
    keys, cin = {}, 3
    for b, stage in enumerate(((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))):
        for i, cout in enumerate(stage):
            keys |= {f"block{b}.{3 * i}.weight": (cout, cin, 3, 3), f"block{b}.{3 * i}.bias": (cout,)}
            keys |= batchnorm(f"block{b}.{3 * i + 1}", cout)
            cin = cout
    for index, (out, inp) in zip((0, 2, 4), ((512, 512), (512, 512), (num_classes, 512))):
        keys |= {f"classifier.{index}.weight": (out, inp), f"classifier.{index}.bias": (out,)}
    return keys


def official_network_block(name: str, blocks: int, cin: int, cout: int) -> dict:
    """`NetworkBlock(n, cin, cout, BasicBlock)` of wideresnet34_fsr.py: `<name>.layer.<j>`."""
    keys = {}
    for j in range(blocks):
        p, inp = f"{name}.layer.{j}", cin if j == 0 else cout
        keys |= batchnorm(f"{p}.bn1", inp) | {f"{p}.conv1.weight": (cout, inp, 3, 3)}
        keys |= batchnorm(f"{p}.bn2", cout) | {f"{p}.conv2.weight": (cout, cout, 3, 3)}
        if inp != cout:
            keys[f"{p}.convShortcut.weight"] = (cout, inp, 1, 1)
    return keys


def official_wrn34_10(num_classes: int = 10) -> dict:
    """`WideResNet(34, widen_factor=10)` of wideresnet34_fsr.py, with its unused `sub_block1`."""
    keys = {"conv1.weight": (16, 3, 3, 3)}
    keys |= official_network_block("block1", 5, 16, 160)
    keys |= official_network_block("sub_block1", 5, 16, 160)
    keys |= official_network_block("block2", 5, 160, 320)
    keys |= official_network_block("block3", 5, 320, 640)
    return keys | batchnorm("bn1", 640) | {"fc.weight": (num_classes, 640), "fc.bias": (num_classes,)}


def filled(layout: dict, seed: int = 0) -> dict:
    """Distinct random tensors of the layout's shapes (counters: distinct integers)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.tensor(i, dtype=torch.long) if key.endswith("num_batches_tracked")
            else torch.randn(shape, generator=generator) for i, (key, shape) in enumerate(layout.items())}


# --- the supported models -----------------------------------------------------------------------

def fsr_args(model, **overrides):
    return fsr.resolve(fsr.Args(dataset="cifar10", model=model, **overrides))


def cifs_args(**overrides):
    settings = dict(dataset="cifar10", model="resnet18", positions="layer4.0,layer4.1", probes="mlp,linear", hidden=128,
                    mask_fn="softmax", softmax_scale=2.0, top_k=2, official_softmax_scale=2.0)
    return cifs.resolve(cifs.Args(**(settings | overrides)))


CASES = {
    # name: (official layout, method module, args, {official key: our module path + parameter})
    "fsr_resnet18": (lambda: official_resnet18() | official_fsr_module(512, 10), fsr, lambda: fsr_args("resnet18"), {
        "conv1.weight": "stem.0.weight", "bn1.running_var": "stem.1.running_var",
        "layer2.1.conv2.weight": "layer2.1.conv2.weight", "layer3.0.shortcut.1.bias": "layer3.0.shortcut.1.bias",
        "linear.weight": "classifier.weight", "linear.bias": "classifier.bias",
        "separation.sep_net.0.weight": "inserted.layer4_1.separation.0.weight",
        "separation.sep_net.4.running_mean": "inserted.layer4_1.separation.4.running_mean",
        "recalibration.rec_net.6.weight": "inserted.layer4_1.recalibration.6.weight",
        "aux.0.weight": "inserted.layer4_1.head.weight", "aux.0.bias": "inserted.layer4_1.head.bias"}),
    "fsr_vgg16": (lambda: official_vgg16() | official_fsr_module(512, 10), fsr, lambda: fsr_args("vgg16"), {
        "block0.0.weight": "stage1.0.weight", "block0.0.bias": "stage1.0.bias",
        "block2.4.running_var": "stage3.4.running_var", "block3.6.weight": "stage4.6.weight",
        "block4.7.weight": "stage5.7.weight", "classifier.4.weight": "classifier.4.weight",
        "separation.sep_net.0.weight": "inserted.stage4.separation.0.weight",
        "recalibration.rec_net.6.weight": "inserted.stage4.recalibration.6.weight",
        "aux.0.weight": "inserted.stage4.head.weight"}),
    "fsr_wrn34_10": (lambda: official_wrn34_10() | official_fsr_module(640, 10), fsr, lambda: fsr_args("wrn34_10"), {
        "conv1.weight": "stem.weight", "block1.layer.0.convShortcut.weight": "block1.0.shortcut.weight",
        "block2.layer.3.conv1.weight": "block2.3.conv1.weight", "block3.layer.4.bn2.running_mean": "block3.4.bn2.running_mean",
        "bn1.weight": "final.0.weight", "fc.weight": "classifier.weight",
        "separation.sep_net.0.weight": "inserted.final.separation.0.weight",
        "recalibration.rec_net.6.weight": "inserted.final.recalibration.6.weight",
        "aux.0.bias": "inserted.final.head.bias"}),
    "cifs_resnet18": (lambda: official_resnet18(cifs_probes=True), cifs, cifs_args, {
        "conv1.weight": "stem.0.weight", "layer2.1.conv2.weight": "layer2.1.conv2.weight",
        "layer4.0.conv1.weight": "layer4.0.conv1.weight", "linear.weight": "classifier.weight",
        "layer4.0.Probe.Probe.0.fc.weight": "inserted.layer4_0.head.0.weight",
        "layer4.0.Probe.Probe.1.bias": "inserted.layer4_0.head.2.bias",
        "layer4.1.Probe.Probe.1.weight": "inserted.layer4_1.head.0.weight"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_official_state_dict_loads_strictly_and_every_tensor_lands_in_its_place(case):
    layout, method, make_args, places = CASES[case]
    official = filled(layout())
    args = make_args()
    ours, notes = method.official_state_dict(official, args)
    torch.manual_seed(0)
    net = method.build_network(args)
    net.load_state_dict(ours, strict=True)
    loaded = net.state_dict()
    for official_key, our_key in places.items():
        assert torch.equal(loaded[our_key], official[official_key]), (official_key, our_key)
    # A bijection: each of our tensors is a different official tensor, and every official tensor
    # except the dropped block is used.
    used = {id(tensor) for tensor in ours.values()}
    kept = [k for k in official if not k.startswith("sub_block1.")]
    assert len(used) == len(ours) == len(loaded) == len(kept)
    assert used == {id(official[k]) for k in kept}
    assert notes[-1].startswith(f"mapped {len(kept)} tensors")


def test_wrn34_10_drops_the_61_unused_sub_block1_keys_and_says_so():
    layout = official_wrn34_10() | official_fsr_module(640, 10)
    assert sum(k.startswith("sub_block1.") for k in layout) == 61
    ours, notes = fsr.official_state_dict(filled(layout), fsr_args("wrn34_10"))
    assert not any("sub_block1" in k for k in ours)
    assert any("dropped 61 official keys sub_block1.*" in n and "2,102,112 parameters" in n for n in notes), notes


# --- wrappers the official scripts produce ------------------------------------------------------

def test_the_cifs_script_checkpoint_dict_round_trips_through_torch_save(tmp_path):
    state = filled(official_resnet18(cifs_probes=True))
    weight = state["conv1.weight"]
    checkpoint = {"state_dict": state, "stop_epoch": 119,
                  "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.001, "params": [0]}]}}
    torch.save(checkpoint, tmp_path / "ckp_latest.pt")
    loaded = torch.load(tmp_path / "ckp_latest.pt", map_location="cpu", weights_only=True)
    ours, notes = cifs.official_state_dict(loaded, cifs_args())
    assert torch.equal(ours["stem.0.weight"], weight)
    assert "read the checkpoint's 'state_dict' entry (saved at stop_epoch 119)" in notes


def test_a_dataparallel_prefix_is_removed():
    state = {"module." + k: v for k, v in filled(official_resnet18() | official_fsr_module(512, 10)).items()}
    ours, notes = fsr.official_state_dict(state, fsr_args("resnet18"))
    assert torch.equal(ours["classifier.weight"], state["module.linear.weight"])
    assert any("'module.'" in n for n in notes)


def test_a_checkpoint_without_batchnorm_counters_loads_with_a_note():
    state = {k: v for k, v in filled(official_resnet18() | official_fsr_module(512, 10)).items()
             if not k.endswith("num_batches_tracked")}
    ours, notes = fsr.official_state_dict(state, fsr_args("resnet18"))
    fsr.build_network(fsr_args("resnet18")).load_state_dict(ours, strict=True)
    assert int(ours["stem.1.num_batches_tracked"]) == 0
    assert any("num_batches_tracked" in n and "set to 0" in n for n in notes)


def test_the_cifs_scripts_vanilla_resnet18_loads_with_no_cifs():
    state = filled(official_resnet18())  # CIFAR10_Res18_CIFS.py --network _ (models/nets/resnet_.py)
    args = cifs_args(no_cifs=True)
    ours, _ = cifs.official_state_dict(state, args)
    cifs.build_network(args).load_state_dict(ours, strict=True)


def test_cifs_notes_mask_settings_other_than_the_official_module():
    state = filled(official_resnet18(cifs_probes=True))
    _, official_notes = cifs.official_state_dict(state, cifs_args(softmax_scale=2.0))
    _, other_notes = cifs.official_state_dict(state, cifs_args(softmax_scale=1.0))
    assert not any("softmax_scale" in n for n in official_notes)
    assert any("softmax_scale=1" in n and "differ" in n for n in other_notes)


# --- refusals: one line, naming what does not fit ----------------------------------------------

def resnet18_case(method: str, **overrides):
    """(a filled official ResNet-18 state dict of the method, its official_state_dict, our args)."""
    if method == "fsr":
        args = fsr_args(**({"model": "resnet18"} | overrides))
        return filled(official_resnet18() | official_fsr_module(512, 10)), fsr.official_state_dict, args
    return filled(official_resnet18(cifs_probes=True)), cifs.official_state_dict, cifs_args(**overrides)


def one_line_error(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("method", ["fsr", "cifs"])
def test_an_unknown_official_key_is_an_error_naming_it(method):
    state, call, args = resnet18_case(method)
    state["layer4.1.attention.weight"] = torch.zeros(3)
    message = one_line_error(lambda: call(state, args))
    assert "1 key(s)" in message and "'layer4.1.attention.weight'" in message


@pytest.mark.parametrize("method", ["fsr", "cifs"])
def test_a_missing_official_key_is_an_error_naming_our_key(method):
    state, call, args = resnet18_case(method)
    absent, ours = {"fsr": ("recalibration.rec_net.4.weight", "inserted.layer4_1.recalibration.4.weight"),
                    "cifs": ("layer4.1.Probe.Probe.1.bias", "inserted.layer4_1.head.0.bias")}[method]
    del state[absent]
    message = one_line_error(lambda: call(state, args))
    assert "1 key(s) of our network" in message and repr(ours) in message


def test_many_unknown_keys_are_counted_and_the_first_named():
    state = filled(official_resnet18() | official_fsr_module(512, 10))
    state |= {f"extra.{i}.weight": torch.zeros(1) for i in range(9)}
    message = one_line_error(lambda: fsr.official_state_dict(state, fsr_args("resnet18")))
    assert "'extra.0.weight'" in message and "(9 in all)" in message


def test_a_wrong_class_count_is_refused():
    state = filled(official_resnet18(num_classes=100) | official_fsr_module(512, 100))
    message = one_line_error(lambda: fsr.official_state_dict(state, fsr_args("resnet18")))
    assert "100 classes" in message and "'linear.weight'" in message and "this network 10" in message
    # The same checkpoint for a 100-class dataset loads.
    fsr.official_state_dict(state, fsr.resolve(fsr.Args(dataset="cifar100", model="resnet18")))
    # The official CIFS ResNet-18 has 10 classes written into its code: a 100-class network cannot hold it.
    cifs_state = filled(official_resnet18(cifs_probes=True))
    message = one_line_error(lambda: cifs.official_state_dict(cifs_state, cifs_args(dataset="cifar100")))
    assert "10 classes" in message and "'cifar100' has 100" in message


def test_a_shape_mismatch_names_the_key_and_both_shapes():
    state = filled(official_resnet18(cifs_probes=True))
    message = one_line_error(lambda: cifs.official_state_dict(state, cifs_args(hidden=240)))
    assert "'layer4.0.Probe.Probe.0.fc.weight'" in message and "'inserted.layer4_0.head.0.weight'" in message
    assert "(128, 512) in the checkpoint, (240, 512) here" in message


@pytest.mark.parametrize("method, overrides, expected", [
    ("fsr", dict(model="wrn28_10"), "no 'wrn28_10'"),
    ("fsr", dict(positions="layer3,layer4"), "one FSR module at 'layer4'"),
    ("fsr", dict(no_recalibration=True), "--no-recalibration"),
    ("cifs", dict(model="wrn28_10"), "trains resnet18"),
    ("cifs", dict(probes="linear,linear"), "MLP probe after layer4.0"),
])
def test_layouts_the_official_code_does_not_have_are_refused(method, overrides, expected):
    state, call, args = resnet18_case(method, **overrides)
    assert expected in one_line_error(lambda: call(state, args))


def test_something_that_is_not_a_state_dict_is_refused():
    message = one_line_error(lambda: fsr.official_state_dict({"epoch": 3}, fsr_args("resnet18")))
    assert "not a state dict" in message


def test_init_from_reads_an_official_checkpoint(tmp_path):
    """--init-from with the CIFS script's checkpoint: the run starts from the authors' weights (a
    learning rate of 1e-30 leaves them in place for the comparison) and says what it read."""
    state = filled(official_resnet18(cifs_probes=True))
    torch.save({"state_dict": state, "stop_epoch": 0, "optimizer": {}}, tmp_path / "ckp_latest.pt")
    lines = []
    cifs.train(cifs.Args(dataset="synthetic", model="resnet18", synthetic_size=20, batch_size=10, epochs=1,
                         strategy="natural", lr=1e-30, momentum=0.0, weight_decay=0.0, monitor_size=0,
                         device="cpu", init_from=str(tmp_path / "ckp_latest.pt"), official_softmax_scale=2.0,
                         runs_dir=str(tmp_path), run_name="warm", log_interval=1e9), log=lines.append)
    warm = run_support.load_checkpoint(str(tmp_path / "warm" / "last.pt"), "cifs")["model"]
    assert torch.equal(warm["stem.0.weight"], state["conv1.weight"])
    assert torch.equal(warm["inserted.layer4_1.head.0.weight"], state["layer4.1.Probe.Probe.1.weight"])
    assert any(line.startswith("--init-from: read the checkpoint's 'state_dict' entry") for line in lines)
    assert any(line.startswith("initialised the weights from") for line in lines)


def test_pgd_iterates_equal_the_official_delta_arithmetic(robust_model, synthetic):
    """The official attacks (advertorch in both repositories) update a perturbation delta, clip it,
    and rebuild x_adv = x + (clamp(x + delta, 0, 1) - x) at every step; ours update x_adv and
    project it. Same start, same model: the iterates may differ in the last bit (measured on these
    500 images: 0.02 % of entries, by at most 1.5e-8), never by more than 1e-6 here, and the
    accuracy is the same."""
    import attacks
    from conftest import EPS, accuracy
    model, x, y = robust_model, synthetic[2], synthetic[3]
    step, steps = EPS / 10, 20
    ours = attacks.pgd(model, x, y, EPS, step, steps, random_start_kind=None)
    with attacks.attack_mode(model):
        delta = torch.zeros_like(x)
        for _ in range(steps):
            x_adv = (x + delta).requires_grad_(True)
            (grad,) = torch.autograd.grad(attacks.cross_entropy_loss(model(x_adv), y).sum(), x_adv)
            delta = (delta + step * grad.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(0, 1) - x
    official = x + delta
    assert (ours - official).abs().max() <= 1e-6
    assert accuracy(model, ours, y) == accuracy(model, official, y)


def test_evaluate_reads_an_official_checkpoint_given_method_backbone_and_dataset(tmp_path):
    """evaluate.py --official fsr: an official train.py state dict, evaluated like our checkpoints
    (synthetic 3x32x32 data stands in for CIFAR-10 here, which the tests cannot download)."""
    import evaluate
    torch.save(filled(official_resnet18() | official_fsr_module(512, 10)), tmp_path / "fsr_resnet18.pth")
    flags = ["--device", "cpu", "--n-examples", "10", "--attacks", "natural", "--log-interval", "1e9",
             "--out", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as raised:  # without --official: one line saying what to pass
        evaluate.main([str(tmp_path / "fsr_resnet18.pth"), *flags])
    assert "--official fsr" in str(raised.value.code)
    (result,) = evaluate.main([str(tmp_path / "fsr_resnet18.pth"), *flags, "--official", "fsr",
                               "--official-dataset", "synthetic"])
    assert result["method"] == "fsr" and result["run"]["model"] == "resnet18" and len(result["labels"]) == 10
    model = evaluate.load_model(str(tmp_path / "fsr_resnet18.pth"), official="fsr", dataset="synthetic")
    assert torch.equal(model.model.classifier.weight, torch.load(tmp_path / "fsr_resnet18.pth")["linear.weight"])


# --- the official CIFS mask scale: 1 (released resnet_CIFS.py) or 2 (first public one), stated by the user ----

SCALE_1_X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def official_bn(state, prefix, x):
    return torch.nn.functional.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                                          state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.1, 1e-5)


def official_probe_logits(state, prefix, feat):
    """`CIFS.Probe` (`CSAFR.Probe` in the first file): Global_Avg_Flatten then Linear, or nlBlock
    (GAP, fc, Softplus(beta=5)) then Linear(128, 10)."""
    u = torch.nn.functional.adaptive_avg_pool2d(feat, (1, 1)).flatten(1)
    if f"{prefix}.Probe.0.fc.weight" in state:
        u = torch.nn.functional.softplus(
            torch.nn.functional.linear(u, state[f"{prefix}.Probe.0.fc.weight"], state[f"{prefix}.Probe.0.fc.bias"]), beta=5)
    return torch.nn.functional.linear(u, state[f"{prefix}.Probe.1.weight"], state[f"{prefix}.Probe.1.bias"])


def official_mask(state, prefix, feat, scale):
    """`_get_mask_with_graph` in eval mode, as HanshuYAN/CIFS models/nets/resnet_CIFS.py writes it: the
    gradient of the top-1 plus top-2 probe logits w.r.t. a detached copy of the feature map,
    adaptive_avg_pool2d(.) * H * W, softmax over channels, times `scale` (1 in the released file,
    `* 2` in the first public one)."""
    n, c = feat.shape[:2]
    feat = feat.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = official_probe_logits(state, prefix, feat)
        pred = logits.topk(k=2, dim=1)[1]
        rows = torch.arange(n)
        top = logits[rows, pred[:, 0]].sum() + logits[rows, pred[:, 1]].sum()
        grad = torch.autograd.grad(top, feat)[0]
    grad = torch.nn.functional.adaptive_avg_pool2d(grad, (1, 1)) * grad.size(2) * grad.size(3)
    return (torch.nn.functional.softmax(grad.view(n, c), dim=1) * scale).view(n, c, 1, 1)


def official_resnet18_l4_logits(state, x, scale):
    """`ResNet18_L4` of resnet_CIFS.py in eval mode (written out here from the official file), on a
    state dict in the official layout: stem, layer1-3 of BasicBlocks, both layer4 blocks followed by
    their CIFS module (`masked_feat = feat * Mask`), avg_pool2d(4), linear. Without probe keys: the
    vanilla `ResNet18` of resnet_.py."""
    conv = torch.nn.functional.conv2d
    relu = torch.nn.functional.relu
    out = relu(official_bn(state, "bn1", conv(x, state["conv1.weight"], padding=1)))
    for layer, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for block in range(2):
            p, s = f"layer{layer}.{block}", stride if block == 0 else 1
            feat = relu(official_bn(state, f"{p}.bn1", conv(out, state[f"{p}.conv1.weight"], stride=s, padding=1)))
            feat = official_bn(state, f"{p}.bn2", conv(feat, state[f"{p}.conv2.weight"], padding=1))
            shortcut = out
            if f"{p}.shortcut.0.weight" in state:
                shortcut = official_bn(state, f"{p}.shortcut.1", conv(out, state[f"{p}.shortcut.0.weight"], stride=s))
            out = relu(feat + shortcut)
            if f"{p}.Probe.Probe.1.weight" in state:
                out = out * official_mask(state, f"{p}.Probe", out, scale)
    out = torch.nn.functional.avg_pool2d(out, 4).flatten(1)
    return torch.nn.functional.linear(out, state["linear.weight"], state["linear.bias"])


def trained_like(layout: dict, seed: int = 0) -> dict:
    """A state dict of the layout on which an eval-mode forward neither explodes nor collapses to a
    constant: He-scaled convolutions, BatchNorm with positive variances and zero means and shifts (so
    the features stay input-dependent after the masks shrink them), sharper probes (so the masks are
    not flat), and the classifier rescaled to logits of unit spread (the mask scale then moves them
    visibly)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("running_mean") or (key.endswith(".bias") and ".Probe." not in key and key != "linear.bias"):
            state[key] = torch.zeros(shape)
        elif key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # BatchNorm weight
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:  # conv and linear weights
            fan_in = torch.Size(shape[1:]).numel()
            gain = 50.0 if ".Probe." in key else 2.0
            state[key] = torch.randn(shape, generator=generator) * (gain / fan_in) ** 0.5
    logits = official_resnet18_l4_logits(state, SCALE_1_X, scale=1.0) - state["linear.bias"]
    state["linear.weight"] = state["linear.weight"] / logits.std()
    return state



@pytest.fixture(scope="module")
def scale_1_file(tmp_path_factory):
    """An official-layout CIFS ResNet-18 saved as CIFAR10_Res18_CIFS.py saves it, and the logits of
    the official scale-1 network (the released resnet_CIFS.py) on SCALE_1_X."""
    state = trained_like(official_resnet18(cifs_probes=True))
    path = tmp_path_factory.mktemp("official") / "ckp_latest.pt"
    torch.save({"state_dict": state, "stop_epoch": 119, "optimizer": {}}, path)
    reference = official_resnet18_l4_logits(state, SCALE_1_X, scale=1.0)
    # The test can fail: the scale-2 network's logits differ from the scale-1 network's.
    assert (official_resnet18_l4_logits(state, SCALE_1_X, scale=2.0) - reference).abs().max() > 0.1
    return path, state, reference


def test_a_scale_1_file_read_by_official_state_dict_gives_the_official_logits(scale_1_file):
    _, state, reference = scale_1_file
    args = cifs.resolve(cifs.Args(dataset="synthetic", model="resnet18", official_softmax_scale=1.0))
    assert args.softmax_scale == 1.0  # the stated scale is the network's unless --softmax-scale says otherwise
    ours, notes = cifs.official_state_dict({"state_dict": state}, args)
    assert not any("differ" in n for n in notes)
    net = cifs.build_network(args)
    net.load_state_dict(ours, strict=True)
    torch.testing.assert_close(net.eval()(SCALE_1_X)[0], reference, rtol=1e-5, atol=1e-5)
    # Read at scale 2 (the former behaviour): other logits, and the note says so against the stated 1.
    wrong = cifs.resolve(cifs.Args(dataset="synthetic", model="resnet18", official_softmax_scale=1.0, softmax_scale=2.0))
    _, notes = cifs.official_state_dict({"state_dict": state}, wrong)
    assert any("1 * softmax" in n and "softmax_scale=2" in n and "differ" in n for n in notes), notes


def test_a_scale_1_file_through_evaluate_gives_the_official_logits_and_is_labelled_official(scale_1_file, tmp_path):
    import evaluate
    path, _, reference = scale_1_file
    model = evaluate.load_model(str(path), official="cifs", dataset="synthetic", softmax_scale=1)
    with torch.no_grad():
        torch.testing.assert_close(model(SCALE_1_X), reference, rtol=1e-5, atol=1e-5)
    flags = [str(path), "--device", "cpu", "--n-examples", "10", "--attacks", "natural", "--log-interval", "1e9",
             "--official", "cifs", "--official-dataset", "synthetic", "--no-through-mask"]
    # Unknown scale: refused in one line naming the flag, before anything is written.
    with pytest.raises(SystemExit) as raised:
        evaluate.main([*flags, "--out", str(tmp_path / "refused")])
    message = str(raised.value.code)
    assert "--official-softmax-scale 1" in message and "\n" not in message and not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit) as raised:
        evaluate.main([*flags, "--official-softmax-scale", "3", "--out", str(tmp_path / "refused")])
    assert "--official-softmax-scale 3" in str(raised.value.code)
    (result,) = evaluate.main([*flags, "--official-softmax-scale", "1", "--out", str(tmp_path / "eval")])
    assert result["official"].startswith("HanshuYAN/CIFS CIFAR10_Res18_CIFS.py, mask 1 x softmax (the released")
    assert result["run"]["official"] == result["official"] and result["run"]["softmax_scale"] == 1.0
    assert "epochs" not in result["run"] and "seed" not in result["run"] and "strategy" not in result["run"]
    assert result["protocol"]["precision"] == "fp32"  # CPU
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "official CIFS resnet18 (HanshuYAN/CIFS CIFAR10_Res18_CIFS.py, mask 1 x softmax" in table
    assert "seed" not in table.splitlines()[2]


def test_a_scale_1_file_through_init_from_gives_the_official_logits(scale_1_file, tmp_path):
    """--init-from with --official-softmax-scale 1: the run's network is the scale-1 network (a learning
    rate of 1e-30 leaves the weights in place; BatchNorm statistics are restored from the file)."""
    path, _, reference = scale_1_file
    settings = dict(dataset="synthetic", model="resnet18", synthetic_size=20, batch_size=10, epochs=1,
                    strategy="natural", lr=1e-30, momentum=0.0, weight_decay=0.0, monitor_size=0, device="cpu",
                    init_from=str(path), runs_dir=str(tmp_path), log_interval=1e9)
    with pytest.raises(ValueError, match="--official-softmax-scale 1"):  # unknown scale: refused, nothing written
        cifs.train(cifs.Args(**settings, run_name="refused"), log=lambda *_: None)
    assert not (tmp_path / "refused").exists()
    cifs.train(cifs.Args(**settings, run_name="warm", official_softmax_scale=1.0), log=lambda *_: None)
    checkpoint = run_support.load_checkpoint(str(tmp_path / "warm" / "last.pt"), "cifs")
    args = run_support.args_from_checkpoint(cifs.Args, checkpoint["args"], "last.pt", "cifs")
    assert args.softmax_scale == 1.0
    net = cifs.build_network(args)
    state = checkpoint["model"]
    # One natural epoch in train mode moved the BatchNorm running statistics; put the file's back.
    official, _ = cifs.official_state_dict(torch.load(path), args)
    state = {k: official[k] if k.endswith(("running_mean", "running_var")) else v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    torch.testing.assert_close(net.eval()(SCALE_1_X)[0], reference, rtol=1e-5, atol=1e-5)


def test_official_softmax_scale_is_refused_without_init_from_or_outside_1_and_2():
    for overrides, expected in ((dict(), "add --init-from"), (dict(init_from="x.pt", official_softmax_scale=3.0), "1 (the released")):
        args = cifs.resolve(cifs.Args(**({"official_softmax_scale": 1.0} | overrides)))
        assert expected in one_line_error(lambda: (run_support.check_args(args, cifs.METHOD_RANGES), cifs.check_method_args(args)))


def test_evaluate_reads_the_official_cifs_vanilla_resnet18_and_labels_it(tmp_path):
    """CIFAR10_Res18_CIFS.py --network _ (models/nets/resnet_.py): the backbone keys without probes;
    read as the vanilla network (no scale needed), labelled as that official file."""
    import evaluate
    state = trained_like(official_resnet18())
    torch.save({"state_dict": state, "stop_epoch": 119, "optimizer": {}}, tmp_path / "vanilla.pt")
    model = evaluate.load_model(str(tmp_path / "vanilla.pt"), official="cifs", dataset="synthetic")
    with torch.no_grad():
        torch.testing.assert_close(model(SCALE_1_X), official_resnet18_l4_logits(state, SCALE_1_X, 1.0),
                                   rtol=1e-5, atol=1e-5)
    (result,) = evaluate.main([str(tmp_path / "vanilla.pt"), "--device", "cpu", "--n-examples", "10", "--attacks",
                               "natural", "--log-interval", "1e9", "--official", "cifs", "--official-dataset",
                               "synthetic", "--out", str(tmp_path / "eval")])
    assert result["run"]["no_cifs"] is True and "--network _" in result["official"]


def test_evaluate_builds_an_official_fsr_file_with_the_stated_tau(tmp_path):
    import evaluate
    torch.save(filled(official_resnet18() | official_fsr_module(512, 10)), tmp_path / "fsr.pth")
    default = evaluate.load_model(str(tmp_path / "fsr.pth"), official="fsr", dataset="synthetic")
    stated = evaluate.load_model(str(tmp_path / "fsr.pth"), official="fsr", dataset="synthetic", tau=0.5)
    taus = [[m.tau for m in model.modules() if isinstance(m, fsr.FSR)] for model in (default, stated)]
    assert taus == [[0.1], [0.5]]
    (result,) = evaluate.main([str(tmp_path / "fsr.pth"), "--device", "cpu", "--n-examples", "10", "--attacks",
                               "natural", "--log-interval", "1e9", "--official", "fsr", "--official-dataset",
                               "synthetic", "--official-tau", "0.5", "--out", str(tmp_path / "eval")])
    assert result["run"]["tau"] == 0.5 and result["official"] == "wkim97/FSR train.py, tau 0.5"
    with pytest.raises(SystemExit) as raised:
        evaluate.main([str(tmp_path / "fsr.pth"), "--official", "cifs", "--official-tau", "0.5"])
    assert "--official-tau 0.5" in str(raised.value.code)
