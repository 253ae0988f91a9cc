"""Datasets and loaders of cifs.py, fsr.py and evaluate.py: the table of dataset facts, the readers of
the five benchmarks and of a learnable synthetic stand-in, and `DeviceLoader`, which keeps a split on the
device as uint8 and augments there. Plumbing: a reader of the methods may skip it.

Every split is stored as uint8 N x C x H x W on the CPU (4x smaller than float32, exactly what the
files hold) and turned into float32 in [0, 1] per batch. No mean/std normalisation anywhere (as in both
official codes)."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import urllib.error
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple  # (C, H, W)
    epsilon: float  # default L-inf budget of the threat model
    augment: str  # 'crop_flip' (pad + random crop + h-flip) or 'none'
    padding: int  # crop padding; 0 when augment == 'none'
    train_size: int  # images in the full training split (for epoch-time estimates)
    test_size: int  # images in the test split (Tiny ImageNet: val/)


# The one table of per-dataset facts (FSR §4.1, CIFS appendices B-D): shapes, default eps and augmentation.
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), 8 / 255, "crop_flip", 4, 50_000, 10_000),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), 8 / 255, "crop_flip", 4, 50_000, 10_000),
    # A decision of ours: no augmentation for SVHN, as FSR's train.py (the CIFS code crops + flips).
    "svhn": DatasetInfo("svhn", 10, (3, 32, 32), 8 / 255, "none", 0, 73_257, 26_032),
    # Nothing is published for Tiny ImageNet's augmentation; we use the CIFAR recipe.
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, (3, 64, 64), 8 / 255, "crop_flip", 4, 100_000, 10_000),
    "fmnist": DatasetInfo("fmnist", 10, (1, 28, 28), 0.3, "none", 0, 60_000, 10_000),
    # Offline stand-in for tests and demos (any shape). No flips: a mirrored grating is another class.
    "synthetic": DatasetInfo("synthetic", 10, (3, 32, 32), 8 / 255, "none", 0, 5_000, 1_000),
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
    source: str = ""  # where it was read from (the console says it)

    def __post_init__(self):  # fail here rather than deep inside a training loop
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 NxCxHxW, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self):
        return len(self.labels)


class DatasetNotFoundError(FileNotFoundError):
    """The files are not on disk and could not be downloaded; the message says which, where, and whence."""


# ---- cifar10, cifar100, svhn: torchvision's classes -----------------------------------------

# name -> (torchvision class, the files under root it reads for the (train, test) split, official URL)
_TORCHVISION = {
    "cifar10": ("CIFAR10", ([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/batches.meta"],
                            ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"]),
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", (["cifar-100-python/train", "cifar-100-python/meta"],
                              ["cifar-100-python/test", "cifar-100-python/meta"]),
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "svhn": ("SVHN", (["train_32x32.mat"], ["test_32x32.mat"]),
             "http://ufldl.stanford.edu/housenumbers/train_32x32.mat and .../test_32x32.mat"),
}


@contextlib.contextmanager
def no_new_empty_folders(*folders: str):
    """A failed look-up or download leaves none of `folders` (deepest first), or the missing parents of the last,
    behind empty if it created them; folders that existed, or now hold something, stay."""
    folders = [os.path.abspath(f) for f in folders]
    while not os.path.exists(os.path.dirname(folders[-1])):
        folders.append(os.path.dirname(folders[-1]))
    new = [folder for folder in folders if not os.path.exists(folder)]
    try:
        yield
    except BaseException:
        for folder in new:
            with contextlib.suppress(OSError):  # not empty, or not ours to remove: left alone
                os.rmdir(folder)
        raise


def _load_torchvision(name: str, root: str, train: bool, download: bool) -> ImageSplit:
    cls_name, files, url = _TORCHVISION[name]
    files = [os.path.join(root, f) for f in files[0 if train else 1]]
    if name == "svhn":
        try:
            import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
        except ImportError:  # fail before a 240 MB download that could not be read anyway
            raise ImportError(f"SVHN is stored as .mat files, which torchvision reads with scipy; scipy is not a "
                              f"project dependency: `pip install scipy` to use svhn. Files expected: "
                              f"{', '.join(files)}, from {url}.") from None
    kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        with no_new_empty_folders(root):
            ds = getattr(torchvision.datasets, cls_name)(root, download=download, **kwargs)
    except (RuntimeError, OSError, urllib.error.URLError) as e:  # torchvision's message names no file
        if all(os.path.isfile(f) for f in files):  # all there: torchvision's MD5 check refused them
            raise DatasetNotFoundError(f"dataset {name!r}: the files are under root {root!r} ({', '.join(files)}) "
                                       f"but fail torchvision's MD5 check (an incomplete or altered download?): "
                                       f"delete them and get them again from {url}") from e
        raise DatasetNotFoundError(f"dataset {name!r} not found under root {root!r} and not downloadable (offline, "
                                   f"or download=False). Expected: {', '.join(files)}. Get it from {url} and unpack "
                                   f"it into {root!r}.") from e
    if name == "svhn":  # already N x 3 x 32 x 32; torchvision maps digit '10' to 0
        return ImageSplit(torch.from_numpy(np.ascontiguousarray(ds.data)), torch.as_tensor(ds.labels), 10, root)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return ImageSplit(images, torch.as_tensor(ds.targets, dtype=torch.int64), DATASETS[name].num_classes, root)


# ---- Fashion-MNIST: idx files read here (the offline Debian package first) --------------------

FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's `dataset-fashion-mnist`: four idx .gz files
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# idx type codes (http://yann.lecun.com/exdb/mnist/, bottom of the page); data is big-endian.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped): 2 zero bytes, a type code, the number of dims, one big-endian
    uint32 per dim, then the data."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
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
    if len(raw) - 4 - 4 * ndim != math.prod(dims) * dtype.itemsize:
        raise ValueError(f"malformed idx file {path!r}: header says shape {dims} ({math.prod(dims) * dtype.itemsize} "
                         f"bytes) but {len(raw) - 4 - 4 * ndim} bytes follow")
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=dtype).reshape(dims)


def _idx_file(folder: str, stem: str) -> str | None:
    return next((os.path.join(folder, stem + ext) for ext in ("", ".gz")
                 if os.path.isfile(os.path.join(folder, stem + ext))), None)


def _load_fmnist(root: str, train: bool, download: bool, system: bool) -> ImageSplit:
    """`system`: Debian's copy may stand in (no --data-root given); an explicit root is used or refused."""
    prefix = "train" if train else "t10k"
    folders = [root, os.path.join(root, "FashionMNIST", "raw")] + ([FMNIST_SYSTEM_DIR] if system else [])
    for folder in folders:
        paths = [_idx_file(folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        if None in paths:
            continue
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.dtype != np.uint8 or images.ndim != 3 or labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(f"malformed Fashion-MNIST idx files {paths[0]!r} / {paths[1]!r}: expected uint8 "
                             f"N x 28 x 28 images and N labels, got {images.shape} / {labels.shape}")
        if len(images) != len(labels) or (len(labels) and labels.max() >= 10):
            raise ValueError(f"Fashion-MNIST idx files {paths[0]!r} / {paths[1]!r} disagree: {len(images)} images, "
                             f"{len(labels)} labels, max label {labels.max(initial=0)}")
        # np.frombuffer views are read-only: copy into writable, owned tensors
        return ImageSplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10,
                          folder + (" (Debian's copy; pass --data-root to use another)" if folder == FMNIST_SYSTEM_DIR else ""))
    msg = (f"Fashion-MNIST {prefix} idx files ({prefix}-images-idx3-ubyte, {prefix}-labels-idx1-ubyte, raw or .gz) "
           f"not found in any of: {', '.join(folders)}. Offline: `apt-get install dataset-fashion-mnist` (installs "
           f"them in {FMNIST_SYSTEM_DIR}{'' if system else ', read when no --data-root is given'}), or copy them "
           f"from {FMNIST_URL} into {root!r}.")
    if not download:
        raise DatasetNotFoundError(msg + " (download=False)")
    try:  # torchvision downloads into <root>/FashionMNIST/raw/, which we search next time
        with no_new_empty_folders(folders[1], os.path.dirname(folders[1]), root):
            ds = torchvision.datasets.FashionMNIST(root, train=train, download=True)
    except (RuntimeError, OSError, urllib.error.URLError) as e:
        raise DatasetNotFoundError(msg + f" Download failed: {' '.join(str(e).split())}") from e  # one line
    return ImageSplit(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64), 10, folders[1])


# ---- Tiny ImageNet: the standard tiny-imagenet-200 folder, decoded once and cached --------------

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _load_tinyimagenet(root: str, train: bool) -> ImageSplit:
    """Class index = position of the wnid in sorted(wnids), the order torchvision's ImageFolder gives on
    train/, so labels agree with code that uses it. val/ is the test split (test/ has no labels)."""
    base = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isfile(os.path.join(base, "wnids.txt")):
        raise DatasetNotFoundError(
            f"dataset 'tinyimagenet' not found: expected the folder {base}/ with wnids.txt, "
            f"train/<wnid>/images/*.JPEG and val/images/*.JPEG + val/val_annotations.txt. It is not in "
            f"torchvision and is never downloaded automatically: get {TINYIMAGENET_URL} and unzip it into {root!r}.")
    with open(os.path.join(base, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    cache = os.path.join(base, f"{'train' if train else 'val'}_uint8.pt")
    if os.path.isfile(cache):
        data = torch.load(cache, map_location="cpu", weights_only=True)
        if data["wnids"] == wnids:  # a changed wnids.txt invalidates the label order
            return ImageSplit(data["images"], data["labels"], len(wnids), base)
    if train:
        rows = [(os.path.join(base, "train", w, "images", n), w) for w in wnids
                for n in sorted(os.listdir(os.path.join(base, "train", w, "images"))) if n.endswith(".JPEG")]
    else:  # val_annotations.txt: "<file>\t<wnid>\t<x0>\t<y0>\t<x1>\t<y1>" per line
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            rows = [(os.path.join(base, "val", "images", name), w)
                    for name, w in sorted(line.split("\t")[:2] for line in f if line.strip())]
    shape = DATASETS["tinyimagenet"].shape
    images = torch.empty((len(rows), *shape), dtype=torch.uint8)  # preallocated: 100k images are 1.2 GB
    for i, (path, _) in enumerate(rows):  # mode=RGB: a few Tiny ImageNet images are grayscale
        image = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
        if tuple(image.shape) != shape:
            raise ValueError(f"{path!r} has shape {tuple(image.shape)}, expected {shape} (Tiny ImageNet is 64x64)")
        images[i] = image
    index, tmp = {w: i for i, w in enumerate(wnids)}, f"{cache}.tmp{os.getpid()}"
    labels = torch.tensor([index[w] for _, w in rows], dtype=torch.int64)
    try:  # written next to the target, then renamed: a crash never leaves a cache a later load would trust
        torch.save({"images": images, "labels": labels, "wnids": wnids}, tmp)
        os.replace(tmp, cache)
    except OSError as e:  # e.g. a read-only shared dataset folder: work, just slower next time
        if os.path.exists(tmp):
            os.remove(tmp)
        warnings.warn(f"could not write the Tiny ImageNet cache {cache!r}: {e}")
    return ImageSplit(images, labels, len(wnids), base)


# ---- Synthetic: class-conditional gratings a small CNN can learn --------------------------------


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
    labels = s_rng.permutation(np.arange(n) % num_classes)  # balanced, in random order
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
    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), num_classes, "generated")


# ---- Entry points ------------------------------------------------------------------------------


def load_dataset(name: str, root: str | None = None, train: bool = True, download: bool = True,
                 synthetic_shape: tuple | None = None, synthetic_size: int | None = None,
                 synthetic_classes: int = 10, seed: int = 0) -> ImageSplit:
    """One split as uint8 NCHW + int64 labels; train=False: the test split (Tiny ImageNet: val/).
    synthetic_* and seed only affect name='synthetic'. root None: "data", where Debian's Fashion-MNIST may stand in."""
    info = dataset_info(name)
    system, root = root is None, os.fspath("data" if root is None else root)
    if name == "synthetic":
        size = synthetic_size if synthetic_size is not None else (5000 if train else 1000)
        return make_synthetic(synthetic_classes, tuple(synthetic_shape or info.shape), size, seed, train)
    if name == "fmnist":
        return _load_fmnist(root, train, download, system)
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


# ---- Device-resident loader -------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:  # well spread: seed*K + epoch would let seeds share streams
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)


def crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to H x W at a random offset per image and flip each image
    horizontally with prob 0.5: one gather via index grids, any dtype (we use it on uint8)."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    rows = off[0, :, None] + torch.arange(h, device=dev)  # (b, h) source rows in padded image
    cols = off[1, :, None] + torch.arange(w, device=dev)  # (b, w) source cols
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the crop's columns backwards
    idx = torch.arange(b, device=dev)[:, None, None]
    # (b, H', W', C) indexed gives (b, h, w, C), back to NCHW (channels_last-strided: callers pick the format)
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
