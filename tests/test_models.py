"""models.mlp and models.cnn against the layer order of the original scripts (docs/original.md
§4.2-4.4): every Dense/Conv binary with a bias, BN after it with ReLU inside (identity after the
output layer), and in the CNN the max-pool BEFORE the BN of each block's second conv."""

import numpy as np
import torch.nn as nn
import torch.nn.functional as F


import models
from batch_norm import BatchNormLayer
from binary_connect import Conv2DLayer, DenseLayer


def layout(model):
    """Each layer as a short token: D(in,out) / C(in,out) / P / BN(n,relu|id) / drop."""
    out = []
    for m in model:
        if isinstance(m, DenseLayer):
            out.append(f"D({m.in_features},{m.out_features})")
        elif isinstance(m, Conv2DLayer):
            assert m.kernel_size == (3, 3) and m.padding == (1, 1) and m.stride == (1, 1)
            out.append(f"C({m.in_channels},{m.out_channels})")
        elif isinstance(m, nn.MaxPool2d):
            assert m.kernel_size == 2 and m.stride == 2
            out.append("P")
        elif isinstance(m, BatchNormLayer):
            out.append(f"BN({m.num_features},{'relu' if m.nonlinearity is F.relu else 'id'})")
        elif isinstance(m, nn.Dropout):
            out.append("drop")
        else:
            raise AssertionError(f"unexpected layer {m}")
    return out


def check_binary_layers_have_biases(model, stochastic=True):
    for m in model:
        if isinstance(m, (DenseLayer, Conv2DLayer)):
            assert m.binary and m.stochastic == stochastic
            assert m.bias is not None and np.all(m.bias.detach().numpy() == 0)  # §1.4


def test_cifar10_cnn_layer_order():
    np.random.seed(0)
    model = models.cnn(widths=(128, 256, 512), fc_units=1024)
    block = lambda c_in, c: [f"C({c_in},{c})", f"BN({c},relu)", f"C({c},{c})", "P",  # noqa: E731
                             f"BN({c},relu)"]
    assert layout(model) == (block(3, 128) + block(128, 256) + block(256, 512)
                             + ["D(8192,1024)", "BN(1024,relu)", "D(1024,1024)", "BN(1024,relu)",
                                "D(1024,10)", "BN(10,id)"])
    check_binary_layers_have_biases(model)


def test_svhn_cnn_halves_only_the_convolutions():
    np.random.seed(0)
    model = models.cnn(widths=(64, 128, 256), fc_units=1024, stochastic=False)
    tokens = layout(model)
    assert tokens[:5] == ["C(3,64)", "BN(64,relu)", "C(64,64)", "P", "BN(64,relu)"]
    assert tokens[-6:] == ["D(4096,1024)", "BN(1024,relu)", "D(1024,1024)", "BN(1024,relu)",
                           "D(1024,10)", "BN(10,id)"]
    check_binary_layers_have_biases(model, stochastic=False)


def test_mnist_mlp_layer_order():
    np.random.seed(0)
    model = models.mlp(num_units=2048, n_hidden_layers=3)
    assert layout(model) == (["drop"] + ["D(784,2048)", "BN(2048,relu)", "drop"]
                             + ["D(2048,2048)", "BN(2048,relu)", "drop"] * 2
                             + ["D(2048,10)", "BN(10,id)"])
    check_binary_layers_have_biases(model)
