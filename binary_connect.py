"""BinaryConnect (Courbariaux, Bengio & David, NeurIPS 2015) in PyTorch.

Mirrors the original `binary_connect.py` (lasagne branch): the `binarization` rule, the binary
Dense/Conv layers, Lasagne's Adam with the per-layer W_LR_scale and the clip to [-H, H], the squared
hinge loss and the exponential LR schedule. The training loop is in `training.py`.
Section numbers (§) refer to ../shared/SPEC.md.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def hard_sigmoid(x):
    # §1.1: the paper picks the hard sigmoid for its low cost.
    return torch.clamp((x + 1.) / 2., 0., 1.)


def binarization(W, H, binary=True, deterministic=False, stochastic=False, generator=None):
    """§1.1. `deterministic` is the test-time flag; `stochastic` the BinaryConnect variant.

    Returns W itself when binary is False, or at test time for stochastic BC (the paper's choice:
    drop the noise at test time, like Dropout). Otherwise +-H: deterministic BC rounds
    hard_sigmoid(W/H) half away from zero (Theano's T.round then), so W >= 0 gives +H; stochastic BC
    gives +H with probability hard_sigmoid(W/H), as MRG_RandomStreams.binomial computed `u < p`.
    """
    if not binary or (deterministic and stochastic):
        return W
    if stochastic:
        p = hard_sigmoid(W / H)
        u = torch.rand(W.shape, generator=generator, device=W.device, dtype=W.dtype)
        b = u < p
    else:
        b = W >= 0
    # {0, 1} -> {-H, +H}, exactly, in W's dtype, with no host-to-device copy of H.
    return (b.to(W.dtype) * 2. - 1.) * H


class _StraightThrough(torch.autograd.Function):
    """Forward: Wb. Backward: dL/dWb handed to W unchanged, with no |W| <= 1 mask (§2.1)."""

    @staticmethod
    def forward(ctx, W, Wb):
        return Wb

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def glorot_coefficient(fan_in, fan_out):
    # §1.2-1.3: sqrt(1.5 / (fan_in + fan_out)) in float32, half Glorot-uniform's bound.
    return float(np.float32(np.sqrt(1.5 / (fan_in + fan_out))))


def _number(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: give \"Glorot\" or a number") from None


class BinaryLayerMixin:
    """What the original's binary DenseLayer and Conv2DLayer share: H, W_LR_scale, init, Wb."""

    def _setup_binary(self, binary, stochastic, H, W_LR_scale, fan_in, fan_out, rng, init_range):
        self.binary = binary
        self.stochastic = stochastic
        coefficient = glorot_coefficient(fan_in, fan_out)
        self.H = coefficient if H == "Glorot" else _number("H", H)
        # §1.3: the inverse Glorot coefficient, whatever H is.
        self.W_LR_scale = (float(np.float32(1. / np.sqrt(1.5 / (fan_in + fan_out))))
                           if W_LR_scale == "Glorot" else _number("W_LR_scale", W_LR_scale))
        rng = np.random if rng is None else rng
        # §4.5: like Lasagne, each binary layer draws its stream's seed, then its W, from the
        # global numpy RNG, in construction order.
        self.seed = int(rng.randint(1, 2147462579))
        self._generator = None
        with torch.no_grad():
            if binary:
                # §1.4: U(-H, H) for every binary layer, drawn in Lasagne's W shape (§9's
                # code drew U(-2H, 2H): init_range=2).
                W = rng.uniform(-init_range * self.H, init_range * self.H,
                                size=self._lasagne_shape())
            else:
                bound = math.sqrt(6. / (fan_in + fan_out))  # Lasagne's GlorotUniform
                W = rng.uniform(-bound, bound, size=self._lasagne_shape())
            self.weight.copy_(torch.from_numpy(self._from_lasagne(W)).to(self.weight))
            if self.bias is not None:
                self.bias.zero_()  # §1.4: b = Constant(0)

    @property
    def generator(self):
        """The layer's own random stream (§1.1), created lazily on the layer's device."""
        if self._generator is None or self._generator_device != self.weight.device:
            self._generator_device = self.weight.device
            self._generator = torch.Generator(device=self.weight.device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def binary_weight(self):
        """Wb for this forward pass; one fresh sample per training minibatch (§1.1)."""
        Wb = binarization(self.weight, self.H, self.binary, deterministic=not self.training,
                          stochastic=self.stochastic,
                          generator=self.generator if self.stochastic and self.training else None)
        if Wb is self.weight:
            return Wb
        return _StraightThrough.apply(self.weight, Wb.detach())

    def extra_repr(self):
        return (super().extra_repr() + f", binary={self.binary}, stochastic={self.stochastic}, "
                f"H={self.H}, W_LR_scale={self.W_LR_scale}")


class DenseLayer(BinaryLayerMixin, nn.Linear):
    """The original's binary_connect.DenseLayer with an identity nonlinearity (BN follows)."""

    def __init__(self, in_features, out_features, bias=True, binary=True, stochastic=True,
                 H=1., W_LR_scale="Glorot", rng=None, device=None, dtype=None, init_range=1.):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_binary(binary, stochastic, H, W_LR_scale, in_features, out_features, rng,
                           init_range)

    def _lasagne_shape(self):
        return (self.in_features, self.out_features)  # Lasagne's W is (n_in, n_out)

    def _from_lasagne(self, W):
        return np.ascontiguousarray(W.T)

    def forward(self, input):
        # Lasagne's DenseLayer flattens inputs of more than 2 dims in C order.
        return F.linear(input.flatten(1), self.binary_weight(), self.bias)


class Conv2DLayer(BinaryLayerMixin, nn.Conv2d):
    """The original's binary_connect.Conv2DLayer: stride 1, pad 1 for 3x3 ("same"), identity."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True,
                 binary=True, stochastic=True, H=1., W_LR_scale="Glorot", rng=None, device=None,
                 dtype=None, init_range=1.):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias, device=device, dtype=dtype)
        k = self.kernel_size[0] * self.kernel_size[1]
        # §1.2: fan_in = k*k*C_in, "fan_out" = k*k*C_out (the pool size is not divided out).
        self._setup_binary(binary, stochastic, H, W_LR_scale, k * in_channels, k * out_channels,
                           rng, init_range)

    def _lasagne_shape(self):
        return tuple(self.weight.shape)  # (C_out, C_in, k, k) in both frameworks

    def _from_lasagne(self, W):
        # Lasagne's flip_filters=True computes a true convolution; torch correlates. Flipping at
        # init keeps the function drawn identical; it matters only when porting weights.
        return np.ascontiguousarray(W[:, :, ::-1, ::-1])

    def forward(self, input):
        return self._conv_forward(input, self.binary_weight(), self.bias)


def binary_layers(model):
    return [m for m in model.modules() if isinstance(m, BinaryLayerMixin)]


class Adam(torch.optim.Optimizer):
    """Lasagne's Adam (§2.2) with BinaryConnect's clipping_scaling (§2.3).

    Lasagne puts epsilon on the uncorrected sqrt(v) and folds the bias correction into the step
    size: step = LR*sqrt(1-beta2^t)/(1-beta1^t) * m/(sqrt(v)+epsilon). torch.optim.Adam does not.
    A group's `W_LR_scale` multiplies its step and a group with `H` is clipped to [-H, H] after
    every step.
    """

    def __init__(self, params, LR=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8):
        super().__init__(params, dict(lr=LR, beta1=beta1, beta2=beta2, epsilon=epsilon,
                                      W_LR_scale=1., H=None))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2, eps = group["beta1"], group["beta2"], group["epsilon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["t"] += 1
                t = state["t"]
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(p.grad, alpha=1. - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1. - beta2)
                a_t = group["lr"] * math.sqrt(1. - beta2 ** t) / (1. - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-a_t * group["W_LR_scale"])
                if group["H"] is not None:
                    p.clamp_(-group["H"], group["H"])


def make_optimizer(model, LR):
    """§2.2: Adam #1 on the binary W's (one group per layer for its W_LR_scale and H), Adam #2 on
    everything else (biases, BN beta and gamma). A binary=False layer joins the second group."""
    layers = [m for m in binary_layers(model) if m.binary]
    for m in layers:  # printed at build time, as the original's clipping_scaling did (§1.3)
        print("W_LR_scale = " + str(np.float32(m.W_LR_scale)))
        print("H = " + str(np.float32(m.H)))
    binary_ids = {id(m.weight) for m in layers}
    groups = [dict(params=[m.weight], W_LR_scale=m.W_LR_scale, H=m.H) for m in layers]
    others = [p for p in model.parameters() if id(p) not in binary_ids and p.requires_grad]
    groups.append(dict(params=others))
    return Adam(groups, LR=LR)


def set_learning_rate(optimizer, LR):
    for group in optimizer.param_groups:
        group["lr"] = LR


def squared_hinge_loss(output, target):
    """§4.1: mean over the batch AND the 10 outputs of max(0, 1 - t*y)^2, with t in {-1, +1}."""
    return torch.square(torch.clamp(1. - target * output, min=0.)).mean()


def lr_decay(LR_start, LR_fin, num_epochs):
    """§4.1: epoch e (1-based) trains with LR_start * LR_decay**(e-1); LR_fin is never used."""
    return (LR_fin / LR_start) ** (1. / num_epochs)
