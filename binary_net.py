"""BinaryNet (Courbariaux, Hubara, Soudry, El-Yaniv & Bengio 2016): weights AND activations +-1.

Mirrors Train-time/binary_net.py of MatthieuCourbariaux/BinaryNet (docs/original.md §13). Its
weights are BinaryConnect's: its `binarization`, layers, Glorot W_LR_scale, update and clip were
"taken directly from the BinaryConnect github repository" (§13.1), so binary_connect.py serves
them unchanged. What BinaryNet adds is the binary activation, here; its batch norm is Lasagne's
(batch_norm.LasagneBatchNormLayer) and its networks are models.binarynet_mlp/binarynet_cnn.
"""
import torch
import torch.nn as nn

from binary_connect import hard_sigmoid


class _Round3(torch.autograd.Function):
    """The original's Round3: C's round() forward, the gradient passed unchanged backward.

    On hard_sigmoid's [0, 1] C's round is 1 from 0.5 up (half away from zero); torch.round
    rounds half to even, which would make sign(0) = -1."""

    @staticmethod
    def forward(ctx, x):
        return (x >= 0.5).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def binary_tanh_unit(x):
    """§13.2: 2 * round3(hard_sigmoid(x)) - 1, composed as the original composed it.

    Forward: +1 where hard_sigmoid(x) = clip((x + 1) / 2, 0, 1) rounds up, i.e. x >= 0 (also
    for x within 2**-25 below 0, where (x + 1) / 2 rounds to 0.5 in float32, as Theano's did),
    else -1. Backward: hard tanh's gradient, the incoming gradient where 0 <= (x + 1) / 2 <= 1,
    ends included (Theano's clip passed the gradient at its bounds; so does torch.clamp), so
    where |x| <= 1, and 0 elsewhere."""
    return 2. * _Round3.apply(hard_sigmoid(x)) - 1.


class BinaryTanh(nn.Module):
    """binary_tanh_unit as a layer: the original's NonlinearityLayer(nonlinearity=
    binary_net.binary_tanh_unit), which follows each hidden batch norm."""

    def forward(self, x):
        return binary_tanh_unit(x)
