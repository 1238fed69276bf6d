"""An MLP regression on scikit-learn's diabetes data (442 patients, 10 features, shipped with scikit-learn).

    parallelnn run examples/diabetes_mlp.py:build
    parallelnn run examples/diabetes_mlp.py:build --strategy tensor --nproc 2
"""

import torch
from sklearn.datasets import load_diabetes
from torch import nn

import parallelnn


def build(cfg):
    X, y = load_diabetes(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    train, test = order[:353], order[353:]
    # Standardise with the training split's statistics only.
    x_mean, x_std = X[train].mean(0), X[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    X, y = (X - x_mean) / x_std, (y - y_mean) / y_std
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return parallelnn.Workload(model=model, train=(X[train], y[train]), test=(X[test], y[test]), task="regression",
                               dataset="diabetes (scikit-learn, 442 samples, standardised)",
                               epochs=100, batch_size=32, lr=1e-3)
