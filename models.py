"""Backbones and datasets shared by cifs.py, fsr.py and evaluate.py.

Two things live here, and nothing method-specific:

1. Backbones (CIFAR-style: 3x3 stem at stride 1, no max-pool) that take images in [0, 1] with
   no mean/std normalisation (both official codes feed `ToTensor()` output straight
   in). Every backbone is a `Network`: a flat, named sequence of *units* (the stem, each residual
   block, each conv stage, ...) followed by a head. A method file puts its module at a named
   position with `net.insert(position, module)`; see `Network` for the contract. Each backbone is
   initialised as its official code does (`Network.initialise_like_backbone`), and
   `official_to_ours` renames the backbone keys of a state dict saved by the authors' code.
2. Datasets: one table of dataset facts (`DATASETS`), loaders for the real datasets and a
   learnable synthetic one, and `DeviceLoader`, which keeps a split on the GPU as uint8 and
   augments there.

Parameter counts for 10 classes (tested in tests/test_models.py):
  resnet18 11.17 M and vgg16 15.25 M (FSR Table 7), wrn34_10 46.16 M, wrn28_10 36.48 M,
  resnet50 23.52 M (the usual CIFAR implementations).
"""

from __future__ import annotations

import copy
import gzip
import math
import os
import re
import struct
import tempfile
import urllib.error
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# =============================================================================================
# Network: a backbone as named units, with slots for inserted modules
# =============================================================================================


class Network(nn.Module):
    """A backbone as an ordered list of named units followed by a head.

    forward(x) returns `(logits, emitted)`: `emitted` is a list, in forward order, of what the
    inserted modules returned besides their output feature (empty for a plain backbone).

    Inserting a module:
        net.insert("layer4.0", module)
    `module(feature)` must return `(new_feature, emitted)` with `new_feature` of the same shape;
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
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The pooled feature vector that enters the classifier, and the inserted modules' emits."""
        emitted = []
        for name in self.unit_names:
            unit = self.get_submodule(name)
            key = name.replace(".", "_")
            if key + "_branch" in self.inserted:
                x, e = unit(x, branch_module=self.inserted[key + "_branch"])
                emitted.append(e)
            else:
                x = unit(x)
            if key in self.inserted:
                x, e = self.inserted[key](x)
                emitted.append(e)
        return self.pool(x), emitted

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        feature, emitted = self.features(x)
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

    def forward(self, x, branch_module: nn.Module | None = None):
        pre = F.relu(self.bn1(x))
        # Identity blocks add the raw input; projection blocks project the pre-activated input.
        skip = x if self.equal_in_out else self.shortcut(pre)
        emitted = None
        if branch_module is not None:
            pre, emitted = branch_module(pre)  # only the branch sees the modified input
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
    """Three conv-BN-ReLU units (32, 64, 128 channels; strides 1, 2, 2), GAP, linear: ~94 k params."""

    def __init__(self, input_shape=(3, 32, 32), num_classes=10):
        super().__init__(input_shape, num_classes)
        self.conv1 = conv_bn_relu(input_shape[0], 32)
        self.conv2 = conv_bn_relu(32, 64, stride=2)
        self.conv3 = conv_bn_relu(64, 128, stride=2)
        self.unit_names = ("conv1", "conv2", "conv3")
        self.classifier = nn.Linear(128, num_classes)
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
}


def build_model(name: str, num_classes: int = 10, input_shape: tuple = (3, 32, 32)) -> Network:
    """A backbone by name; the input channel count comes from `input_shape` (1 for Fashion-MNIST)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name](input_shape=tuple(input_shape), num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple) -> int:
    """Forward FLOPs for one image: 2 x multiply-accumulates of every convolution and linear layer
    call (the usual convention: ResNet-18 on 32x32 is 1.11 GFLOPs, FSR Table 7; element-wise ops,
    pooling and CIFS's relevance gradient are not counted). Counted with forward hooks on a CPU copy
    in eval mode, so the model itself (mode, BatchNorm statistics, device) is untouched.
    (torch's FlopCounterMode would also do, but its module tracker breaks on the autograd.grad call
    inside a CIFS forward.)"""
    clone = copy.deepcopy(model).to("cpu").float().eval()
    total = 0

    def conv(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)

    def linear(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    for module in clone.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(linear)
    with torch.no_grad():
        clone(torch.zeros(1, *input_shape))
    return total


def set_tf32(allowed: bool, device: torch.device | str = "cuda") -> str:
    """Apply the fp32 choice and return what fp32 means on `device`, for logs and result files.

    PyTorch runs fp32 convolutions on Ampere and Hopper GPUs in TF32 by default
    (torch.backends.cudnn.allow_tf32 is True; matmuls follow torch.backends.cuda.matmul.allow_tf32,
    False by default), as the official codes do on the same GPU. allowed=False (--strict-fp32) turns
    TF32 off for both; allowed=True restores PyTorch's defaults. The flags are process-wide torch
    settings (the function sets them, it keeps no state of its own). On the CPU TF32 does not exist."""
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = False
    if torch.device(device).type != "cuda":
        return "fp32"
    return "fp32 (TF32 convolutions allowed)" if allowed else "strict fp32"


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


# =============================================================================================
# Data-parallel BatchNorm (the opt-in --sync-bn of fsr.py / cifs.py under torchrun)
# =============================================================================================


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch across all
    processes, for the CPU (gloo): torch's nn.SyncBatchNorm accepts only GPU tensors. The per-rank
    sums are added with torch.distributed.nn's autograd-aware all_reduce, whose backward is again
    an all_reduce, so gradients are those of the global batch too. Eval mode, or a single process,
    is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_functional
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        sums = torch.cat([x.float().sum((0, 2, 3)), (x.float() ** 2).sum((0, 2, 3)), count])
        sums = dist_functional.all_reduce(sums)
        channels = x.shape[1]
        total = sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels:2 * channels] / total - mean ** 2).clamp_min(0)  # biased, as BatchNorm normalises
        with torch.no_grad():  # running statistics: momentum update with the unbiased variance
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var.detach() * total / (total - 1)).to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        out = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` computes global-batch statistics under torch.distributed:
    torch's nn.SyncBatchNorm on GPUs, CPUSyncBatchNorm (above) on the CPU. Weights and running
    statistics are kept."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            replacement = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            convert_sync_batchnorm(child, device)
    return model


# =============================================================================
# Data: dataset facts, loaders for the five benchmarks + a synthetic stand-in,
# and a device-resident batch iterator with on-device augmentation.
#
# Everything is stored as uint8 N x C x H x W on the CPU (4x smaller than
# float32, exactly what the files contain) and only turned into float32 in
# [0, 1] per batch. No mean/std normalisation anywhere (as in both official codes).
# =============================================================================


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple  # (C, H, W)
    epsilon: float  # default L-inf budget of the threat model
    augment: str  # 'crop_flip' (pad + random crop + h-flip) or 'none'
    padding: int  # crop padding; 0 when augment == 'none'
    train_size: int  # images in the full training split (for epoch-time estimates)


# The ONE table of per-dataset facts (FSR §4.1, CIFS appendices B-D). Everything else (model
# input shape, default epsilon, default augmentation) should read from here.
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), 8 / 255, "crop_flip", 4, 50_000),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), 8 / 255, "crop_flip", 4, 50_000),
    # A decision of ours: no augmentation for SVHN, as FSR's train.py (the CIFS code crops +
    # flips); crop_flip stays available through the loader's `augment` flag.
    "svhn": DatasetInfo("svhn", 10, (3, 32, 32), 8 / 255, "none", 0, 73_257),
    # Nothing is published for Tiny ImageNet's augmentation; we use the CIFAR recipe.
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, (3, 64, 64), 8 / 255, "crop_flip", 4, 100_000),
    "fmnist": DatasetInfo("fmnist", 10, (1, 28, 28), 0.3, "none", 0, 60_000),
    # Offline stand-in for tests and demos; the shape can be overridden in load_dataset.
    # No flips: a mirrored grating has another orientation, i.e. looks like another class.
    "synthetic": DatasetInfo("synthetic", 10, (3, 32, 32), 8 / 255, "none", 0, 5_000),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8, N x C x H x W, CPU, contiguous
    labels: torch.Tensor  # int64, N
    num_classes: int

    def __post_init__(self):
        # Fail here, at construction, rather than deep inside a training loop.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 NxCxHxW, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self):
        return len(self.labels)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not on disk and could not be downloaded. The message
    says which files are expected where, and where to get them."""


# ---------------------------------------------------------------------------
# torchvision datasets: cifar10, cifar100, svhn
# ---------------------------------------------------------------------------

# name -> (torchvision class name, what must exist under root, official URL)
_TORCHVISION_FILES = {
    "cifar10": ("CIFAR10", "<root>/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "<root>/cifar-100-python/ (train, test, meta)",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "svhn": ("SVHN", "<root>/train_32x32.mat and <root>/test_32x32.mat",
             "http://ufldl.stanford.edu/housenumbers/train_32x32.mat and .../test_32x32.mat"),
}


def _has_scipy() -> bool:
    try:
        import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
        return True
    except ImportError:
        return False


def _not_found(name: str, root: str, expected: str, url: str, extra: str = "") -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {name!r} not found under root {root!r} and not downloadable "
        f"(offline, or download=False). Expected: {expected.replace('<root>', root)}. "
        f"Get it from {url} and unpack it into {root!r}.{extra}")


def _load_torchvision(name: str, root: str, train: bool, download: bool) -> ImageSplit:
    cls_name, expected, url = _TORCHVISION_FILES[name]
    if name == "svhn" and not _has_scipy():
        # Fail before a 240 MB download that could not be read anyway.
        raise ImportError("SVHN is stored as .mat files, which torchvision reads with scipy; "
                          "scipy is not a project dependency: `pip install scipy` to use svhn. "
                          f"Files expected: {expected.replace('<root>', root)}, from {url}.")
    cls = getattr(torchvision.datasets, cls_name)
    kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        ds = cls(root, download=download, **kwargs)
    except (RuntimeError, OSError, urllib.error.URLError) as e:
        # torchvision says "Dataset not found or corrupted" or raises a network
        # error; neither tells the user where to put which files.
        raise _not_found(name, root, expected, url) from e
    if name == "svhn":
        images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already N x 3 x 32 x 32
        labels = torch.as_tensor(ds.labels, dtype=torch.int64)  # torchvision maps digit '10' to 0
    else:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageSplit(images, labels, DATASETS[name].num_classes)


# ---------------------------------------------------------------------------
# Fashion-MNIST: idx files read by hand (offline Debian package first)
# ---------------------------------------------------------------------------

# Debian's `dataset-fashion-mnist` installs the four idx .gz files here.
FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# idx type codes (http://yann.lecun.com/exdb/mnist/, bottom of the page); data is big-endian.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (optionally gzipped): 2 zero bytes, a type code, the number
    of dims, then one big-endian uint32 per dim, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated gzip -> EOFError
        raise ValueError(f"malformed idx file {path!r}: cannot read it ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"malformed idx file {path!r}: bad magic number {raw[:4].hex() or '(empty)'} "
                         "(expected 0000 + type code + ndim)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"malformed idx file {path!r}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims) * dtype.itemsize:
        raise ValueError(f"malformed idx file {path!r}: header says shape {dims} "
                         f"({math.prod(dims) * dtype.itemsize} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find_idx_pair(folder: str, prefix: str):
    """(images, labels) paths for `prefix` ('train' / 't10k') in `folder`, raw or .gz, else None."""
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        hits = [os.path.join(folder, stem + ext) for ext in ("", ".gz")
                if os.path.isfile(os.path.join(folder, stem + ext))]
        if not hits:
            return None
        found.append(hits[0])
    return tuple(found)


def _fmnist_from_idx(images_path: str, labels_path: str) -> ImageSplit:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"malformed Fashion-MNIST idx files {images_path!r} / {labels_path!r}: "
                         f"expected uint8 N x 28 x 28 images and N labels, got {images.shape} / {labels.shape}")
    if len(images) != len(labels) or (len(labels) and labels.max() >= 10):
        raise ValueError(f"Fashion-MNIST idx files {images_path!r} / {labels_path!r} disagree: "
                         f"{len(images)} images, {len(labels)} labels, max label {labels.max(initial=0)}")
    # np.frombuffer views are read-only; copy into writable, owned tensors.
    return ImageSplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10)


def _load_fmnist(root: str, train: bool, download: bool) -> ImageSplit:
    prefix = "train" if train else "t10k"
    folders = [root, os.path.join(root, "FashionMNIST", "raw"), FMNIST_SYSTEM_DIR]
    for folder in folders:
        pair = _find_idx_pair(folder, prefix)
        if pair is not None:
            return _fmnist_from_idx(*pair)
    msg = (f"Fashion-MNIST {prefix} idx files ({prefix}-images-idx3-ubyte, {prefix}-labels-idx1-ubyte, "
           f"raw or .gz) not found in any of: {', '.join(folders)}. Offline: `apt-get install "
           f"dataset-fashion-mnist` (installs them in {FMNIST_SYSTEM_DIR}), or copy them from "
           f"{FMNIST_URL} into {root!r}.")
    if not download:
        raise DatasetNotFoundError(msg + " (download=False)")
    try:  # torchvision downloads into <root>/FashionMNIST/raw/, which we search next time
        ds = torchvision.datasets.FashionMNIST(root, train=train, download=True)
    except (RuntimeError, OSError, urllib.error.URLError) as e:
        raise DatasetNotFoundError(msg + f" Download failed: {e}") from e
    return ImageSplit(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64), 10)


# ---------------------------------------------------------------------------
# Tiny ImageNet: the standard tiny-imagenet-200 folder, decoded once and cached
# ---------------------------------------------------------------------------

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tinyimagenet_files(base: str, train: bool, wnids: list) -> tuple[list, list]:
    """(jpeg paths, labels). Class index = position of the wnid in sorted(wnids),
    the same order torchvision's ImageFolder gives on train/, so labels agree with
    code that uses it. The val/ split is used as the test split (the official
    test/ images have no labels)."""
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    if train:
        for w in wnids:
            folder = os.path.join(base, "train", w, "images")
            names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))
            paths += [os.path.join(folder, n) for n in names]
            labels += [index[w]] * len(names)
    else:
        # val_annotations.txt: "<file>\t<wnid>\t<x0>\t<y0>\t<x1>\t<y1>" per line.
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            rows = sorted(line.split("\t")[:2] for line in f if line.strip())
        for name, w in rows:
            paths.append(os.path.join(base, "val", "images", name))
            labels.append(index[w])
    return paths, labels


def _decode_tinyimagenet(paths: list, shape: tuple) -> torch.Tensor:
    # Preallocate: 100k images are 1.2 GB as uint8; a list + stack would double that.
    images = torch.empty((len(paths), *shape), dtype=torch.uint8)
    for i, p in enumerate(paths):
        # mode=RGB: a few Tiny ImageNet images are grayscale; expand them to 3 channels.
        img = torchvision.io.decode_image(torchvision.io.read_file(p), mode=torchvision.io.ImageReadMode.RGB)
        if tuple(img.shape) != shape:
            raise ValueError(f"{p!r} has shape {tuple(img.shape)}, expected {shape} (Tiny ImageNet is 64x64)")
        images[i] = img
    return images


def _atomic_save(obj, path: str):
    # Write to a temp file in the same folder, then rename: a crash (or a parallel
    # run) never leaves a half-written cache that a later load would trust.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_tinyimagenet(root: str, train: bool) -> ImageSplit:
    base = os.path.join(root, "tiny-imagenet-200")
    split = "train" if train else "val"
    if not os.path.isfile(os.path.join(base, "wnids.txt")):
        raise DatasetNotFoundError(
            f"dataset 'tinyimagenet' not found: expected the folder {base}/ with wnids.txt, "
            f"train/<wnid>/images/*.JPEG and val/images/*.JPEG + val/val_annotations.txt. It is not in "
            f"torchvision and is never downloaded automatically: get {TINYIMAGENET_URL} and unzip it into {root!r}.")
    with open(os.path.join(base, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    cache = os.path.join(base, f"{split}_uint8.pt")
    if os.path.isfile(cache):
        data = torch.load(cache, map_location="cpu", weights_only=True)
        if data["wnids"] == wnids:  # a changed wnids.txt invalidates the label order
            return ImageSplit(data["images"], data["labels"], len(wnids))
    paths, labels = _tinyimagenet_files(base, train, wnids)
    images = _decode_tinyimagenet(paths, DATASETS["tinyimagenet"].shape)
    labels = torch.tensor(labels, dtype=torch.int64)
    try:
        _atomic_save({"images": images, "labels": labels, "wnids": wnids}, cache)
    except OSError as e:  # e.g. a read-only shared dataset folder: work, just slower next time
        warnings.warn(f"could not write the Tiny ImageNet cache {cache!r}: {e}")
    return ImageSplit(images, labels, len(wnids))


# ---------------------------------------------------------------------------
# Synthetic: class-conditional gratings a small CNN can learn
# ---------------------------------------------------------------------------


def make_synthetic(num_classes: int, shape: tuple, n: int, seed: int, train: bool) -> ImageSplit:
    """Each class is a fixed smooth template: the sum of 3 sinusoidal gratings
    (random orientation, frequency, phase) with a class colour per channel.
    A sample is its class template, randomly translated, with random contrast,
    random brightness and pixel noise. Classes differ in *texture* (frequency,
    orientation, colour), not in mean intensity, so a CNN must look at structure
    and PGD at 8/255 still has something to push against.

    Templates depend on `seed` only, samples on (seed, train): train and test share
    the classes but never the samples."""
    c, h, w = shape
    n_gratings = 3
    t_rng = np.random.default_rng([seed, 0])  # templates
    s_rng = np.random.default_rng([seed, 1 if train else 2])  # samples
    # Frequencies in cycles per image side, so a template looks alike at 28, 32 or 64 pixels.
    theta = t_rng.uniform(0, np.pi, (num_classes, n_gratings))
    freq = t_rng.uniform(1.5, 5.0, (num_classes, n_gratings))
    phase = t_rng.uniform(0, 2 * np.pi, (num_classes, n_gratings))
    colour = t_rng.uniform(-1, 1, (num_classes, n_gratings, c))
    colour /= np.sqrt((colour ** 2).sum(1, keepdims=True) / 2) + 1e-8  # unit per-channel std over gratings

    # Balanced labels in random order.
    labels = s_rng.permutation(np.arange(n) % num_classes)
    max_shift = max(1, h // 8)  # translate by up to 4 px at 32x32
    shift = s_rng.integers(-max_shift, max_shift + 1, (n, 2)) / np.array([h, w])
    contrast = s_rng.uniform(0.06, 0.1, n)  # per-channel std of the signal
    brightness = s_rng.uniform(0.4, 0.6, n)
    noise = s_rng.normal(0, 0.08, (n, c, h, w)).astype(np.float32)

    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    images = np.empty((n, c, h, w), dtype=np.uint8)
    for lo in range(0, n, 512):  # chunks keep memory flat for 64x64 images
        sl = slice(lo, min(lo + 512, n))
        k = labels[sl]
        # Translating a grating is a phase shift; the coordinate ramp has shape (b, g, H, W).
        ramp = ((xx + shift[sl, 1, None, None, None]) * np.cos(theta[k])[..., None, None]
                + (yy + shift[sl, 0, None, None, None]) * np.sin(theta[k])[..., None, None])
        waves = np.sin(2 * np.pi * freq[k][..., None, None] * ramp + phase[k][..., None, None])
        signal = np.einsum("bghw,bgc->bchw", waves, colour[k])
        x = brightness[sl, None, None, None] + contrast[sl, None, None, None] * signal + noise[sl]
        images[sl] = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), num_classes)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def load_dataset(name: str, root: str = "data", train: bool = True, download: bool = True,
                 synthetic_shape: tuple | None = None, synthetic_size: int | None = None,
                 synthetic_classes: int = 10, seed: int = 0) -> ImageSplit:
    """Load one split as uint8 NCHW + int64 labels. train=False is the test split
    (Tiny ImageNet: val/). synthetic_* and seed only affect name='synthetic'."""
    info = dataset_info(name)
    root = os.fspath(root)
    if name == "synthetic":
        size = synthetic_size if synthetic_size is not None else (5000 if train else 1000)
        return make_synthetic(synthetic_classes, tuple(synthetic_shape or info.shape), size, seed, train)
    if name == "fmnist":
        return _load_fmnist(root, train, download)
    if name == "tinyimagenet":
        return _load_tinyimagenet(root, train)
    return _load_torchvision(name, root, train, download)


def balanced_subset(labels: torch.Tensor, n: int, num_classes: int, seed: int) -> torch.Tensor:
    """n indices, n // K per class (the first n % K classes one more), chosen by `seed`, sorted.
    A class with fewer members gives all it has. n >= len(labels): every index."""
    if n >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        take = n // num_classes + (c < n % num_classes)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def subset(split: ImageSplit, indices: torch.Tensor) -> ImageSplit:
    """The images and labels of `split` at `indices`, in that order."""
    return ImageSplit(split.images[indices], split.labels[indices], split.num_classes)


def split_validation(split: ImageSplit, n_val: int = 1000, seed: int = 0) -> tuple[ImageSplit, ImageSplit | None]:
    """Hold out a seeded random n_val examples: returns (train_rest, val), disjoint.
    Both keep the stored order. n_val=0 returns (split, None)."""
    if n_val == 0:
        return split, None
    if not 0 < n_val < len(split):
        raise ValueError(f"n_val must be in [0, {len(split)}), got {n_val}")
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return subset(split, train_idx), subset(split, val_idx)


# ---------------------------------------------------------------------------
# Device-resident loader
# ---------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mix (seed, epoch) into one well-spread 63-bit seed; seed*K + epoch would let
    # nearby seeds share epochs' streams.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)


def crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to H x W at a random offset per image and
    flip each image horizontally with prob 0.5. Vectorised over the batch with one
    gather via index grids; works on any dtype (we use it on uint8)."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    rows = off[0, :, None] + torch.arange(h, device=dev)  # (b, h) source rows in padded image
    cols = off[1, :, None] + torch.arange(w, device=dev)  # (b, w) source cols
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the crop's columns backwards
    idx = torch.arange(b, device=dev)[:, None, None]
    # Advanced indexing on (b, H', W', C) gives (b, h, w, C); permute back to NCHW
    # (the result is then channels_last-strided, which is fine: callers pick the format).
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class DeviceLoader:
    """Iterate over an ImageSplit in batches without DataLoader workers.

    The whole split is copied to `device` once, as uint8 (CIFAR-10 train is 150 MB);
    every batch is gathered, augmented and converted to float32/255 there. All
    randomness of epoch e (order, crop offsets, flips) comes from one generator
    seeded by (seed, e) on the loader's device, so a resumed run sees exactly the
    batches an uninterrupted one would. shuffle=False keeps the stored order;
    `augment` is applied independently of `shuffle` (pass augment='none' for
    evaluation).

    Data-parallel (torchrun): `batch_size` is the global batch. Every rank draws the same order and
    the same augmentation for the whole global batch, then keeps its contiguous 1/world_size share,
    so the union over ranks of step t is exactly the single-process batch t. A final batch whose
    size is not a multiple of world_size loses its last (at most world_size - 1) images, so that
    every rank holds an equal share (DDP's gradient mean is then the global batch mean)."""

    def __init__(self, split: ImageSplit, batch_size: int, device="cpu", shuffle=True, augment="none",
                 padding=4, drop_last=False, seed=0, channels_last=False, rank=0, world_size=1):
        if augment not in ("none", "crop_flip"):
            raise ValueError(f"augment must be 'none' or 'crop_flip', got {augment!r}")
        if batch_size < 1 or padding < 0:
            raise ValueError(f"need batch_size >= 1 and padding >= 0, got {batch_size}, {padding}")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"the global batch {batch_size} must split evenly over {world_size} processes "
                             f"(rank {rank}): pass a --batch-size that is a multiple of the process count")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment, self.padding = batch_size, shuffle, augment, padding
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self):
        n = len(self.labels)
        if self.drop_last:
            return n // self.batch_size
        return n // self.batch_size + (n % self.batch_size >= self.world_size)  # a last share for every rank

    def epoch(self, epoch: int):
        n = len(self.labels)
        g = None
        if self.shuffle or self.augment != "none":
            g = torch.Generator(device=self.device)
            g.manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment == "crop_flip":
                x = crop_flip(x, self.padding, g)  # on uint8: 4x less memory traffic than float
            y = self.labels[idx]
            if self.world_size > 1:  # this rank's share of the global batch (augmented as a whole above)
                share = len(idx) // self.world_size
                x, y = x[self.rank * share:(self.rank + 1) * share], y[self.rank * share:(self.rank + 1) * share]
            x = x.float().div_(255).contiguous(memory_format=self.memory_format)
            yield x, y
