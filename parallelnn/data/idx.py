"""The IDX format of MNIST (http://yann.lecun.com/exdb/mnist/): read with every check, and write.

An IDX file is two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the data. Images are ``2051`` (uint8, 3 dims), labels ``2049`` (uint8, 1 dim).
Files may be gzip-compressed; the reader looks at the bytes, not the name.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from parallelnn.errors import UserError

# IDX type code -> numpy dtype (big-endian where it matters).
DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}")
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise UserError(f"{path}: damaged gzip data ({err})")
    return raw


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file into a numpy array, checking magic number, header and data length."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise UserError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or code not in DTYPES or ndim == 0:
        raise UserError(f"{path}: bad IDX magic number {magic} (0x{magic:08x})")
    if expect_magic is not None and magic != expect_magic:
        raise UserError(f"{path}: magic number {magic}, expected {expect_magic}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise UserError(f"{path}: data {what}: {actual} bytes for dimensions {'x'.join(map(str, dims))} "
                        f"({expected} expected)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an array as IDX (gzip when the name ends in .gz, unless ``compress`` says otherwise)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype not in CODES:
        raise ValueError(f"write_idx supports uint8/int8 arrays, not {array.dtype}")
    header = struct.pack(">HBB", 0, CODES[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def find_mnist_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_mnist_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the four standard MNIST files from a directory (each raw or .gz) and check they agree."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--data {directory}: not a directory (mnist expects the four IDX files in a directory)")
    paths = {key: find_mnist_file(directory, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise UserError(f"--data {directory}: missing {', '.join(missing)} (raw or .gz)")
    arrays = {}
    for key, path in paths.items():
        images = key.endswith("images")
        arr = read_idx(path, IMAGES_MAGIC if images else LABELS_MAGIC)
        if arr.dtype != np.uint8:
            raise UserError(f"{path}: expected unsigned bytes, found {arr.dtype}")
        if images and arr.ndim != 3:
            raise UserError(f"{path}: images must have 3 dimensions, found {arr.ndim}")
        if not images and arr.ndim != 1:
            raise UserError(f"{path}: labels must have 1 dimension, found {arr.ndim}")
        arrays[key] = arr
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise UserError(f"--data {directory}: {split} split has {n_img} images but {n_lab} labels")
        if n_img == 0:
            raise UserError(f"--data {directory}: {split} split is empty")
        if arrays[f"{split}_labels"].max() > 9:
            raise UserError(f"{paths[f'{split}_labels']}: label {arrays[f'{split}_labels'].max()} is not a digit 0-9")
    shapes = {arrays[k].shape[1:] for k in ("train_images", "test_images")}
    if shapes != {(28, 28)}:
        raise UserError(f"--data {directory}: images are {' and '.join('x'.join(map(str, s)) for s in shapes)}, "
                        "the MNIST CNN needs 28x28")
    return arrays
