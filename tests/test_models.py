"""The study's two models, exactly: parameter counts and layer shapes."""

import torch

from parallelnn.workloads.iris import simple_nn
from parallelnn.workloads.mnist import prepare, simple_cnn


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_simple_nn_has_403_parameters():
    assert count(simple_nn()) == 403  # 4*50+50 + 50*3+3


def test_simple_cnn_has_429258_parameters():
    assert count(simple_cnn()) == 429_258


def test_simple_cnn_maps_a_batch_of_digits_to_ten_logits():
    x = prepare(torch.zeros(5, 28, 28, dtype=torch.uint8))
    assert x.shape == (5, 1, 28, 28)
    assert simple_cnn()(x).shape == (5, 10)


def test_mnist_normalisation_matches_totensor_then_normalize():
    raw = torch.tensor([[0, 255]], dtype=torch.uint8).expand(28, 2)[:, :2].contiguous()
    x = prepare(raw)
    assert torch.allclose(x[0, 0, 0], torch.tensor((0 - 0.1307) / 0.3081))
    assert torch.allclose(x[0, 0, 1], torch.tensor((1 - 0.1307) / 0.3081))
