"""MNIST: the study's SimpleCNN on normalized 28x28 digits.

Data, in order of precedence: ``--data DIR`` (the four standard IDX files, raw or .gz),
``--download`` (the official files, fetched once into the cache and checked), or the embedded
default: 5,000 real MNIST images split 4,000/1,000, labelled ``mnist-5k (embedded subset)``.
"""

from __future__ import annotations

import torch
from torch import nn

from parallelnn.data.idx import read_mnist_dir
from parallelnn.data.loaders import ArraySplit
from parallelnn.data.sources import EMBEDDED_MNIST, download_mnist, embedded_mnist_dir
from parallelnn.workloads import Workload, classifier

EPOCHS = 10  # the study's
MEAN, STD = 0.1307, 0.3081


def simple_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 28, 28] -> float [..., 1, 28, 28] scaled to [0, 1] then normalized (ToTensor + Normalize)."""
    x = images.to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(-3)


def build(cfg, device: torch.device, log=print) -> Workload:
    if cfg.download:
        directory = download_mnist(cfg.data, log=log)
        dataset = f"mnist (official, {directory})"
    elif cfg.data:
        directory, dataset = cfg.data, f"mnist-idx:{cfg.data}"
    else:
        directory, dataset = embedded_mnist_dir(), EMBEDDED_MNIST
    arrays = {k: torch.from_numpy(v.copy()) for k, v in read_mnist_dir(directory).items()}
    if dataset != EMBEDDED_MNIST:
        n_train, n_test = len(arrays["train_images"]), len(arrays["test_images"])
        if (n_train, n_test) == (60000, 10000) and not cfg.download:
            dataset = f"mnist (60k/10k, {directory})"
    torch.manual_seed(cfg.seed)
    model = simple_cnn()
    # channels_last lets oneDNN (CPU) and cuDNN pick their fastest convolution kernels.
    model = model.to(memory_format=torch.channels_last)
    return classifier(model, ArraySplit(arrays["train_images"], arrays["train_labels"].long(), prepare),
                      ArraySplit(arrays["test_images"], arrays["test_labels"].long(), prepare), dataset, EPOCHS)
