"""The paper's networks (docs/original.md §4.2-4.4), built as the original scripts built them.

Every Dense/Conv layer is binarized, the first and the last included (§1.1); each is followed by
the original's batch norm, whose nonlinearity is ReLU except after the output layer.
"""
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from batch_norm import BatchNormLayer
from binary_connect import Conv2DLayer, DenseLayer


class Dropout(nn.Dropout):
    def __init__(self, p):
        super().__init__(p)
        # Lasagne's DropoutLayer draws a seed from the global numpy RNG (§4.5): drawing it here
        # keeps the later layers' seeds and weights at the same places in the stream.
        np.random.randint(1, 2147462579)


def mlp(num_units=2048, n_hidden_layers=3, dropout_in=0., dropout_hidden=0., binary=True,
        stochastic=True, H=1., W_LR_scale="Glorot", epsilon=1e-4, alpha=0.15, n_inputs=784,
        n_outputs=10, init_range=1., bn_form="std"):
    """§4.2: input dropout, then n_hidden_layers x (Dense -> BN(ReLU) -> dropout), then
    Dense(10) -> BN(identity). init_range and bn_form serve the paper's own MNIST code (§9)."""
    bc = dict(binary=binary, stochastic=stochastic, H=H, W_LR_scale=W_LR_scale,
              init_range=init_range)
    bn = dict(epsilon=epsilon, alpha=alpha, form=bn_form)
    layers = [Dropout(dropout_in)]
    n_in = n_inputs
    for _ in range(n_hidden_layers):
        layers += [DenseLayer(n_in, num_units, **bc),
                   BatchNormLayer(num_units, nonlinearity=F.relu, **bn),
                   Dropout(dropout_hidden)]
        n_in = num_units
    layers += [DenseLayer(n_in, n_outputs, **bc), BatchNormLayer(n_outputs, **bn)]
    return nn.Sequential(*layers)


def cnn(widths=(128, 256, 512), fc_units=1024, binary=True, stochastic=True, H=1.,
        W_LR_scale="Glorot", epsilon=1e-4, alpha=0.1, in_channels=3, image_size=32,
        n_outputs=10):
    """§4.3 (CIFAR-10: widths 128, 256, 512) and §4.4 (SVHN: 64, 128, 256; FC kept at 1024).

    Each block is conv -> BN -> ReLU, then conv -> 2x2 max-pool -> BN -> ReLU: the pool comes
    before the BN, as in the original.
    """
    bc = dict(binary=binary, stochastic=stochastic, H=H, W_LR_scale=W_LR_scale)
    bn = dict(epsilon=epsilon, alpha=alpha)
    layers, c = [], in_channels
    for width in widths:
        layers += [Conv2DLayer(c, width, 3, padding=1, **bc),
                   BatchNormLayer(width, nonlinearity=F.relu, **bn),
                   Conv2DLayer(width, width, 3, padding=1, **bc),
                   nn.MaxPool2d(2),
                   BatchNormLayer(width, nonlinearity=F.relu, **bn)]
        c = width
        image_size //= 2
    n_in = c * image_size * image_size
    for _ in range(2):
        layers += [DenseLayer(n_in, fc_units, **bc),
                   BatchNormLayer(fc_units, nonlinearity=F.relu, **bn)]
        n_in = fc_units
    layers += [DenseLayer(n_in, n_outputs, **bc), BatchNormLayer(n_outputs, **bn)]
    return nn.Sequential(*layers)
