"""Shared fixtures: a learnable synthetic dataset and a small adversarially trained network.

Everything runs on the CPU in seconds: smallcnn on 3x16x16 synthetic images.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import attacks
from models import build_model
from data import make_synthetic

# One thread per test process: the suite runs one pytest-xdist worker per core (`-n auto`), and
# the tiny convolutions here are fastest, and least sensitive to other load, on a single thread.
torch.set_num_threads(1)

SHAPE = (3, 16, 16)
EPS = 8 / 255


def as_float(split):
    return split.images.float() / 255, split.labels


def adversarial_training(model, images, labels, eps, epochs, steps=3, lr=0.05, batch_size=100, seed=0):
    """The smallest Madry AT loop (the method scripts have the real one): PGD-steps, step eps/2."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for batch in order.split(batch_size):
            x, y = images[batch], labels[batch]
            x_adv = attacks.pgd(model, x, y, eps, eps / 2, steps) if steps else x
            model.train()
            loss = F.cross_entropy(model(x_adv)[0], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def synthetic():
    """(train_x, train_y, test_x, test_y) as float tensors in [0, 1]."""
    train = make_synthetic(10, SHAPE, 2000, seed=0, train=True)
    test = make_synthetic(10, SHAPE, 500, seed=0, train=False)
    return (*as_float(train), *as_float(test))


@pytest.fixture(scope="session")
def _robust_model(synthetic):
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, SHAPE)
    return adversarial_training(model, synthetic[0], synthetic[1], EPS, epochs=6)


@pytest.fixture
def robust_model(_robust_model):
    """A fresh copy per test, so that a test that breaks the model breaks only itself."""
    return copy.deepcopy(_robust_model)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x)[0].argmax(1) == y).float().mean().item()
