"""The paper's networks (docs/original.md §4.2-4.4), built as the original scripts built them,
and BinaryNet's (§13.5), which are the same networks with binary activations.

Every Dense/Conv layer is binarized, the first and the last included (§1.1). In BinaryConnect
each is followed by the original's batch norm, whose nonlinearity is ReLU except after the output
layer; in BinaryNet by Lasagne's batch norm, then binary_tanh_unit as a layer of its own, except
after the output layer (its BN goes straight into the squared hinge loss). The first layer's
input stays real-valued in both.
"""
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from batch_norm import BatchNormLayer, LasagneBatchNormLayer
from binary_connect import Conv2DLayer, DenseLayer
from binary_net import BinaryTanh

NETWORKS = ("binaryconnect", "binarynet")


class Dropout(nn.Dropout):
    def __init__(self, p):
        super().__init__(p)
        # Lasagne's DropoutLayer draws a seed from the global numpy RNG (§4.5): drawing it here
        # keeps the later layers' seeds and weights at the same places in the stream.
        np.random.randint(1, 2147462579)


def _normalize(n, network, last, epsilon, alpha, bn_form="std"):
    """What follows each binary layer of n units: BinaryConnect's BN with ReLU inside (§3), or
    Lasagne's BN then binary_tanh_unit (BinaryNet, §13.4); after the output layer, BN alone."""
    if network == "binarynet":
        if bn_form != "std":
            raise ValueError(f"bn_form={bn_form!r} is an option of BinaryConnect's BN (§3, §9); "
                             "BinaryNet's is Lasagne's (§13.4)")
        return [LasagneBatchNormLayer(n, epsilon=epsilon, alpha=alpha)] + (
            [] if last else [BinaryTanh()])
    if network != "binaryconnect":
        raise ValueError(f"network={network!r}: give one of {', '.join(NETWORKS)}")
    return [BatchNormLayer(n, nonlinearity=None if last else F.relu, epsilon=epsilon, alpha=alpha,
                           form=bn_form)]


def mlp(num_units=2048, n_hidden_layers=3, dropout_in=0., dropout_hidden=0., binary=True,
        stochastic=True, H=1., W_LR_scale="Glorot", epsilon=1e-4, alpha=0.15, n_inputs=784,
        n_outputs=10, init_range=1., bn_form="std", network="binaryconnect"):
    """§4.2: input dropout, then n_hidden_layers x (Dense -> BN(ReLU) -> dropout), then
    Dense(10) -> BN(identity). init_range and bn_form serve the paper's own MNIST code (§9).
    network="binarynet": each BN(ReLU) is Lasagne's BN -> binary_tanh_unit (§13.5)."""
    bc = dict(binary=binary, stochastic=stochastic, H=H, W_LR_scale=W_LR_scale,
              init_range=init_range)
    bn = dict(network=network, epsilon=epsilon, alpha=alpha, bn_form=bn_form)
    layers = [Dropout(dropout_in)]
    n_in = n_inputs
    for _ in range(n_hidden_layers):
        layers += [DenseLayer(n_in, num_units, **bc), *_normalize(num_units, last=False, **bn),
                   Dropout(dropout_hidden)]
        n_in = num_units
    layers += [DenseLayer(n_in, n_outputs, **bc), *_normalize(n_outputs, last=True, **bn)]
    return nn.Sequential(*layers)


def cnn(widths=(128, 256, 512), fc_units=1024, binary=True, stochastic=True, H=1.,
        W_LR_scale="Glorot", epsilon=1e-4, alpha=0.1, in_channels=3, image_size=32,
        n_outputs=10, network="binaryconnect"):
    """§4.3 (CIFAR-10: widths 128, 256, 512) and §4.4 (SVHN: 64, 128, 256; FC kept at 1024).

    Each block is conv -> BN -> ReLU, then conv -> 2x2 max-pool -> BN -> ReLU: the pool comes
    before the BN, as in the original. network="binarynet": each BN -> ReLU is Lasagne's BN ->
    binary_tanh_unit (§13.5).
    """
    bc = dict(binary=binary, stochastic=stochastic, H=H, W_LR_scale=W_LR_scale)
    bn = dict(network=network, epsilon=epsilon, alpha=alpha)
    layers, c = [], in_channels
    for width in widths:
        layers += [Conv2DLayer(c, width, 3, padding=1, **bc),
                   *_normalize(width, last=False, **bn),
                   Conv2DLayer(width, width, 3, padding=1, **bc),
                   nn.MaxPool2d(2),
                   *_normalize(width, last=False, **bn)]
        c = width
        image_size //= 2
    n_in = c * image_size * image_size
    for _ in range(2):
        layers += [DenseLayer(n_in, fc_units, **bc), *_normalize(fc_units, last=False, **bn)]
        n_in = fc_units
    layers += [DenseLayer(n_in, n_outputs, **bc), *_normalize(n_outputs, last=True, **bn)]
    return nn.Sequential(*layers)


# BinaryNet's networks with the defaults of its scripts (§13.5): deterministic binary weights,
# Lasagne's BN with alpha 0.1, binary_tanh_unit.

def binarynet_mlp(num_units=4096, n_hidden_layers=3, dropout_in=.2, dropout_hidden=.5,
                  stochastic=False, alpha=.1, **kwargs):
    """Train-time/mnist.py's MLP: 784-3x4096-10, dropout 0.2 on the input, 0.5 hidden."""
    return mlp(num_units=num_units, n_hidden_layers=n_hidden_layers, dropout_in=dropout_in,
               dropout_hidden=dropout_hidden, stochastic=stochastic, alpha=alpha,
               network="binarynet", **kwargs)


def binarynet_cnn(widths=(128, 256, 512), fc_units=1024, stochastic=False, alpha=.1, **kwargs):
    """Train-time/cifar10.py's CNN; widths=(64, 128, 256) is svhn.py's."""
    return cnn(widths=widths, fc_units=fc_units, stochastic=stochastic, alpha=alpha,
               network="binarynet", **kwargs)
