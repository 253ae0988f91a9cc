"""The networks of cifs.py, fsr.py and evaluate.py, and nothing else.

Backbones (CIFAR-style: 3x3 stem at stride 1, no max-pool) take images in [0, 1] with no
mean/std normalisation (both official codes feed `ToTensor()` output straight in). Every backbone
is a `Network`: a flat, named sequence of *units* (the stem, each residual block, each conv stage,
...) followed by a head. A method file puts its module at a named position with
`net.insert(position, module)`; see `Network` for the contract. Each backbone is initialised as its
official code does (`Network.initialise_like_backbone`), and `official_to_ours` renames the
backbone keys of a state dict saved by the authors' code. This file imports nothing of ours: copy
it alone to get the backbones.

Parameter counts for 10 classes (tested in tests/test_models.py):
  resnet18 11.17 M and vgg16 15.25 M (FSR Table 7), wrn34_10 46.16 M, wrn28_10 36.48 M,
  resnet50 23.52 M (the usual CIFAR implementations).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# Network: a backbone as named units, with slots for inserted modules
# =============================================================================================


class Network(nn.Module):
    """A backbone as an ordered list of named units followed by a head.

    forward(x, labels=None) returns `(logits, emitted)`: `emitted` is a list, in forward order, of
    what the inserted modules returned besides their output feature (empty for a plain backbone).
    `labels` (the batch's true labels, or None) reach every inserted module: CIFS reads them in train
    mode, as the official `forward(x, y=None)`; FSR ignores them; attacks call `model(x)`.

    Inserting a module:
        net.insert("layer4.0", module)
    `module(feature, labels)` must return `(new_feature, emitted)` with `new_feature` of the same shape;
    `new_feature` replaces the feature for everything downstream. Positions (`net.positions()`):
      - a unit name ("layer4.0", "stage4", "block3.3", "final", ...): after that unit;
      - a stage name ("layer4", "block3"): after the last unit of that stage;
      - "<pre-activation block>.branch" (WRN units only, e.g. "block3.3.branch"): inside the block,
        on the pre-activated branch input relu(bn(x)) before its first conv; the shortcut keeps
        the unmasked input (the CIFS WRN-28-10 "P2" position, official models/nets/wide_resnet_CIFS.py).
    `net.feature_shapes[position]` gives the (C, H, W) a module at that position sees.

    Subclasses build their layers as ordinary attributes (so state-dict keys read like the usual
    `layer4.1.conv1.weight`) and list the unit names in forward order in `unit_names`.
    """

    unit_names: tuple[str, ...] = ()
    stages: dict[str, str] = {}  # stage alias -> its last unit

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.inserted = nn.ModuleDict()  # slot key ("layer4_0", "block3_3_branch") -> module

    # --- building ---------------------------------------------------------------------------
    def _finish(self) -> None:
        """Record the feature shape at every position (one dummy forward at construction)."""
        was_training = self.training
        self.eval()  # a fresh model: no BatchNorm statistics may change
        shapes = {}
        with torch.no_grad():
            x = torch.zeros(1, *self.input_shape)
            for name in self.unit_names:
                unit = self.get_submodule(name)
                if isinstance(unit, PreActBlock):
                    shapes[name + ".branch"] = tuple(x.shape[1:])
                x = unit(x)
                shapes[name] = tuple(x.shape[1:])
        for alias, last in self.stages.items():
            shapes[alias] = shapes[last]
        self.feature_shapes: dict[str, tuple[int, ...]] = shapes
        self.train(was_training)

    def initialise_like_backbone(self, module: nn.Module) -> nn.Module:
        """Re-initialise `module` as the official code of this backbone initialises what its
        constructor builds; returns `module`. Each backbone applies it to itself at construction, and
        the method files to the modules they insert, because the official VGG16 and WRN constructors
        build the method's modules first and then run one loop over everything. The default (ResNets,
        SmallCNN) keeps PyTorch's initialisation, as the official ResNets do: neither
        `wkim97/FSR` models/resnet_fsr.py nor `HanshuYAN/CIFS` models/nets/resnet.py and
        resnet_CIFS.py has an initialisation loop."""
        return module

    def positions(self) -> list[str]:
        return list(self.feature_shapes)

    def canonical(self, position: str) -> str:
        """Resolve a stage alias to its unit; refuse unknown positions with the list of known ones."""
        if position not in self.feature_shapes:
            raise ValueError(
                f"unknown position {position!r} for {type(self).__name__}; "
                f"known positions: {', '.join(self.positions())}")
        return self.stages.get(position, position)

    def insert(self, position: str, module: nn.Module) -> nn.Module:
        """Put `module` at `position` (see the class docstring); returns the module."""
        key = self.canonical(position).replace(".", "_")
        if key in self.inserted:
            raise ValueError(f"a module is already inserted at {position!r}")
        self.inserted[key] = module
        return module

    # --- running ----------------------------------------------------------------------------
    def features(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """The pooled feature vector that enters the classifier, and the inserted modules' emits."""
        emitted = []
        for name in self.unit_names:
            unit = self.get_submodule(name)
            key = name.replace(".", "_")
            if key + "_branch" in self.inserted:
                x, e = unit(x, branch_module=self.inserted[key + "_branch"], labels=labels)
                emitted.append(e)
            else:
                x = unit(x)
            if key in self.inserted:
                x, e = self.inserted[key](x, labels)
                emitted.append(e)
        return self.pool(x), emitted

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        feature, emitted = self.features(x, labels)
        return self.classifier(feature), emitted

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def conv_bn_relu(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


# =============================================================================================
# The official initialisation loops (only VGG16 and the WRNs have one)
# =============================================================================================


@torch.no_grad()
def init_wrn_(module: nn.Module) -> nn.Module:
    """The loop that ends both official WRN constructors (`wkim97/FSR` models/wideresnet34_fsr.py;
    `HanshuYAN/CIFS` models/nets/wide_resnet.py and wide_resnet_CIFS.py): every conv weight
    N(0, sqrt(2 / (k_h * k_w * C_out))) (the WRN convs have no bias; a bias is left alone, as there),
    BatchNorm weight 1 and bias 0, every Linear bias 0 (Linear weights keep PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return module


@torch.no_grad()
def init_vgg_(module: nn.Module) -> nn.Module:
    """`VGG._initialize_weights` of the official FSR VGG16 (`wkim97/FSR` models/vgg_fsr.py): conv
    weights Kaiming-normal, fan-out, ReLU gain (std sqrt(2 / (k_h * k_w * C_out)), the WRN value)
    and conv biases 0; BatchNorm weight 1 and bias 0; Linear weights N(0, 0.01) and biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return module


# =============================================================================================
# ResNets (CIFAR variant: 3x3 stem, stride 1, no max-pool)
# =============================================================================================


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # post-ReLU block output: the CIFS insertion point


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Network):
    """Units: "stem", "layer1.0", ..., "layer4.<last>"; stages "layer1".."layer4"."""

    def __init__(self, block, num_blocks, input_shape=(3, 32, 32), num_classes=10):
        super().__init__(input_shape, num_classes)
        self.stem = conv_bn_relu(input_shape[0], 64)
        cin, names, stages = 64, ["stem"], {}
        for i, (width, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), 1):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, stride if j == 0 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            names += [f"layer{i}.{j}" for j in range(n)]
            stages[f"layer{i}"] = names[-1]
        self.unit_names, self.stages = tuple(names), stages
        self.classifier = nn.Linear(cin, num_classes)
        self._finish()


# =============================================================================================
# VGG16 with BatchNorm (FSR's second backbone)
# =============================================================================================


class VGG16(Network):
    """Units: "stage1", "pool1", ..., "stage5", "pool5". FSR goes at "stage4" (FSR §4.1, models/vgg_fsr.py).

    Conv layers keep their bias (as in the FSR code's VGG); classifier
    Linear(512,512)-ReLU-Linear(512,512)-ReLU-Linear(512,K), no dropout: 15.25 M parameters.
    Initialised as the official FSR VGG16 (`init_vgg_`).
    """

    widths = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, input_shape=(3, 32, 32), num_classes=10):
        super().__init__(input_shape, num_classes)
        cin, names = input_shape[0], []
        for i, stage in enumerate(self.widths, 1):
            layers = []
            for cout in stage:
                layers += list(conv_bn_relu(cin, cout, bias=True))
                cin = cout
            setattr(self, f"stage{i}", nn.Sequential(*layers))
            setattr(self, f"pool{i}", nn.MaxPool2d(2))
            names += [f"stage{i}", f"pool{i}"]
        self.unit_names = tuple(names)
        # 32x32 inputs leave 1x1 after five pools; the adaptive pool in Network.pool makes
        # 64x64 (Tiny ImageNet) inputs work too without changing the 32x32 model.
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, num_classes))
        self.initialise_like_backbone(self)
        self._finish()

    def initialise_like_backbone(self, module: nn.Module) -> nn.Module:
        return init_vgg_(module)


# =============================================================================================
# Wide ResNets (pre-activation, TRADES-style; FSR uses 34-10, CIFS 28-10)
# =============================================================================================


class PreActBlock(nn.Module):
    """Pre-activation WRN block. `branch_module` (if given) acts on relu(bn1(x)) before conv1."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x, branch_module: nn.Module | None = None, labels: torch.Tensor | None = None):
        pre = F.relu(self.bn1(x))
        # Identity blocks add the raw input; projection blocks project the pre-activated input.
        skip = x if self.equal_in_out else self.shortcut(pre)
        emitted = None
        if branch_module is not None:
            pre, emitted = branch_module(pre, labels)  # only the branch sees the modified input
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))  # dropout 0 (dropRate=0.0 in both official WRNs)
        out = skip + out
        return out if branch_module is None else (out, emitted)


class WideResNet(Network):
    """Units: "stem", "block1.0", ..., "block3.<n-1>", "final" (the closing BN+ReLU).
    Initialised as both official WRNs (`init_wrn_`)."""

    def __init__(self, depth=34, widen=10, input_shape=(3, 32, 32), num_classes=10):
        super().__init__(input_shape, num_classes)
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        names, stages, cin = ["stem"], {}, widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), 1):
            setattr(self, f"block{i}", nn.Sequential(
                *[PreActBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]))
            names += [f"block{i}.{j}" for j in range(n)]
            stages[f"block{i}"] = names[-1]
            cin = cout
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.unit_names, self.stages = tuple(names + ["final"]), stages
        self.classifier = nn.Linear(cin, num_classes)
        self.initialise_like_backbone(self)
        self._finish()

    def initialise_like_backbone(self, module: nn.Module) -> nn.Module:
        return init_wrn_(module)


# =============================================================================================
# A small fast network for tests and CPU demos
# =============================================================================================


class SmallCNN(Network):
    """Three conv-BN-ReLU units (32, 64, 128 channels; strides 1, 2, 2), GAP, linear: ~94 k params.
    smallcnn_wide: 758 channels at conv3, as many parameters as smallcnn + FSR (hidden 64) on 1x28x28
    (464.6 k): the capacity control of benchmarks/fmnist_study.py."""

    def __init__(self, input_shape=(3, 32, 32), num_classes=10, widths=(32, 64, 128)):
        super().__init__(input_shape, num_classes)
        self.conv1 = conv_bn_relu(input_shape[0], widths[0])
        self.conv2 = conv_bn_relu(widths[0], widths[1], stride=2)
        self.conv3 = conv_bn_relu(widths[1], widths[2], stride=2)
        self.unit_names = ("conv1", "conv2", "conv3")
        self.classifier = nn.Linear(widths[2], num_classes)
        self._finish()


# =============================================================================================
# Registry
# =============================================================================================

MODELS: dict[str, Callable[..., Network]] = {
    "resnet18": lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), **kw),
    "resnet10": lambda **kw: ResNet(BasicBlock, (1, 1, 1, 1), **kw),  # Fashion-MNIST (CIFS)
    "resnet50": lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), **kw),  # transfer-attack source
    "vgg16": lambda **kw: VGG16(**kw),
    "wrn34_10": lambda **kw: WideResNet(34, 10, **kw),
    "wrn28_10": lambda **kw: WideResNet(28, 10, **kw),
    "smallcnn": lambda **kw: SmallCNN(**kw),
    "smallcnn_wide": lambda **kw: SmallCNN(widths=(32, 64, 758), **kw),
}


def build_model(name: str, num_classes: int = 10, input_shape: tuple = (3, 32, 32)) -> Network:
    """A backbone by name; the input channel count comes from `input_shape` (1 for Fashion-MNIST)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name](input_shape=tuple(input_shape), num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



# =============================================================================================
# Reading the authors' checkpoints: backbone key names (fsr.py / cifs.py add their modules' names)
# =============================================================================================

# Official key prefix (a regular expression matched at the start of the key) -> our prefix, tried in
# order; the first match renames that prefix and keeps the rest of the key (weight, bias,
# running_mean, running_var, num_batches_tracked: PyTorch's names in both). None drops the key.
OFFICIAL_BACKBONE_KEYS: dict[str, tuple[tuple[str, str | None], ...]] = {
    # wkim97/FSR models/resnet_fsr.py; HanshuYAN/CIFS models/nets/resnet.py, resnet_.py, resnet_CIFS.py.
    "resnet18": (
        (r"conv1\.", "stem.0."),
        (r"bn1\.", "stem.1."),
        (r"layer([1-4])\.(\d+)\.", r"layer\1.\2."),  # conv1, bn1, conv2, bn2, shortcut.0 / .1 alike
        (r"linear\.", "classifier."),
    ),
    # wkim97/FSR models/vgg_fsr.py: block0..block4 hold conv, BN, ReLU at our indices (pool0..pool4 and
    # avgpool have no parameters); the classifier's Linear layers sit at 0, 2, 4 in both.
    "vgg16": (
        (r"block0\.", "stage1."),
        (r"block1\.", "stage2."),
        (r"block2\.", "stage3."),
        (r"block3\.", "stage4."),
        (r"block4\.", "stage5."),
        (r"classifier\.", "classifier."),
    ),
    # wkim97/FSR models/wideresnet34_fsr.py (the TRADES WRN names).
    "wrn34_10": (
        (r"conv1\.", "stem."),
        (r"block([1-3])\.layer\.(\d+)\.convShortcut\.", r"block\1.\2.shortcut."),
        (r"block([1-3])\.layer\.(\d+)\.", r"block\1.\2."),  # bn1, conv1, bn2, conv2
        (r"bn1\.", "final.0."),
        (r"fc\.", "classifier."),
        (r"sub_block1\.", None),  # a second copy of block1 the model builds and saves but never calls
    ),
}


_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _some(keys, shown: int = 4) -> str:
    """'a', 'b', 'c', 'd', ... (N in all): the first few keys of a list, for a one-line message."""
    keys = list(keys)
    head = ", ".join(repr(k) for k in keys[:shown])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")


def official_to_ours(checkpoint, model_name: str, method_rules: tuple, reference: dict,
                     source: str) -> tuple[dict, list[str]]:
    """Rename a state dict saved by the authors' code to our keys, checking every key and shape.

    checkpoint: what `torch.load` returned for the official file: a state dict, or a dict holding it
        under "state_dict" (the CIFS training script); a DataParallel "module." prefix on every key
        is removed.
    model_name: our backbone name; its table in OFFICIAL_BACKBONE_KEYS renames the backbone keys.
    method_rules: the method's rules for its own modules, in the same form, tried first.
    reference: our network's state dict (only names and shapes are read: a network built under
        `torch.device("meta")` will do).
    source: the official file, for messages.
    Returns (our state dict, for `load_state_dict(..., strict=True)`; notes on what was done).
    Raises ValueError, in one line naming the keys, on an official key with no place here, one of our
    keys left unfilled, another number of classes, or a shape mismatch.
    """
    if model_name not in OFFICIAL_BACKBONE_KEYS:
        raise ValueError(f"no official key names for {model_name!r}; known: {', '.join(OFFICIAL_BACKBONE_KEYS)}")
    notes = []
    state = checkpoint
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        extra = f" (saved at stop_epoch {state['stop_epoch']})" if "stop_epoch" in state else ""
        notes.append(f"read the checkpoint's 'state_dict' entry{extra}")
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"not a state dict of {source}: expected a dict of tensors, or one under 'state_dict'")
    if all(k.startswith("module.") for k in state):
        notes.append("removed the DataParallel prefix 'module.' from every key")
        state = {k[len("module."):]: v for k, v in state.items()}

    rules = tuple(method_rules) + OFFICIAL_BACKBONE_KEYS[model_name]
    ours, origin, unplaced, dropped = {}, {}, [], {}
    for key, tensor in state.items():
        for pattern, replacement in rules:
            match = re.match(pattern, key)
            if match:
                break
        else:
            unplaced.append(key)
            continue
        if replacement is None:
            dropped.setdefault(pattern, []).append(key)
            continue
        target = match.expand(replacement) + key[match.end():]
        if target not in reference:
            unplaced.append(key)
        elif target in ours:
            raise ValueError(f"official keys {origin[target]!r} and {key!r} both map to {target!r}")
        else:
            ours[target], origin[target] = tensor, key
    if unplaced:
        raise ValueError(f"{len(unplaced)} key(s) of the {source} checkpoint have no place in our {model_name}: {_some(unplaced)}")

    missing = [k for k in reference if k not in ours]
    if not any(k.endswith("num_batches_tracked") for k in state):  # saved by PyTorch < 0.4.1
        counters = [k for k in missing if k.endswith("num_batches_tracked")]
        for key in counters:
            ours[key] = torch.zeros((), dtype=torch.long)
        if counters:
            notes.append(f"the checkpoint has no BatchNorm num_batches_tracked counters: {len(counters)} set to 0 "
                         f"(unused: our BatchNorm momentum is 0.1)")
        missing = [k for k in missing if k not in ours]
    if missing:
        raise ValueError(f"{len(missing)} key(s) of our network are not in the {source} checkpoint: {_some(missing)}")

    classifier = [k for k in reference if k.startswith("classifier.") and k.endswith(".weight")][-1]
    if ours[classifier].shape[0] != reference[classifier].shape[0]:
        raise ValueError(f"the checkpoint classifies {ours[classifier].shape[0]} classes ({origin[classifier]!r} has shape "
                         f"{tuple(ours[classifier].shape)}), this network {reference[classifier].shape[0]}: "
                         f"build it for the dataset the checkpoint was trained on")
    wrong = [k for k in ours if k in origin and ours[k].shape != reference[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} shape mismatch(es), e.g. official {origin[wrong[0]]!r} -> our {wrong[0]!r}: "
                         f"{tuple(ours[wrong[0]].shape)} in the checkpoint, {tuple(reference[wrong[0]].shape)} here; "
                         f"all: {_some(wrong)}")

    for keys in dropped.values():
        parameters = sum(state[k].numel() for k in keys if not k.endswith(_BATCHNORM_BUFFERS))
        notes.append(f"dropped {len(keys)} official keys {keys[0].split('.')[0]}.* ({parameters:,} parameters): "
                     f"a module the official model builds but never calls in forward")
    notes.append(f"mapped {len(origin)} tensors of the {source} checkpoint onto all {len(reference)} keys of our network")
    return ours, notes
