"""The loaders of data.py on tiny fake datasets written in the exact on-disk formats of the real
ones, then one training step of fsr.py and cifs.py on each (issue 22: the first GPU run must not be
the first read of these files).

Formats, as published:
  * CIFAR-10 / CIFAR-100 (https://www.cs.toronto.edu/~kriz/cifar.html): Python 2 cPickle files
    (protocol 2; keys and file names are Python 2 str, so they read as b'data', b'labels' under
    Python 3's `encoding='bytes'` and as 'data' under torchvision's `encoding='latin1'`); `data` a
    uint8 numpy array N x 3072 (1024 red, 1024 green, 1024 blue values, each a row-major 32 x 32
    plane); cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (label_names);
    cifar-100-python/train, test, meta (fine_label_names, coarse_label_names), labels in
    fine_labels and coarse_labels.
  * SVHN format 2 (http://ufldl.stanford.edu/housenumbers/): train_32x32.mat and test_32x32.mat,
    MATLAB v5 files with X (32 x 32 x 3 x N, uint8) and y (N x 1), digit 0 stored as label 10.
  * Tiny ImageNet (http://cs231n.stanford.edu/tiny-imagenet-200.zip): tiny-imagenet-200/ with
    wnids.txt (one wnid a line, not sorted), train/<wnid>/images/<wnid>_<i>.JPEG plus
    train/<wnid>/<wnid>_boxes.txt, val/images/val_<i>.JPEG with val/val_annotations.txt
    ("<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"), test/images/ without labels; 64 x 64 JPEGs, a few
    of them grayscale.
  * Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist): idx files
    train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (magic 0x00000803 / 0x00000801,
    big-endian dimensions), gzipped as distributed or not, in <root>/, in torchvision's
    <root>/FashionMNIST/raw/, or where Debian's dataset-fashion-mnist package puts them.

torchvision checks the MD5 sums of the CIFAR and SVHN files before it reads them; the fake files
cannot match them, so the tests that read them replace that check by an existence check (the
`no_md5` fixture). Without it, the files are refused: test_fake_files_fail_the_md5_check_* check
that this refusal says what is wrong.
"""

import gzip
import os
import pickle
import struct
from collections import Counter

import numpy as np
import pytest
import torch

import cifs
import fsr
import data
import run_support
from data import DATASETS, DatasetNotFoundError, load_dataset

QUIET = dict(log=lambda *a: None)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's CIFAR and SVHN classes accept files that exist (they check MD5 sums otherwise;
    with download=True, as the training scripts load, SVHN checks them again in download_url)."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn
    import torchvision.datasets.utils
    exists = lambda path, md5=None: os.path.isfile(path)  # noqa: E731
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.utils):
        monkeypatch.setattr(module, "check_integrity", exists)


def random_images(n, shape, seed):
    """uint8 images with every value 0..255 present (so the range check can fail)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    images.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    return images


# =============================================================================================
# CIFAR: Python 2 pickles
# =============================================================================================


def _py2(obj) -> bytes:
    """Pickle protocol-2 opcodes for `obj` as Python 2's cPickle wrote them (bytes stand for Python 2
    str); numpy arrays as numpy 1.x under Python 2 pickled them (numpy.core.multiarray._reconstruct,
    raw data as a str)."""
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, bytes):
        return (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(_py2, obj)) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(map(_py2, obj)) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):
        assert obj.dtype == np.uint8
        dtype = b"cnumpy\ndtype\n" + _py2((b"u1", 0, 1)) + b"R" + _py2((3, b"|", None, None, None, -1, -1, 0)) + b"b"
        return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + _py2((0,)) + _py2(b"b") + b"tR"
                + b"(" + _py2(1) + _py2(tuple(obj.shape)) + dtype + _py2(False) + _py2(obj.tobytes()) + b"tb")
    raise TypeError(type(obj))


def write_py2_pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x80\x02" + _py2(obj) + b".")


def cifar_rows(images):
    """N x 3 x 32 x 32 -> N x 3072: the red plane, then green, then blue, each row-major."""
    return images.reshape(len(images), 3072).numpy()


def write_cifar10(root, per_batch=4, n_test=10):
    """5 training batches of `per_batch` images (labels i % 10 over the whole split), a test batch."""
    folder = os.path.join(root, "cifar-10-batches-py")
    train = random_images(5 * per_batch, (3, 32, 32), seed=1)
    train_labels = [i % 10 for i in range(5 * per_batch)]
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        write_py2_pickle(os.path.join(folder, f"data_batch_{b + 1}"), {
            b"batch_label": f"training batch {b + 1} of 5".encode(), b"labels": train_labels[rows],
            b"data": cifar_rows(train[rows]), b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]})
    test = random_images(n_test, (3, 32, 32), seed=2)
    test_labels = [(3 * i) % 10 for i in range(n_test)]
    write_py2_pickle(os.path.join(folder, "test_batch"), {
        b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": cifar_rows(test),
        b"filenames": [f"t_{i}.png".encode() for i in range(n_test)]})
    write_py2_pickle(os.path.join(folder, "batches.meta"), {
        b"num_cases_per_batch": per_batch, b"num_vis": 3072,
        b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                              "horse", "ship", "truck")]})
    return (train, torch.tensor(train_labels)), (test, torch.tensor(test_labels))


def write_cifar100(root, n_train=30, n_test=12):
    """Fine labels 0..99 spread over the split (never equal to the coarse label, so a loader that
    read the coarse labels would fail the test)."""
    folder = os.path.join(root, "cifar-100-python")
    splits = {}
    for name, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        images = random_images(n, (3, 32, 32), seed=seed)
        fine = [(37 * i + 5) % 100 for i in range(n)] if name == "train" else [i % 10 for i in range(n)]
        coarse = [(f // 5 + 1) % 20 for f in fine]
        write_py2_pickle(os.path.join(folder, name), {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)], b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine, b"coarse_labels": coarse, b"data": cifar_rows(images)})
        splits[name] = (images, torch.tensor(fine))
    write_py2_pickle(os.path.join(folder, "meta"), {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return splits["train"], splits["test"]


def test_fake_cifar_pickles_read_like_the_real_ones(tmp_path):
    """The reading recipe of the CIFAR page (Python 3, encoding='bytes') sees b'data' and b'labels'."""
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (4, 3072)
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        assert {b"fine_labels", b"coarse_labels", b"data"} <= set(pickle.load(f, encoding="bytes"))
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"][0] == "airplane"  # torchvision's encoding


def check_split(split, images, labels, name):
    info = DATASETS[name]
    assert split.images.dtype == torch.uint8 and split.images.shape == (len(labels), *info.shape)
    assert split.images.is_contiguous() and split.labels.dtype == torch.int64
    assert split.num_classes == info.num_classes
    if images is not None:  # lossless formats: exactly the pixels written, in N x C x H x W
        assert torch.equal(split.images, images)
        assert split.images.min() == 0 and split.images.max() == 255
    assert torch.equal(split.labels, labels)
    assert Counter(split.labels.tolist()) == Counter(labels.tolist())


def test_cifar10_pickles(tmp_path, no_md5):
    (train, train_labels), (test, test_labels) = write_cifar10(tmp_path)
    check_split(load_dataset("cifar10", tmp_path, train=True, download=False), train, train_labels, "cifar10")
    check_split(load_dataset("cifar10", tmp_path, train=False, download=False), test, test_labels, "cifar10")
    assert Counter(train_labels.tolist()) == {k: 2 for k in range(10)}


def test_cifar100_pickles_give_the_fine_labels(tmp_path, no_md5):
    (train, fine), (test, test_fine) = write_cifar100(tmp_path)
    split = load_dataset("cifar100", tmp_path, train=True, download=False)
    check_split(split, train, fine, "cifar100")
    assert split.labels.max() > 19  # fine labels (0..99), not the 20 coarse ones
    check_split(load_dataset("cifar100", tmp_path, train=False, download=False), test, test_fine, "cifar100")


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_fake_files_fail_the_md5_check_with_a_message_that_says_so(tmp_path, name):
    """Files that are there but not the published ones (torchvision's MD5 check: a truncated or
    altered download) were reported as 'not found', which sends the user looking for files that
    are already in place. The message must say the files are there and fail the check."""
    if name == "svhn":
        pytest.importorskip("scipy")
        write_svhn(tmp_path)
    else:
        write_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, tmp_path, train=True, download=False)
    message = str(error.value)
    assert "MD5" in message and "not found" not in message and str(tmp_path) in message
    assert "\n" not in message
    # Missing files still say "not found".
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_dataset(name, tmp_path / "empty", train=True, download=False)


# =============================================================================================
# SVHN: MATLAB .mat
# =============================================================================================


def write_svhn(root, n_train=20, n_test=10):
    """X: 32 x 32 x 3 x N uint8 (X[:, :, :, i] is image i as rows x columns x RGB); y: N x 1 with
    digit 0 stored as 10 (labels 1..10, as the published files)."""
    import scipy.io
    splits = {}
    for name, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        images = random_images(n, (3, 32, 32), seed)
        digits = torch.tensor([i % 10 for i in range(n)])
        stored = torch.where(digits == 0, 10, digits).to(torch.uint8)
        x = images.permute(2, 3, 1, 0).numpy()  # N x C x H x W -> H x W x C x N
        scipy.io.savemat(os.path.join(root, f"{name}_32x32.mat"), {"X": x, "y": stored.numpy().reshape(n, 1)})
        splits[name] = (images, digits)
    return splits["train"], splits["test"]


def test_svhn_mat_files_label_10_is_digit_0(tmp_path, no_md5):
    pytest.importorskip("scipy", reason="torchvision reads SVHN's .mat files with scipy")
    (train, digits), (test, test_digits) = write_svhn(tmp_path)
    import scipy.io
    assert scipy.io.loadmat(tmp_path / "train_32x32.mat")["y"].min() == 1  # 10, not 0, on disk
    split = load_dataset("svhn", tmp_path, train=True, download=False)
    check_split(split, train, digits, "svhn")
    assert (split.labels == 0).sum() == 2 and split.labels.max() == 9
    check_split(load_dataset("svhn", tmp_path, train=False, download=False), test, test_digits, "svhn")


# =============================================================================================
# Tiny ImageNet: the tiny-imagenet-200 folder
# =============================================================================================

# Listed unsorted, as the real wnids.txt: class k is the k-th wnid in sorted order.
WNIDS = ["n09193705", "n01443537", "n02085620"]
COLOUR = {"n01443537": (200, 30, 30), "n02085620": (30, 200, 30), "n09193705": (30, 30, 200)}  # class 0, 1, 2


def write_jpeg(path, wnid, grayscale=False):
    from PIL import Image
    pixels = np.empty((64, 64, 3), dtype=np.uint8)
    pixels[:] = COLOUR[wnid]
    image = Image.fromarray(pixels)
    (image.convert("L") if grayscale else image).save(path, "JPEG")


def write_tinyimagenet(root, per_class=4):
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(base)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in WNIDS))
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.write("".join(f"{w}\tsomething\n" for w in WNIDS))
    for w in WNIDS:
        folder = os.path.join(base, "train", w, "images")
        os.makedirs(folder)
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w") as f:
            for i in range(per_class):
                write_jpeg(os.path.join(folder, f"{w}_{i}.JPEG"), w, grayscale=(w, i) == ("n02085620", 1))
                f.write(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
    os.makedirs(os.path.join(base, "val", "images"))
    val_wnids = [WNIDS[(i * 2) % 3] for i in range(9)]  # every class three times, not in class order
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for i, w in enumerate(val_wnids):
            write_jpeg(os.path.join(base, "val", "images", f"val_{i}.JPEG"), w)
            f.write(f"val_{i}.JPEG\t{w}\t{i}\t{i}\t{40 + i}\t{50 + i}\n")
    os.makedirs(os.path.join(base, "test", "images"))
    write_jpeg(os.path.join(base, "test", "images", "test_0.JPEG"), WNIDS[0])  # unlabelled: never read
    index = {w: k for k, w in enumerate(sorted(WNIDS))}
    train_labels = torch.tensor([index[w] for w in sorted(WNIDS) for _ in range(per_class)])
    # The loader reads val/ in file-name order (val_annotations.txt sorted by file name).
    val_labels = torch.tensor([index[w] for _, w in sorted((f"val_{i}.JPEG", w) for i, w in enumerate(val_wnids))])
    return train_labels, val_labels


def dominant_channel(images):
    """The class each image was drawn in (JPEG is lossy: compare colours, not pixels)."""
    return images.float().mean((2, 3)).argmax(1)


def test_tinyimagenet_folder_labels_from_wnids_and_val_annotations(tmp_path):
    train_labels, val_labels = write_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", tmp_path, train=True, download=False)
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 3, 64, 64)
    assert train.num_classes == len(WNIDS) and torch.equal(train.labels, train_labels)
    assert Counter(train.labels.tolist()) == {0: 4, 1: 4, 2: 4}
    grey = train.images[5]  # n02085620_1.JPEG, written as a one-channel JPEG: expanded to RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    colour = torch.cat([train.images[:5], train.images[6:]])
    assert torch.equal(dominant_channel(colour), torch.cat([train.labels[:5], train.labels[6:]]))
    val = load_dataset("tinyimagenet", tmp_path, train=False, download=False)
    assert val.images.shape == (9, 3, 64, 64) and torch.equal(val.labels, val_labels)
    assert torch.equal(dominant_channel(val.images), val.labels)
    assert Counter(val.labels.tolist()) == {0: 3, 1: 3, 2: 3}


# =============================================================================================
# Fashion-MNIST: idx files, raw or gzipped, in three places
# =============================================================================================


def idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fmnist(folder, gz, n_train=20, n_test=10):
    os.makedirs(folder, exist_ok=True)
    splits = {}
    for prefix, n, seed in (("train", n_train, 7), ("t10k", n_test, 8)):
        images = random_images(n, (28, 28), seed)
        labels = torch.tensor([(i * 7) % 10 for i in range(n)])
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images.numpy()),
                            (f"{prefix}-labels-idx1-ubyte", labels.numpy().astype(np.uint8))):
            data = idx(array)
            assert data[:4] == (b"\x00\x00\x08\x03" if "images" in stem else b"\x00\x00\x08\x01")
            opener = gzip.open if gz else open
            with opener(os.path.join(folder, stem + (".gz" if gz else "")), "wb") as f:
                f.write(data)
        splits[prefix] = (images.unsqueeze(1), labels)
    return splits["train"], splits["t10k"]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("layout", ["root", "torchvision", "debian"])
def test_fmnist_idx_files_in_every_supported_place(tmp_path, monkeypatch, layout, gz):
    root, system = tmp_path / "data", tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(system))
    folder = {"root": root, "torchvision": root / "FashionMNIST" / "raw", "debian": system}[layout]
    (train, labels), (test, test_labels) = write_fmnist(str(folder), gz)
    os.makedirs(root, exist_ok=True)
    monkeypatch.chdir(tmp_path)  # Debian's copy stands in only for the default root ("data", no --data-root)
    root = None if layout == "debian" else root
    check_split(load_dataset("fmnist", root, train=True, download=False), train, labels, "fmnist")
    check_split(load_dataset("fmnist", root, train=False, download=False), test, test_labels, "fmnist")
    assert ("Debian's copy" in load_dataset("fmnist", root, download=False).source) == (layout == "debian")


def test_an_explicit_data_root_is_used_or_refused_never_replaced(tmp_path, monkeypatch, capsys):
    """fsr.py --dataset fmnist --data-root afile trained on Debian's copy: an explicit root is now used or
    refused in one line; a failed look-up (download included) leaves no folder it created."""
    system = tmp_path / "system"
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(system))
    write_fmnist(str(system), gz=True)

    def offline(root, **_):  # torchvision creates <root>/FashionMNIST/raw, then the download fails
        os.makedirs(os.path.join(root, "FashionMNIST", "raw"), exist_ok=True)
        raise RuntimeError("offline")

    monkeypatch.setattr(data.torchvision.datasets, "FashionMNIST", offline)
    for root in (tmp_path / "new" / "data", tmp_path / "system" / "FashionMNIST" / "raw"):
        with pytest.raises(DatasetNotFoundError, match=str(root)):
            load_dataset("fmnist", root)
    assert sorted(os.listdir(tmp_path)) == ["system"] and sorted(os.listdir(system)) == sorted(
        f"{p}-{k}-idx{n}-ubyte.gz" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1)))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        fsr.main(["--dataset", "fmnist", "--data-root", str(afile), "--device", "cpu", "--runs-dir", str(tmp_path)])
    assert str(exit_info.value.code) == f"error: --data-root {afile} is a file: give the folder that holds the dataset"
    assert sorted(os.listdir(tmp_path)) == ["afile", "system"] and "Traceback" not in capsys.readouterr().err


# =============================================================================================
# One training step of each script on each format
# =============================================================================================


def write_format(name, root):
    if name == "cifar10":
        write_cifar10(root)
    elif name == "cifar100":
        write_cifar100(root)
    elif name == "svhn":
        pytest.importorskip("scipy", reason="torchvision reads SVHN's .mat files with scipy")
        write_svhn(root)
    elif name == "tinyimagenet":
        write_tinyimagenet(root)
    else:
        write_fmnist(os.path.join(root, "FashionMNIST", "raw"), gz=True)


@pytest.mark.parametrize("script", [fsr, cifs], ids=["fsr", "cifs"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "tinyimagenet", "fmnist"])
def test_one_training_epoch_of_each_script_on_each_format(tmp_path, no_md5, name, script):
    """The whole training loop (data loading through load_splits, the dataset's augmentation,
    the TRADES attack, the update, the monitored test images, last.pt) on the fake files, with the
    small network; --train-size and --monitor-size are checked against the real dataset sizes in
    check_args and then take what the files hold."""
    root = tmp_path / "data"
    os.makedirs(root)
    write_format(name, str(root))
    args = script.Args(dataset=name, data_root=str(root), model="smallcnn", strategy="trades", epochs=1,
                       batch_size=8, attack_steps=1, train_size=10, monitor_size=10, eval_every=1, eval_steps=1,
                       device="cpu", log_interval=1e9, runs_dir=str(tmp_path / "runs"), run_name="run")
    metrics = script.train(args, **QUIET)
    assert metrics["epoch"] == 1 and np.isfinite(metrics["loss"])
    assert 0 <= metrics["monitor_robust"] <= metrics["monitor_clean"] <= 1
    checkpoint = run_support.load_checkpoint(str(tmp_path / "runs" / "run" / "last.pt"), script.METHOD)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["dataset"] == name
    info = DATASETS[name]
    # The network takes the dataset's images and has one output per class of the dataset.
    assert checkpoint["model"]["conv1.0.weight"].shape[1] == info.shape[0]
    assert checkpoint["model"]["classifier.weight"].shape[0] == info.num_classes
