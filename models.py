"""Backbones, datasets and run support shared by cifs.py, fsr.py, evaluate.py and benchmarks/speed.py.

Three things live here, and nothing method-specific:

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
3. Run support (the last part of the file): the machinery around the method files' training loops,
   from argument parsing with one-line errors to the training-curve figure. A method file's
   `train()` calls these pieces in order, so the reader of fsr.py / cifs.py sees the loop itself.

Parameter counts for 10 classes (tested in tests/test_models.py):
  resnet18 11.17 M and vgg16 15.25 M (FSR Table 7), wrn34_10 46.16 M, wrn28_10 36.48 M,
  resnet50 23.52 M (the usual CIFAR implementations).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gzip
import inspect
import json
import math
import os
import random
import re
import socket
import struct
import sys
import tempfile
import time
import urllib.error
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import attacks  # for the monitoring PGD of run support (attacks.py imports nothing from here)


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


def _torchvision_files(name: str, train: bool) -> list:
    """The files under root that torchvision reads (and checks) for one split."""
    if name == "svhn":
        return ["train_32x32.mat" if train else "test_32x32.mat"]
    if name == "cifar10":
        return [os.path.join("cifar-10-batches-py", f) for f in
                (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")]
    return [os.path.join("cifar-100-python", f) for f in ("train", "test", "meta")]


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
        if all(os.path.isfile(os.path.join(root, f)) for f in _torchvision_files(name, train)):
            # All there: torchvision refused them on its MD5 check. "Not found" would send the
            # user looking for files that are in place (tests/test_dataset_formats.py).
            raise DatasetNotFoundError(
                f"dataset {name!r}: the files are under root {root!r} ({expected.replace('<root>', root)}) but "
                f"fail torchvision's MD5 check (an incomplete or altered download?): delete them and get them "
                f"again from {url}") from e
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


# =============================================================================================
# Part 3. Run support: the machinery around the training loops of fsr.py and cifs.py
# =============================================================================================
#
# Nothing here is about a method or about adversarial robustness: settings from the command line
# with one-line errors, the table of range checks, device, precision and seeds, atomic writes,
# checkpoints and resume, random-number state, the run folder with its lock and metrics log,
# torchrun helpers, the progress line and the training-curve figure. (CleanRL keeps the same kind
# of code apart from its single-file scripts, in cleanrl_utils.) evaluate.py and
# benchmarks/speed.py use the same pieces.


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, written by another method or by
    another version of the code, or with weights that do not fit the network."""


def arg(default, help: str, type=None, choices=None, positional: bool = False):
    """A dataclass field that carries its command-line help (one line per flag)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "positional": positional})


def flag(name: str) -> str:
    """The command-line spelling of a setting: weight_decay -> --weight-decay."""
    return "--" + name.replace("_", "-")


class OneLineErrors(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, without the usage block."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def parse_args(args_class, argv=None, description: str = ""):
    """args_class (a dataclass of `arg` fields) from the command line: kebab-case flags, one help line
    each, booleans as switches (--x where the default is False, else --x/--no-x; None: "decided later"). A
    default is shown only where it is a value (a default that depends on the dataset is described
    in the help). A `positional` field takes one or more values."""
    parser = OneLineErrors(description=description)
    for f in dataclasses.fields(args_class):
        meta = f.metadata
        shown = "" if f.default in (None, False) else f" (default: {f.default})"
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", help=meta["help"])
        elif f.default is False:
            parser.add_argument(flag(f.name), action="store_true", help=meta["help"])
        elif meta["type"] is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            parser.add_argument(flag(f.name), type=meta["type"] or type(f.default), default=f.default,
                                choices=meta["choices"], help=meta["help"] + shown)
    return args_class(**vars(parser.parse_args(argv)))


def int_list(name: str, text: str, length: int | None = None, increasing: bool = False) -> list[int]:
    """A comma-separated list of positive integers, or a one-line error that names the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (length and len(values) != length) or \
            (increasing and values != sorted(set(values))):
        what = f"{length} positive integers" if length else "positive integers"
        raise ValueError(f"{flag(name)} {text!r} is malformed: give {what} separated by commas"
                         + (", in increasing order" if increasing else "") + ", e.g. "
                         + ("3,32,32" if length == 3 else "75,90"))
    return values


# Range rules: (test, what a value must be). RANGES holds the settings both scripts have; each
# method file adds its own table. Unset values (None) are skipped.
AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1")
POSITIVE = (lambda v: v > 0, "must be positive")
NON_NEGATIVE = (lambda v: v >= 0, "must not be negative")
RANGES = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "eval_every": AT_LEAST_1, "eval_steps": AT_LEAST_1,
    "epsilon": (lambda v: 0 < v <= 1, f"is not in (0, 1]: budgets are in image units (pass 8/255 = {8 / 255:.5f}, not 8)"),
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "momentum": NON_NEGATIVE, "trades_beta": NON_NEGATIVE,
    "mart_beta": NON_NEGATIVE, "fat_omega": NON_NEGATIVE, "log_interval": NON_NEGATIVE,
    "monitor_size": (lambda v: v >= 0, "must not be negative (0: no monitoring)"),
}
# ... and those of the training attack, which only an adversarial strategy uses.
ATTACK_RANGES = {"attack_steps": AT_LEAST_1, "attack_step_size": (lambda v: v > 0, "must be positive (e.g. eps/4)")}


def check_args(args, method_ranges: dict, method_checks) -> None:
    """Refuse, before any work, every setting that would fail later or silently train something
    else, in one line that names the flag and the fix. `args` are resolved (no None left where a
    default exists). Range rules come from the tables; cross-field rules follow; then the method's
    own cross-field checks (`method_checks(args)`)."""
    ranges = {**RANGES, **(ATTACK_RANGES if args.strategy != "natural" else {}), **method_ranges}
    for name, (test, requirement) in ranges.items():
        value = getattr(args, name)
        if value is not None and not test(value):
            raise ValueError(f"{flag(name)} {value} {requirement}")
    if args.strategy in ("trades", "mart") and args.random_start is False:
        raise ValueError(f"--no-random-start with --strategy {args.strategy}: its attack starts from "
                         "x + 0.001 N; from x itself TRADES cannot move (its KL gradient is zero there) and the run "
                         "would be natural training under another name. Drop --no-random-start")
    int_list("milestones", args.milestones, increasing=True)
    if args.dataset != "synthetic":
        for name in ("synthetic_shape", "synthetic_size"):
            if getattr(args, name) is not None:
                raise ValueError(f"{flag(name)} applies only to --dataset synthetic")
    elif args.synthetic_shape:
        int_list("synthetic_shape", args.synthetic_shape, length=3)
    if args.synthetic_size is not None and args.synthetic_size < 20:
        raise ValueError(f"--synthetic-size {args.synthetic_size} is too small: give at least 20 images")
    available = training_images(args)
    if args.train_size is not None and not 10 <= args.train_size <= available:
        raise ValueError(f"--train-size {args.train_size} must be between 10 and the {available} training "
                         f"images of {args.dataset}")
    kept = min(args.train_size or available, available)
    if not 0 <= args.val_size < kept:
        raise ValueError(f"--val-size {args.val_size} must be at least 0 and below the {kept} training images "
                         f"(0: train on all of them, as both papers)")
    check_device(args.device)
    method_checks(args)


def training_images(args) -> int:
    """Images in the dataset's training split (synthetic: --synthetic-size or 5,000)."""
    if args.dataset == "synthetic":
        return args.synthetic_size or 5000
    return dataset_info(args.dataset).train_size


def input_shape(args) -> tuple[int, int, int]:
    """(C, H, W) of the run's images: the dataset's, or --synthetic-shape for synthetic data."""
    if args.dataset == "synthetic" and args.synthetic_shape:
        return tuple(int(v) for v in args.synthetic_shape.split(","))
    return dataset_info(args.dataset).shape


def check_device(name: str | None) -> None:
    """--device must name a device this machine has."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")


def check_writable(folder: str, flag_name: str = "--runs-dir") -> None:
    """`folder` (or the nearest folder above it that exists) must be a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag_name}: cannot write {folder} ({existing} is not a writable folder)")


def seed_everything(seed: int, deterministic: bool) -> None:
    """The one place seeds are set (weights, data order, augmentation, attack noise)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def seed_rank(seed: int, rank: int) -> None:
    """Attack noise (random starts) differs across processes: rank r > 0 continues from its own
    seed; rank 0 keeps the stream of a single-process run."""
    if rank > 0:
        torch.manual_seed(seed + 1_000_003 * rank)


def learning_rate(args, epoch: int) -> float:
    """Step schedule, 10x lower after each milestone, as torch.optim.lr_scheduler.MultiStepLR
    stepped once per epoch: a milestone m is the number of epochs run at the higher rate, so
    0-indexed `epoch` runs at lr * 0.1 ** (number of milestones <= epoch)."""
    return args.lr * 0.1 ** sum(epoch >= m for m in int_list("milestones", args.milestones))


def pick_device(name: str | None) -> torch.device:
    """--device, or cuda when there is a GPU; under torchrun a bare "cuda" is this process's GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    return device


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


def device_settings(args):
    """(device, amp, autocast factory, memory format). fp32 unless --amp (both official codes train
    in fp32; bf16 is opt-in until a measurement shows it changes no reported number), with TF32
    convolutions on GPUs that have them unless --strict-fp32 (set_tf32); channels_last on CUDA (the
    same arithmetic in another memory layout)."""
    device = pick_device(args.device)
    set_tf32(not args.strict_fp32, device)  # TF32 convolutions on Ampere/Hopper unless --strict-fp32
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    return device, args.amp, autocast, torch.channels_last if channels_last else torch.contiguous_format


# ---- checkpoints and resume -------------------------------------------------------------------


def save_checkpoint(state: dict, path: str) -> None:
    """Atomic: write a temporary file next to the target, then rename over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def read_torch_file(path: str, what: str = "checkpoint"):
    """torch.load(path) on the CPU (tensors and plain containers only), or one line saying why not."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{what} {path!r} is unreadable (truncated or not a checkpoint): "
                              f"{str(error).splitlines()[0]}") from None


def load_checkpoint(path: str, method: str) -> dict:
    """Load a checkpoint written by `method`.py (fsr or cifs), or explain precisely why not."""
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or "method" not in checkpoint or "args" not in checkpoint:
        raise CheckpointError(f"{path!r} is not a checkpoint written by fsr.py or cifs.py")
    if checkpoint["method"] != method:
        raise CheckpointError(f"{path!r} is a {checkpoint['method']} checkpoint; "
                              f"resume it with {checkpoint['method']}.py (evaluate.py reads both)")
    return checkpoint


def args_from_checkpoint(args_class, saved: dict, path: str, method: str):
    """The settings (an args_class) a checkpoint was written with; a checkpoint of another version
    of the code (settings this version does not know, or lacks) is refused in one line naming them."""
    known = {f.name for f in dataclasses.fields(args_class)}
    unknown, missing = sorted(set(saved) - known), sorted(known - set(saved))
    if unknown or missing:
        raise CheckpointError(f"{path!r} was written by another version of {method}.py: "
                              + "; ".join(part for part in (
                                  f"settings unknown here: {', '.join(unknown)}" if unknown else "",
                                  f"settings it lacks: {', '.join(missing)}" if missing else "") if part))
    return args_class(**saved)


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """model.load_state_dict(state), or one line that says which keys differ."""
    ours = model.state_dict()
    missing = [key for key in ours if key not in state]
    unknown = [key for key in state if key not in ours]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(ours[key].shape)}" for key in ours
              if key in state and state[key].shape != ours[key].shape]

    def some(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    problems = [f"{what}: {some(keys)}" for what, keys in (("missing", missing), ("unexpected", unknown),
                                                           ("other shape", shapes)) if keys]
    if problems:
        inserted = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("FSR", "CIFS")})
        raise CheckpointError(f"the weights of {source} do not fit this network ({type(model).__name__} with "
                              f"{', '.join(inserted) or 'no inserted module'}): " + "; ".join(problems))
    model.load_state_dict(state)


# Settings that may change when a run is resumed: they change neither the network nor the recipe
# of the epochs already run (a longer --epochs extends the run; FAT's tau schedule scales with it).
RESUMABLE = ("epochs", "device", "log_interval", "eval_every", "data_root", "compile", "channels_last",
             "deterministic")


def resumed_settings(args, checkpoint: dict, log):
    """The run's own settings, with the resumable flags the user changed applied and announced;
    any other changed flag is refused. A flag counts as given when it differs from its default."""
    args_class = type(args)
    saved = args_from_checkpoint(args_class, checkpoint["args"], args.resume, checkpoint["method"])
    defaults = args_class()
    changed = [f.name for f in dataclasses.fields(args_class) if f.name != "resume"
               and getattr(args, f.name) != getattr(defaults, f.name)
               and getattr(args, f.name) != getattr(saved, f.name)]
    refused = [name for name in changed if name not in RESUMABLE]
    if refused:
        raise ValueError(f"{', '.join(flag(name) for name in refused)}: a resumed run keeps the settings it was "
                         f"started with (only {', '.join(flag(name) for name in RESUMABLE)} may change); "
                         f"start a new run (--init-from {args.resume} for its weights) to change them")
    if "epochs" in changed and args.epochs < checkpoint["epoch"]:
        raise ValueError(f"--epochs {args.epochs}: {args.resume} has already run {checkpoint['epoch']} epochs")
    for name in changed:
        log(f"resume: {flag(name)} {getattr(saved, name)} -> {getattr(args, name)}")
    return dataclasses.replace(saved, resume=args.resume, **{name: getattr(args, name) for name in changed})


def start_run(args, method: str, resolve, method_ranges: dict, method_checks, log):
    """(settings, checkpoint or None, run folder) of a new run or of the run --resume continues,
    every setting checked (check_args) before any work. Nothing is written here."""
    if args.resume and args.init_from:
        raise ValueError("--resume continues a run; --init-from starts a new one from given weights: pass one")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r} does not exist")
    checkpoint = load_checkpoint(args.resume, method) if args.resume else None
    args = resumed_settings(args, checkpoint, log) if checkpoint else resolve(args)
    check_args(args, method_ranges, method_checks)
    variant = f"no{method}" if getattr(args, f"no_{method}") else method
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if checkpoint else os.path.join(
        args.runs_dir, args.run_name or f"{method}_{args.dataset}_{args.model}_{args.strategy}_{variant}_seed{args.seed}")
    check_writable(run_dir)
    return args, checkpoint, run_dir


def initial_weights(args, method: str, official_state_dict, log) -> dict:
    """The weights of --init-from: a checkpoint of this method (any settings: the network must fit),
    or a state dict saved by the method's official code (mapped by its official_state_dict)."""
    raw = read_torch_file(args.init_from, "--init-from")
    if isinstance(raw, dict) and "method" in raw and "args" in raw:
        return load_checkpoint(args.init_from, method)["model"]
    state, notes = official_state_dict(raw, args)
    for note in notes:
        log(f"--init-from: {note}")
    return state


# ---- torchrun (DistributedDataParallel) ---------------------------------------------------------


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) this process joins the group: NCCL when
    `device` is a GPU, gloo on the CPU. A plain `python fsr.py` gets (0, 1) and no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def process_group(args):
    """(rank, world size) inside torchrun's process group, if any, left on exit."""
    try:
        yield init_distributed(pick_device(args.device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the processes of a data-parallel run (the tensor itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def shard(split: ImageSplit, rank: int, world_size: int) -> ImageSplit:
    """This process's contiguous share of an evaluation split (shares differ by at most one image)."""
    begin, end = len(split) * rank // world_size, len(split) * (rank + 1) // world_size
    return dataclasses.replace(split, images=split.images[begin:end], labels=split.labels[begin:end])


def data_parallel(update: nn.Module, device) -> nn.Module:
    """DDP around the update passes, without DDP's per-forward buffer broadcast (broadcast_buffers
    below runs after each step instead). Recent torch renamed that switch forward_sync_buffers."""
    from torch.nn.parallel import DistributedDataParallel
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return DistributedDataParallel(update, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every process, after each update (one broadcast per dtype):
    the next attack and the validation then see the same network everywhere. (DDP's own buffer
    broadcast, turned off here, would happen only at its next forward, after the attack.)"""
    buffers = list(model.buffers())
    for dtype in dict.fromkeys(buffer.dtype for buffer in buffers):  # the same order in every process
        group = [buffer for buffer in buffers if buffer.dtype == dtype]
        flat = torch.cat([buffer.reshape(-1) for buffer in group])
        dist.broadcast(flat, 0)
        for buffer, value in zip(group, flat.split([buffer.numel() for buffer in group])):
            buffer.copy_(value.view_as(buffer))


def rng_states(device) -> list:
    """[(cpu state, cuda state or None)] of every process, in rank order (for exact resumption)."""
    state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return [(cpu.cpu(), None if cuda is None else cuda.cpu()) for cpu, cuda in states]


def restore_rng(saved: list, rank: int, world_size: int, device, args, start_epoch: int, log) -> None:
    """Each process continues its own random stream; with another process count, fresh seeded
    streams (valid, but not bitwise an uninterrupted run), said."""
    if len(saved) == world_size:
        rng_cpu, rng_cuda = saved[rank]
        torch.set_rng_state(rng_cpu)
        if device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
        return
    torch.manual_seed(args.seed + 1_000_003 * rank + start_epoch)
    log(f"note: {args.resume} was written by {len(saved)} process(es), this run has {world_size}: "
        f"the attack noise is re-seeded")


# ---- data and monitoring ----------------------------------------------------------------------

MONITOR_SEED = 0  # the monitored test images are the same for every run (comparable curves)


def data_loaders(args, device, memory_format, rank: int, world_size: int, log):
    """(training loader, {"val" / "monitor": loader}, description). The training split lives on the
    device as uint8 and is augmented there (DeviceLoader); under torchrun every process holds it and
    takes its share of each global batch. --train-size keeps a seeded class-balanced subset;
    --val-size holds out images of it for best.pt; --monitor-size takes a fixed class-balanced
    subset of the test split (monitoring only). Held-out splits are sharded over the processes."""
    shape = input_shape(args)
    log(f"loading {args.dataset} from {args.data_root} ...")
    train_split = load_dataset(args.dataset, args.data_root, train=True, synthetic_shape=shape,
                               synthetic_size=args.synthetic_size, seed=args.seed)
    if args.train_size is not None:
        train_split = subset(train_split, balanced_subset(train_split.labels, args.train_size,
                                                          train_split.num_classes, args.seed))
    train_split, val_split = split_validation(train_split, args.val_size, seed=args.seed)
    monitor_split = None
    if args.monitor_size:
        test_split = load_dataset(args.dataset, args.data_root, train=False, synthetic_shape=shape, seed=args.seed)
        monitor_split = subset(test_split, balanced_subset(test_split.labels, args.monitor_size,
                                                           test_split.num_classes, MONITOR_SEED))
    train_loader = DeviceLoader(train_split, args.batch_size, device, shuffle=True, augment=args.augment,
                                padding=dataset_info(args.dataset).padding or 4,  # crop_flip forced on any dataset
                                seed=args.seed, channels_last=memory_format == torch.channels_last,
                                rank=rank, world_size=world_size)
    held_out = {name: DeviceLoader(shard(split, rank, world_size), 500, device, shuffle=False)
                for name, split in (("val", val_split), ("monitor", monitor_split)) if split is not None}
    description = (f"{len(train_split)} training images"
                   + (f", {len(val_split)} held out for best.pt" if val_split else "")
                   + (f", {len(monitor_split)} test images monitored" if monitor_split else ""))
    return train_loader, held_out, description


@torch.no_grad()
def _count_correct(model, x, y):
    return (model(x)[0].argmax(1) == y).sum()


def clean_and_robust_accuracy(model, loader, args) -> tuple[float, float]:
    """Clean and PGD accuracy (eval_steps of eps/10, no random start: the papers' test protocol)
    in fp32; under torchrun each process takes its share and the counts are summed, which gives
    the single-process figures."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=loader.device)  # clean, robust, total
    for x, y in loader.epoch(0):
        x_adv = attacks.pgd(model, x, y, args.epsilon, args.epsilon / 10, args.eval_steps, random_start_kind=None)
        counts[0] += _count_correct(model, x, y)
        counts[1] += _count_correct(model, x_adv, y)
        counts[2] += len(y)
    clean, robust, total = all_reduce_sum(counts).tolist()
    return clean / max(total, 1), robust / max(total, 1)


# ---- the run folder ---------------------------------------------------------------------------


@contextlib.contextmanager
def run_folder(run_dir: str, args, resumed: bool, history: list, log):
    """The run folder for the run's life: created, locked against a second run (a lock left by a
    killed run is taken over, saying so), cleared of the temporary files of interrupted saves,
    with args.json and a metrics.jsonl that holds exactly the epochs of the checkpoint resumed."""
    if not resumed and os.path.exists(os.path.join(run_dir, "last.pt")):
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume {run_dir}/last.pt to continue it, "
                              f"or another --run-name")
    os.makedirs(run_dir, exist_ok=True)
    lock = os.path.join(run_dir, "run.lock")
    take_lock(lock, log)
    try:
        for name in os.listdir(run_dir):
            if ".tmp" in name:  # an interrupted save (save_checkpoint, write_text_atomically)
                os.remove(os.path.join(run_dir, name))
                log(f"removed {name}, left by an interrupted save")
        write_text_atomically(os.path.join(run_dir, "args.json"), json.dumps(dataclasses.asdict(args), indent=2))
        write_metrics(run_dir, history)
        yield
    finally:
        os.remove(lock)


def take_lock(path: str, log) -> None:
    """Create the lock file holding this host and process id; if a live process holds it, refuse."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as file:
                host, _, pid = file.read().strip().partition(" ")
            if host != socket.gethostname() or process_alive(int(pid or 0)):
                raise FileExistsError(f"{os.path.dirname(path)} is in use by process {pid} on {host}: wait for it, "
                                      f"or pass another --run-name (if that process is gone, delete {path})")
            log(f"note: taking over the lock of process {pid}, which is no longer running")
            os.remove(path)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(me)
        return
    raise FileExistsError(f"could not take the lock {path}")


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_metrics(run_dir: str, history: list) -> None:
    """metrics.jsonl, one line per completed epoch, rewritten whole from the checkpoint's history
    (atomically), so that a kill between the checkpoint and the log line loses nothing."""
    write_text_atomically(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history))


# ---- progress and summaries -------------------------------------------------------------------

LOSS_NAMES = ("loss", "cls", "sep", "rec", "probe")  # what metrics.jsonl may hold as losses (FSR: sep, rec; CIFS: probe)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class EpochProgress:
    """The running figures of one training epoch: loss sums and correct predictions kept on the
    device (no sync per step), a progress line with the epoch's and the run's ETA from the first
    seconds on (then every --log-interval seconds), and the epoch's metrics, summed over the
    processes of a torchrun run (global-batch figures, equal to one process's)."""

    def __init__(self, args, epoch: int, steps: int, world_size: int, log):
        self.args, self.epoch, self.steps, self.world_size, self.log = args, epoch, steps, world_size, log
        self.started = time.time()
        self.next_print = self.started + min(5.0, args.log_interval)
        self.sums, self.correct, self.seen, self.done = {}, 0, 0, 0

    def update(self, losses: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach() * len(y)
        self.correct, self.seen, self.done = self.correct + (logits.argmax(1) == y).sum(), self.seen + len(y), self.done + 1
        now = time.time()
        if now >= self.next_print and self.done < self.steps:
            self.next_print = now + self.args.log_interval
            per_step = (now - self.started) / self.done
            epoch_left = per_step * (self.steps - self.done)
            run_left = epoch_left + (self.args.epochs - self.epoch - 1) * per_step * self.steps
            self.log(f"  epoch {self.epoch + 1}/{self.args.epochs} step {self.done}/{self.steps} | loss "
                     f"{float(self.sums['loss']) / self.seen:.4f} | {self.world_size * self.seen / (now - self.started):.0f}"
                     f" img/s | epoch ETA {format_seconds(epoch_left)} | run ETA {format_seconds(run_left)}")

    def metrics(self, lr: float) -> dict:
        device = self.correct.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.time() - self.started
        totals = all_reduce_sum(torch.stack([*(self.sums[name].float() for name in self.sums), self.correct.float(),
                                             torch.tensor(float(self.seen), device=device)])).tolist()
        seen = totals[-1]
        return {"epoch": self.epoch + 1, "lr": lr, **{name: total / seen for name, total in zip(self.sums, totals)},
                "train_accuracy": totals[-2] / seen, "images_per_second": seen / seconds, "epoch_seconds": seconds}


def epoch_summary(metrics: dict, args, history: list, train_accuracy_note: str) -> str:
    """The console line of an epoch: losses, accuracies (each labelled for what it measures), ETA."""
    seconds = [m["epoch_seconds"] for m in history]
    eta = (args.epochs - metrics["epoch"]) * sum(seconds) / len(seconds)
    losses = " ".join(f"{name} {metrics[name]:.4f}" for name in metrics if name in LOSS_NAMES)
    held_out = "".join(f" | {label} clean {metrics[f'{name}_clean']:.2%} pgd{args.eval_steps} (step eps/10) "
                       f"{metrics[f'{name}_robust']:.2%}"
                       for name, label in (("val", "held-out"), ("monitor", "test (monitoring only)"))
                       if f"{name}_robust" in metrics)
    return (f"epoch {metrics['epoch']}/{args.epochs} | lr {metrics['lr']:.4g} | {losses} | "
            f"train acc {metrics['train_accuracy']:.2%} ({train_accuracy_note}){held_out} | "
            f"{metrics['images_per_second']:.0f} img/s | {metrics['epoch_seconds']:.1f} s | ETA {format_seconds(eta)}")


def run_banner(method: str, args, model: nn.Module, device, data: str, run_dir: str, world_size: int) -> str:
    """The first line of a run: what is trained on what, where, how."""
    precision = "bf16 autocast" if args.amp else "fp32" if device.type != "cuda" else \
        "strict fp32" if args.strict_fp32 else "fp32 (TF32 convolutions allowed)"  # see set_tf32
    return (f"{method}: {args.model} on {args.dataset} ({data}), strategy {args.strategy}, "
            f"{count_parameters(model) / 1e6:.2f} M params, device {device}, {precision}, run {run_dir}"
            + (f", {world_size} processes x {args.batch_size // world_size} images"
               f"{' (SyncBatchNorm)' if args.sync_bn else ''}" if world_size > 1 else ""))


# ---- training curves --------------------------------------------------------------------------


def draw_curves(run_dir: str, log) -> None:
    """curves.png of the run; a drawing failure is reported, never fatal to the run."""
    try:
        plot_training_curves([run_dir], os.path.join(run_dir, "curves.png"))
    except Exception as error:  # noqa: BLE001 (a plot must not end a training run)
        log(f"note: curves.png not drawn: {error}")


def plot_training_curves(run_dirs: list, path: str) -> bool:
    """training_curves_figure as a PNG; False, drawing nothing, without matplotlib."""
    figure = training_curves_figure(run_dirs)
    if figure is not None:
        figure.savefig(path, dpi=90)
    return figure is not None


def training_curves_figure(run_dirs: list):
    """Each run's metrics.jsonl against epochs: losses, training accuracy, and the held-out /
    monitored clean and PGD accuracy; several runs are overlaid (one colour each). None when
    matplotlib is not installed (it is never required)."""
    try:
        from matplotlib.figure import Figure  # the object-oriented API: no pyplot state, no display
    except ImportError:
        return None
    figure = Figure(figsize=(15, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    for index, run_dir in enumerate(run_dirs):
        with open(os.path.join(run_dir, "metrics.jsonl")) as file:
            lines = [json.loads(line) for line in file if line.strip()]
        colour, label = f"C{index}", os.path.basename(os.path.normpath(run_dir))
        epochs = [m["epoch"] for m in lines]
        for style, name in zip(("-", "--", ":", "-."), [n for n in LOSS_NAMES if lines and n in lines[-1]]):
            axes[0].plot(epochs, [m[name] for m in lines], style, color=colour, label=f"{label}: {name}")
        axes[1].plot(epochs, [100 * m["train_accuracy"] for m in lines], color=colour, label=label)
        for style, name in (("-", "monitor"), ("--", "val")):
            for marker, kind in (("o", "clean"), ("x", "robust")):
                points = [(m["epoch"], 100 * m[f"{name}_{kind}"]) for m in lines if f"{name}_{kind}" in m]
                if points:
                    axes[2].plot(*zip(*points), style, marker=marker, color=colour, label=f"{label}: {name} {kind}")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="losses")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="training accuracy")
    axes[2].set(xlabel="epoch", ylabel="accuracy (%)", title="clean (o) and PGD (x) accuracy")
    figure.suptitle("training accuracy: training batches in train mode (FSR: Gumbel-noise masks; CIFS: masks from "
                    "the true label's logit). monitor (solid): fixed test images, monitoring only; val (dashed): "
                    "held-out training images (best.pt)", fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="x-small")
    return figure
