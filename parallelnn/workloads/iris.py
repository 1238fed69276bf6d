"""Iris: the study's SimpleNN (4 -> 50 -> ReLU -> 3) on standardized features.

Data: scikit-learn's bundled Iris, or ``--data FILE.csv`` of your own (a header row, numeric
feature columns, the class label in the last column). Stratified 80/20 split with the run's seed;
the StandardScaler is fit on the training split only.
"""

from __future__ import annotations

import csv

import numpy as np
import torch
from torch import nn

from parallelnn.data.loaders import ArraySplit
from parallelnn.errors import UserError
from parallelnn.workloads import Workload, classifier

EPOCHS = 100  # the study's; batch 64 and Adam at 1e-3 as for every study classifier
HIDDEN = 50


def simple_nn(n_features: int = 4, n_classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_classes))


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Numeric features + last-column labels from a CSV with a header row."""
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
    except OSError as err:
        raise UserError(f"--data {path}: {err.strerror}")
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--data {path}: not a readable CSV file ({err})")
    if len(rows) < 2:
        raise UserError(f"--data {path}: needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if len(header) < 2:
        raise UserError(f"--data {path}: needs at least one feature column and a label column")
    features, labels = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise UserError(f"--data {path}: line {line} has {len(row)} fields, the header has {len(header)}")
        try:
            features.append([float(v) for v in row[:-1]])
        except ValueError:
            raise UserError(f"--data {path}: line {line} has a non-numeric feature value")
        labels.append(row[-1].strip())
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"--data {path}: the label column '{header[-1]}' has fewer than two classes")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray(features, dtype=np.float32), np.asarray([index[c] for c in labels]), path


def build(cfg, device: torch.device, log=print) -> Workload:
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if cfg.data:
        X, y, source = read_csv(cfg.data)
        dataset = f"csv:{source}"
    else:
        iris = load_iris()
        X, y, dataset = iris.data.astype(np.float32), iris.target, "iris (scikit-learn, 150 samples)"
    n_classes = int(y.max()) + 1
    try:
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=cfg.seed)
    except ValueError as err:
        raise UserError(f"cannot split the data 80/20 by class: {err}")
    scaler = StandardScaler().fit(Xtr)
    mean = torch.tensor(scaler.mean_, dtype=torch.float32)
    scale = torch.tensor(scaler.scale_, dtype=torch.float32)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / scale

    torch.manual_seed(cfg.seed)
    model = simple_nn(X.shape[1], n_classes)
    return classifier(model, ArraySplit(torch.from_numpy(Xtr), torch.from_numpy(ytr).long(), prepare),
                      ArraySplit(torch.from_numpy(Xte), torch.from_numpy(yte).long(), prepare), dataset, EPOCHS)
