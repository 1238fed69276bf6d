"""A CNN on scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn): classification.

    parallelnn run examples/digits_cnn.py:build --epochs 20
    parallelnn run examples/digits_cnn.py:build --strategy pipeline --nproc 2
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import parallelnn


def build(cfg):
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed))
    train, test = order[:1437], order[1437:]  # 80 / 20
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 16 x 4 x 4
        nn.Flatten(),
        nn.Linear(256, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    return parallelnn.Workload(model=model, train=(images[train], labels[train]), test=(images[test], labels[test]),
                               task="classification", dataset="digits (scikit-learn, 1,797 8x8 images)",
                               epochs=20, batch_size=64, lr=3e-3)
