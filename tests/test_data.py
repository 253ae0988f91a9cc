"""Tests for the data part: dataset table, loaders (offline), synthetic data, DeviceLoader."""
import gzip
import os
import shutil
import struct
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from data import DATASETS, DatasetNotFoundError, DeviceLoader, ImageSplit, dataset_info, load_dataset, make_synthetic, split_validation


def data_module():
    # The module that defines the loaders, whatever it is called, for monkeypatching.
    return sys.modules[load_dataset.__module__]


def unique_split(n=64, shape=(3, 8, 8), seed=0):
    """Random nonzero images (so zero padding is recognisable), label i = image i."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ImageSplit(images, torch.arange(n), n)


# ----------------------------------------------------------------------------- table


def test_dataset_info_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        dataset_info("imagenet")
    for name in ("cifar10", "cifar100", "svhn", "tinyimagenet", "fmnist", "synthetic"):
        assert name in str(e.value)


def test_dataset_facts():
    c10, c100, svhn, tin, fm = (dataset_info(n) for n in ("cifar10", "cifar100", "svhn", "tinyimagenet", "fmnist"))
    assert (c10.num_classes, c10.shape, c10.epsilon, c10.augment, c10.padding) == (10, (3, 32, 32), 8 / 255, "crop_flip", 4)
    assert (c100.num_classes, c100.shape) == (100, (3, 32, 32))
    assert (svhn.num_classes, svhn.augment, svhn.padding) == (10, "none", 0)  # a decision of ours (as FSR's train.py)
    assert (tin.num_classes, tin.shape, tin.epsilon, tin.augment) == (200, (3, 64, 64), 8 / 255, "crop_flip")
    assert (fm.num_classes, fm.shape, fm.epsilon, fm.augment) == (10, (1, 28, 28), 0.3, "none")
    for name, info in DATASETS.items():
        assert info.name == name and (info.padding == 0) == (info.augment == "none")


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 64)])
def test_synthetic_format_and_balance(shape):
    s = make_synthetic(10, shape, 200, seed=0, train=True)
    assert s.images.dtype == torch.uint8 and s.images.shape == (200, *shape) and s.images.is_contiguous()
    assert s.labels.dtype == torch.int64 and len(s) == 200 and s.num_classes == 10
    assert Counter(s.labels.tolist()) == {k: 20 for k in range(10)}
    assert s.images.float().std() > 10  # not a constant image


def test_load_dataset_synthetic_defaults_and_overrides():
    train, test = load_dataset("synthetic"), load_dataset("synthetic", train=False)
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    small = load_dataset("synthetic", synthetic_shape=(1, 28, 28), synthetic_size=30, synthetic_classes=3)
    assert small.images.shape == (30, 1, 28, 28) and small.num_classes == 3 and set(small.labels.tolist()) == {0, 1, 2}


def test_synthetic_deterministic_and_seeded():
    a, b = make_synthetic(10, (3, 16, 16), 100, 0, True), make_synthetic(10, (3, 16, 16), 100, 0, True)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = make_synthetic(10, (3, 16, 16), 100, 1, True)
    assert not torch.equal(a.images, c.images)


def test_synthetic_train_and_test_are_different_samples():
    tr, te = make_synthetic(10, (3, 16, 16), 200, 0, True), make_synthetic(10, (3, 16, 16), 200, 0, False)
    flat_tr = {bytes(x.flatten().tolist()) for x in tr.images}
    assert not any(bytes(x.flatten().tolist()) in flat_tr for x in te.images)


def test_synthetic_templates_shared_by_splits_and_set_by_seed():
    # Class-mean images estimate the class templates: train and test (same seed)
    # must agree, another seed must give unrelated templates.
    def class_means(s):
        m = torch.stack([s.images[s.labels == k].float().mean(0) for k in range(10)])
        return (m - m.mean((1, 2, 3), keepdim=True)).flatten(1)

    train = class_means(make_synthetic(10, (3, 32, 32), 1000, 0, True))
    test = class_means(make_synthetic(10, (3, 32, 32), 1000, 0, False))
    other = class_means(make_synthetic(10, (3, 32, 32), 1000, 1, False))
    assert F.cosine_similarity(train, test).median() > 0.7
    assert F.cosine_similarity(train, other).median() < 0.3


def test_synthetic_classes_do_not_differ_by_mean_intensity():
    # Keeps PGD at 8/255 meaningful: the class signal is texture, not brightness.
    s = make_synthetic(10, (3, 32, 32), 1000, 0, True)
    means = torch.stack([s.images[s.labels == k].float().mean() for k in range(10)])
    assert means.max() - means.min() < 8  # out of 255


@pytest.fixture
def one_thread():
    # On a 2-core machine shared with other jobs, OpenMP threads that wait on each
    # other make tiny convolutions 10-20x slower; one thread is fast and predictable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_synthetic_is_learnable(one_thread):
    torch.manual_seed(0)
    train = load_dataset("synthetic", synthetic_size=1500, seed=3)
    test = load_dataset("synthetic", train=False, synthetic_size=500, seed=3)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = DeviceLoader(train, 64, seed=0)
    for epoch in range(10):
        for x, y in loader.epoch(epoch):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.6, f"synthetic test accuracy {acc:.2f} (chance 0.1)"


# ----------------------------------------------------------------------------- DeviceLoader


def test_loader_preserves_image_label_pairs():
    split = make_synthetic(10, (3, 8, 8), 100, 0, True)
    seen = []
    for x, y in DeviceLoader(split, 32, shuffle=True, seed=5).epoch(0):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 8, 8)
        assert x.min() >= 0 and x.max() <= 1 and x.device.type == "cpu"
        seen += [(bytes((xi * 255).round().to(torch.uint8).flatten().tolist()), int(yi)) for xi, yi in zip(x, y)]
    expected = [(bytes(xi.flatten().tolist()), int(yi)) for xi, yi in zip(split.images, split.labels)]
    assert Counter(seen) == Counter(expected)


def test_loader_no_shuffle_is_stored_order():
    split = unique_split(50)
    xs, ys = zip(*DeviceLoader(split, 16, shuffle=False).epoch(0))
    assert torch.equal(torch.cat(xs), split.images.float() / 255) and torch.equal(torch.cat(ys), split.labels)


def all_crop_flips(img, padding):
    """Every crop/flip the augmentation may produce, written independently of it."""
    _, h, w = img.shape
    padded = F.pad(img, (padding,) * 4)
    return {(dy, dx, flip): (c.flip(-1) if flip else c)
            for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for flip in (False, True)
            for c in [padded[:, dy:dy + h, dx:dx + w]]}


@pytest.mark.parametrize("padding", [2, 0])
def test_crop_flip_outputs_are_shifted_or_flipped_sources(padding):
    split = unique_split(64)
    used = set()
    for x, y in DeviceLoader(split, 20, augment="crop_flip", padding=padding, seed=1).epoch(0):
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32
        for xi, yi in zip((x * 255).round().to(torch.uint8), y):  # label i identifies source image i
            match = [k for k, c in all_crop_flips(split.images[yi], padding).items() if torch.equal(c, xi)]
            assert match, "augmented image is no crop/flip of its source"
            used.add(match[0])
    # The augmentation really is random: both flips and (with padding) many offsets occur.
    assert {k[2] for k in used} == {False, True}
    assert len({k[:2] for k in used}) >= (10 if padding else 1)


def batches(loader, epoch):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]


def same(a, b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_loader_reproducible_from_seed_and_epoch():
    split = unique_split(64)
    make = lambda seed: DeviceLoader(split, 16, augment="crop_flip", padding=2, seed=seed)  # noqa: E731
    first = batches(make(0), 3)
    assert same(first, batches(make(0), 3))  # a fresh loader (resumed run) sees the same epoch 3
    assert not same(first, batches(make(0), 4))  # epochs differ
    assert not same(first, batches(make(1), 3))  # seeds differ
    # Order alone (no augmentation) also changes across epochs.
    plain = DeviceLoader(split, 64, seed=0)
    assert not torch.equal(next(plain.epoch(0))[1], next(plain.epoch(1))[1])


@pytest.mark.parametrize("n,bs,drop_last,expected", [(100, 32, False, [32, 32, 32, 4]), (100, 32, True, [32, 32, 32]),
                                                       (96, 32, True, [32, 32, 32]), (10, 32, True, [])])
def test_loader_len_and_drop_last(n, bs, drop_last, expected):
    loader = DeviceLoader(unique_split(n), bs, drop_last=drop_last)
    assert len(loader) == len(expected)
    assert [len(y) for _, y in loader.epoch(0)] == expected


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_loader_channels_last(augment):
    split = unique_split(8)
    x, _ = next(DeviceLoader(split, 8, augment=augment, channels_last=True).epoch(0))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, _ = next(DeviceLoader(split, 8, augment=augment, channels_last=False).epoch(0))
    assert x.is_contiguous()


def test_loader_rejects_unknown_augment():
    with pytest.raises(ValueError):
        DeviceLoader(unique_split(4), 2, augment="mixup")


# ----------------------------------------------------------------------------- split_validation


def test_split_validation_disjoint_and_seeded():
    split = unique_split(100)
    train, val = split_validation(split, 20, seed=0)
    assert len(train) == 80 and len(val) == 20
    ids_t, ids_v = set(train.labels.tolist()), set(val.labels.tolist())
    assert not ids_t & ids_v and ids_t | ids_v == set(range(100))
    assert torch.equal(train.images, split.images[train.labels])  # images stay with their labels
    assert torch.equal(split_validation(split, 20, seed=0)[1].labels, val.labels)
    assert not torch.equal(split_validation(split, 20, seed=1)[1].labels, val.labels)
    assert split_validation(split, 0) == (split, None)
    with pytest.raises(ValueError):
        split_validation(split, 100)


# ----------------------------------------------------------------------------- files on disk


def test_missing_cifar10_offline_says_where_and_from_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert isinstance(e.value, FileNotFoundError)


def idx_bytes(array):
    """Encode a uint8 tensor as an idx file (type code 0x08, big-endian dims)."""
    return bytes([0, 0, 8, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape) + bytes(array.flatten().tolist())


def write_fmnist(folder, n=20, gz=True, prefix="train"):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))):
        data = idx_bytes(arr)
        if gz:
            with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as f:
                f.write(data)
        else:
            with open(os.path.join(folder, stem), "wb") as f:
                f.write(data)
    return images, labels


@pytest.mark.parametrize("gz,sub", [(True, ""), (False, os.path.join("FashionMNIST", "raw"))])
def test_fmnist_from_idx_folder(tmp_path, gz, sub):
    images, labels = write_fmnist(os.path.join(tmp_path, sub), gz=gz, prefix="t10k")
    s = load_dataset("fmnist", root=tmp_path, train=False, download=False)
    assert s.images.dtype == torch.uint8 and s.images.shape == (20, 1, 28, 28) and s.num_classes == 10
    assert torch.equal(s.images[:, 0], images) and torch.equal(s.labels, labels)


def test_fmnist_malformed_idx_is_a_clear_error(tmp_path):
    write_fmnist(tmp_path)
    bad = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x03" + b"\x00" * 50)  # wrong magic
    with pytest.raises(ValueError, match="malformed idx.*magic"):
        load_dataset("fmnist", root=tmp_path, download=False)
    with gzip.open(bad, "wb") as f:  # right header, too few pixels
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 20, 28, 28) + b"\x00" * 100)
    with pytest.raises(ValueError, match="malformed idx"):
        load_dataset("fmnist", root=tmp_path, download=False)


def test_fmnist_missing_names_folders_and_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module(), "FMNIST_SYSTEM_DIR", str(tmp_path / "no-system-copy"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fmnist", root=tmp_path / "data", download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "data") in msg
    assert os.path.join(str(tmp_path / "data"), "FashionMNIST", "raw") in msg


def write_fake_tinyimagenet(root):
    """2 classes ('n02' listed first in wnids.txt; sorted order makes 'n01' class 0),
    3 train images each, 4 val images; class 0 dark, class 1 bright; one grayscale JPEG."""
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(base)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("n02\nn01\n")
    level = {"n01": 30, "n02": 220}
    for w in level:
        folder = os.path.join(base, "train", w, "images")
        os.makedirs(folder)
        for i in range(3):
            channels = 1 if (w, i) == ("n02", 0) else 3
            img = torch.full((channels, 64, 64), level[w], dtype=torch.uint8)
            torchvision.io.write_jpeg(img, os.path.join(folder, f"{w}_{i}.JPEG"))
    os.makedirs(os.path.join(base, "val", "images"))
    val = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n01"), ("val_3.JPEG", "n02")]
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for name, w in val:
            f.write(f"{name}\t{w}\t0\t0\t63\t63\n")
            torchvision.io.write_jpeg(torch.full((3, 64, 64), level[w], dtype=torch.uint8), os.path.join(base, "val", "images", name))
    return base


def test_tinyimagenet_from_folder_with_cache(tmp_path):
    base = write_fake_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", root=tmp_path, download=False)
    assert train.images.dtype == torch.uint8 and train.images.shape == (6, 3, 64, 64) and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted wnids: n01 -> 0, n02 -> 1
    # Labels match content (JPEG is lossy: compare brightness, not pixels); the grayscale file became RGB.
    assert ((train.images.float().mean((1, 2, 3)) > 128).long() == train.labels).all()
    val = load_dataset("tinyimagenet", root=tmp_path, train=False)
    assert val.labels.tolist() == [1, 0, 0, 1] and val.images.shape == (4, 3, 64, 64)
    assert ((val.images.float().mean((1, 2, 3)) > 128).long() == val.labels).all()
    # Cache written, and reused: the second load works without the JPEGs.
    assert os.path.isfile(os.path.join(base, "train_uint8.pt")) and os.path.isfile(os.path.join(base, "val_uint8.pt"))
    assert not [n for n in os.listdir(base) if n.endswith(".tmp")]
    shutil.rmtree(os.path.join(base, "train"))
    again = load_dataset("tinyimagenet", root=tmp_path)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_tinyimagenet_missing_gives_url(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("tinyimagenet", root=tmp_path)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(e.value)
    assert os.path.join(str(tmp_path), "tiny-imagenet-200") in str(e.value)


def test_loader_shares_of_a_global_batch_make_the_single_process_batch():
    split = make_synthetic(10, (3, 8, 8), 103, seed=2, train=True)  # 103 = 3 x 32 + 7: a last batch of 7
    single = list(DeviceLoader(split, 32, shuffle=True, augment="crop_flip", seed=4).epoch(1))
    shares = [list(DeviceLoader(split, 32, shuffle=True, augment="crop_flip", seed=4, rank=r, world_size=2).epoch(1))
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(single) == 4
    for step, (x, y) in enumerate(single):
        x0, y0 = shares[0][step]
        x1, y1 = shares[1][step]
        assert len(y0) == len(y1)  # equal shares: the last batch of 7 loses one image
        assert torch.equal(torch.cat([x0, x1]), x[:len(y0) * 2]) and torch.equal(torch.cat([y0, y1]), y[:len(y0) * 2])
    assert len(shares[0][-1][1]) == 3
    # A last batch smaller than the process count is dropped, so no process gets an empty batch.
    assert len(DeviceLoader(split, 32, rank=0, world_size=8)) == 3
    with pytest.raises(ValueError, match="multiple of the process count"):
        DeviceLoader(split, 30, rank=0, world_size=4)
