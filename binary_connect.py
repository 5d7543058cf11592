"""BinaryConnect (Courbariaux, Bengio & David, NeurIPS 2015) in PyTorch.

Mirrors the original `binary_connect.py` (lasagne branch): the `binarization` rule, the binary
Dense/Conv layers, Lasagne's Adam with the per-layer W_LR_scale and the clip to [-H, H], the squared
hinge loss and the exponential LR schedule. The training loop is in `training.py`.
Section numbers (§) refer to docs/original.md.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from streams import uniform_like


def hard_sigmoid(x):
    # §1.1: the paper picks the hard sigmoid for its low cost.
    return torch.clamp((x + 1.) / 2., 0., 1.)


def binarization(W, H, binary=True, deterministic=False, stochastic=False, stream=None):
    """§1.1. `deterministic` is the test-time flag; `stochastic` the BinaryConnect variant.

    Returns W itself when binary is False, or at test time for stochastic BC (the paper's choice:
    drop the noise at test time, like Dropout). Otherwise +-H: deterministic BC rounds
    hard_sigmoid(W/H) half away from zero (Theano's T.round then), so W >= 0 gives +H; stochastic BC
    gives +H with probability hard_sigmoid(W/H), as MRG_RandomStreams.binomial computed `u < p`,
    with u drawn from `stream` (a torch.Generator or a counter stream: streams.py).
    """
    if not binary or (deterministic and stochastic):
        return W
    if stochastic:
        b = uniform_like(W, stream) < hard_sigmoid(W / H)
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
        self.stream_kind = "generator"  # or "counter": streams.py
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
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
        """The layer's own torch.Generator (§1.1), created lazily on the layer's device."""
        if self._generator is None or self._generator_device != self.weight.device:
            self._generator_device = self.weight.device
            self._generator = torch.Generator(device=self.weight.device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def stream(self):
        """Where this training pass's u comes from (streams.py): the layer's torch.Generator
        (the eager modules) or its counter stream (the compiled step), as stream_kind says.
        Both are seeded by self.seed; `draws` counts the samples."""
        return self.generator if self.stream_kind == "generator" else (self.seed, self.draws)

    def binary_weight(self):
        """Wb for this forward pass; one fresh sample per training minibatch (§1.1)."""
        sampling = self.binary and self.stochastic and self.training
        Wb = binarization(self.weight, self.H, self.binary, deterministic=not self.training,
                          stochastic=self.stochastic,
                          stream=self.stream() if sampling else None)
        if sampling:
            self.draws.add_(1)
        if Wb is self.weight:
            return Wb
        return _StraightThrough.apply(self.weight, Wb.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the draw counter existed (version 1) have none.
        state_dict.setdefault(prefix + "draws", torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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


class _Optimizer(torch.optim.Optimizer):
    """The update rules of the original, over parameter groups, each group with its own
    `W_LR_scale` multiplying its step and, with `H`, clipped to [-H, H] after every step (§2.3).

    The update runs as foreach ops over all parameters at once (no Python loop per parameter),
    and the learning rate and the step count live in tensors on the parameters' device, so the
    same update runs eagerly, compiled, or inside a CUDA graph captured once for every epoch.
    Build it after the model is on its device.
    """

    def __init__(self, params, LR, defaults):
        super().__init__(params, dict(defaults, W_LR_scale=1., H=None))
        self._all = [p for g in self.param_groups for p in g["params"]]
        device = self._all[0].device
        self.LR = torch.tensor(LR, dtype=torch.float64, device=device)  # the one copy of the LR
        # Per-parameter constants made once, on the device: a captured step copies nothing in.
        self._scale = torch.tensor([g["W_LR_scale"] for g in self.param_groups
                                    for _ in g["params"]], dtype=torch.float64, device=device)
        self._H = [g["H"] for g in self.param_groups for _ in g["params"]]
        for p in self._all:
            self._init_state(self.state[p], p)

    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict, with every state tensor put on its parameter's
        device, its dtype kept. torch leaves "step" where it was loaded (map_location="cpu" on
        a resume) unless a group is capturable or fused; a compiled CUDA step then reads it as
        a host scalar, which a CUDA graph bakes in at capture: Adam's bias correction and its
        step count would stop moving after every resume on a GPU."""
        super().load_state_dict(state_dict)
        for p in self._all:
            state = self.state[p]
            for k, v in state.items():
                if torch.is_tensor(v):
                    state[k] = v.to(p.device)  # no copy where it already is

    def set_learning_rate(self, LR):
        """Once per epoch (§4.1); a fill, so a captured step sees it without a host sync."""
        self.LR.fill_(LR)

    def step(self):
        """One update from each p.grad; parameters without a gradient stay as they are."""
        self._apply([i for i, p in enumerate(self._all) if p.grad is not None],
                    [p.grad for p in self._all if p.grad is not None])

    def update(self, grads):
        """One update of every parameter, `grads` in group order: what the training step calls
        (step() is wrapped in torch.optim's profiler hook, which a compiled step cannot trace)."""
        self._apply(range(len(self._all)), grads)

    @torch.no_grad()
    def _apply(self, indices, grads):
        """The update rule. The original's, for each binary W (clipping_scaling, §2.3):

            updates[param] = param + layer.W_LR_scale*(updates[param] - param)
            updates[param] = T.clip(updates[param], -layer.H, layer.H)

        Here: param -= (size * W_LR_scale) * numerator / denominator, the optimizer's own step
        (_direction) scaled, then the clip. Other parameters have W_LR_scale 1 and no clip."""
        if not grads:
            return
        params = [self._all[i] for i in indices]
        state = [self.state[p] for p in params]
        steps = [s["step"] for s in state]
        torch._foreach_add_(steps, 1)
        size, numerator, denominator = self._direction(grads, state, steps[0])
        # (size * W_LR_scale) in float64, rounded once to a 0-dim tensor per parameter, as a
        # Python-float `value=` of addcdiv_ would be; then addcdiv_'s order of operations.
        sizes = (size * self._scale).to(params[0].dtype).unbind()
        step = torch._foreach_mul(numerator, [sizes[i] for i in indices])
        if denominator is not None:
            torch._foreach_div_(step, denominator)
        torch._foreach_sub_(params, step)
        for i in indices:
            # One clamp per binary layer: the compiled step fuses it into the update (inductor
            # has no fused kernel for a foreach clamp: it would cost a third of the update).
            if self._H[i] is not None:
                self._all[i].clamp_(-self._H[i], self._H[i])


class Adam(_Optimizer):
    """Lasagne's Adam (§2.2) with BinaryConnect's clipping_scaling (§2.3).

    Lasagne puts epsilon on the uncorrected sqrt(v) and folds the bias correction into the step
    size: step = LR*sqrt(1-beta2^t)/(1-beta1^t) * m/(sqrt(v)+epsilon). torch.optim.Adam does not.
    """

    def __init__(self, params, LR=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8):
        super().__init__(params, LR, dict(beta1=beta1, beta2=beta2, epsilon=epsilon))

    def _init_state(self, state, p):
        state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _direction(self, grads, state, t):
        d = self.defaults
        beta1, beta2, eps = d["beta1"], d["beta2"], d["epsilon"]
        m, v = [s["m"] for s in state], [s["v"] for s in state]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1. - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1. - beta2)
        a_t = self.LR * torch.sqrt(1. - beta2 ** t) / (1. - beta1 ** t)
        denominator = torch._foreach_sqrt(v)
        torch._foreach_add_(denominator, eps)
        return a_t, m, denominator


class SGD(_Optimizer):
    """Plain SGD, no momentum, of the paper's own MNIST code (§9): p - LR * W_LR_scale * g."""

    def __init__(self, params, LR=1e-3):
        super().__init__(params, LR, {})

    def _init_state(self, state, p):
        state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)

    def _direction(self, grads, state, t):
        return self.LR, grads, None


def make_optimizer(model, LR, optimizer="adam"):
    """§2.2: Adam #1 on the binary W's (one group per layer for its W_LR_scale and H), Adam #2 on
    everything else (biases, BN beta and gamma). A binary=False layer joins the second group.
    optimizer="sgd" applies §9's SGD to the same groups."""
    layers = [m for m in binary_layers(model) if m.binary]
    for m in layers:  # printed at build time, as the original's clipping_scaling did (§1.3)
        print("W_LR_scale = " + str(np.float32(m.W_LR_scale)))
        print("H = " + str(np.float32(m.H)))
    binary_ids = {id(m.weight) for m in layers}
    groups = [dict(params=[m.weight], W_LR_scale=m.W_LR_scale, H=m.H) for m in layers]
    others = [p for p in model.parameters() if id(p) not in binary_ids and p.requires_grad]
    groups.append(dict(params=others))
    if optimizer == "sgd":
        return SGD(groups, LR=LR)
    return Adam(groups, LR=LR)


def squared_hinge_loss(output, target, reduction="mean"):
    """§4.1: mean over the batch AND the 10 outputs of max(0, 1 - t*y)^2, with t in {-1, +1}.
    reduction="sum_classes": summed over the outputs, averaged over the batch (§9's form).
    Batched (k, N, 10) inputs give the k batches' losses."""
    hinge = torch.square(torch.clamp(1. - target * output, min=0.))
    if reduction == "sum_classes":
        return hinge.sum(-1).mean(-1)
    return hinge.mean((-2, -1))


def lr_decay(LR_start, LR_fin, num_epochs):
    """§4.1: epoch e (1-based) trains with LR_start * LR_decay**(e-1); LR_fin is never used."""
    return (LR_fin / LR_start) ** (1. / num_epochs)
