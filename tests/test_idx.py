"""The IDX reader on files the tests write: good ones (raw and gzip) and each kind of damage."""

import gzip
import struct

import numpy as np
import pytest

from parallelnn.data.idx import MNIST_FILES, read_idx, read_mnist_dir, write_idx
from parallelnn.errors import UserError


def write_mnist(directory, n_train=20, n_test=10, compress=True, size=28, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        write_idx(directory / (MNIST_FILES[key] + (".gz" if compress else "")), arr)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_reads_back_what_was_written(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    got = read_mnist_dir(tmp_path)
    for key, arr in arrays.items():
        np.testing.assert_array_equal(got[key], arr)


def test_header_is_the_standard_one(tmp_path):
    write_idx(tmp_path / "x", np.zeros((3, 28, 28), dtype=np.uint8))
    raw = (tmp_path / "x").read_bytes()
    assert struct.unpack(">IIII", raw[:16]) == (2051, 3, 28, 28)
    assert len(raw) == 16 + 3 * 28 * 28


def test_gzip_is_detected_by_content_not_name(tmp_path):
    data = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "labels.bin", data, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.bin"), data)


def test_wrong_magic_number(tmp_path):
    write_mnist(tmp_path, compress=False)
    path = tmp_path / MNIST_FILES["train_images"]
    raw = bytearray(path.read_bytes())
    raw[0:4] = struct.pack(">I", 0x12345678)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="bad IDX magic number"):
        read_mnist_dir(tmp_path)


def test_labels_file_where_images_belong(tmp_path):
    write_mnist(tmp_path, compress=False)
    images = tmp_path / MNIST_FILES["train_images"]
    write_idx(images, np.zeros(20, dtype=np.uint8))
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        read_mnist_dir(tmp_path)


def test_truncated_data(tmp_path):
    write_mnist(tmp_path, compress=True)
    path = tmp_path / (MNIST_FILES["test_images"] + ".gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UserError, match="truncated"):
        read_mnist_dir(tmp_path)


def test_truncated_gzip_stream(tmp_path):
    write_mnist(tmp_path, compress=True)
    path = tmp_path / (MNIST_FILES["train_labels"] + ".gz")
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError, match="damaged gzip|truncated"):
        read_mnist_dir(tmp_path)


def test_image_and_label_counts_differ(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / (MNIST_FILES["train_labels"] + ".gz"), np.zeros(19, dtype=np.uint8))
    with pytest.raises(UserError, match="train split has 20 images but 19 labels"):
        read_mnist_dir(tmp_path)


def test_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / (MNIST_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        read_mnist_dir(tmp_path)


def test_images_of_another_size(tmp_path):
    write_mnist(tmp_path, size=32)
    with pytest.raises(UserError, match="32x32"):
        read_mnist_dir(tmp_path)


def test_label_that_is_not_a_digit(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / (MNIST_FILES["test_labels"] + ".gz"), np.full(10, 12, dtype=np.uint8))
    with pytest.raises(UserError, match="label 12"):
        read_mnist_dir(tmp_path)


def test_header_shorter_than_its_dimensions(tmp_path):
    (tmp_path / "x").write_bytes(struct.pack(">HBB", 0, 8, 3) + b"\x00\x00")
    with pytest.raises(UserError, match="truncated header"):
        read_idx(tmp_path / "x")
