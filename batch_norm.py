"""The original's batch_norm.py (Jan Schlueter's early Lasagne BN), docs/original.md §3, and
Lasagne's own BatchNormLayer, which BinaryNet used (§13.4).

Not torch.nn.BatchNorm: epsilon is added to the *biased std* (not inside the sqrt of the
variance) and the running statistic is that std, not an unbiased variance. The paper's own MNIST
code (§9) used the variance form, sqrt(var + epsilon), and recomputed its inference statistics as
averages over minibatches: form="var" and collect_statistics() serve it.
"""
import torch
import torch.nn as nn


def _feature_shape(x):
    """The view that broadcasts a per-feature vector (axis 1) against x."""
    return [1, -1] + [1] * (x.dim() - 2)


def _batch_statistics(x):
    """Over every axis but 1 (per unit, or per channel of an image): the batch mean, x centred
    by it, and Theano's var, the two-pass biased variance (ddof = 0), which both BNs used."""
    axes = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=axes)
    centred = x - mean.view(_feature_shape(x))
    return mean, centred, torch.square(centred).mean(dim=axes)


class BatchNormLayer(nn.Module):
    """Normalises over every axis but 1: per unit for (N, C), per channel for (N, C, H, W).

    Training: y = (x - mean_B) * gamma / (std_B + epsilon) + beta, with the batch's biased std
    (form="var": / sqrt(std_B**2 + epsilon)), and the running statistics move by alpha toward
    the batch's (std without epsilon). Eval: the running `mean` and `std` replace the batch's.
    The nonlinearity comes last, inside the layer, as in the original (ReLU for hidden layers,
    identity for the output).
    """

    def __init__(self, num_features, epsilon=1e-4, alpha=0.1, nonlinearity=None, form="std"):
        super().__init__()
        if form not in ("std", "var"):
            raise ValueError(f"form={form!r}: give 'std' (§3) or 'var' (§9)")
        self.num_features = num_features
        self.epsilon = epsilon
        self.alpha = alpha
        self.nonlinearity = nonlinearity
        self.form = form
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.collecting = None  # [batches, sum of means, sum of statistics] while collecting

    def _divisor(self, std):
        return std + self.epsilon if self.form == "std" else torch.sqrt(std * std + self.epsilon)

    def forward(self, x):
        # Under bf16 autocast the products arrive in bf16; the statistics stay in the layer's
        # own precision (float32).
        x = x.to(self.gamma.dtype)
        shape = _feature_shape(x)
        if self.training or self.collecting is not None:
            mean, centred, var = _batch_statistics(x)
            std = torch.sqrt(var)  # Theano's std: sqrt of its var
            with torch.no_grad():
                if self.collecting is not None:
                    # §9 averaged the batches' statistics: the variance in its variance form.
                    self.collecting[0] += 1
                    self.collecting[1] += mean
                    self.collecting[2] += var if self.form == "var" else std
                else:
                    # A Theano default_update: only training passes move the running statistics.
                    self.mean.mul_(1. - self.alpha).add_(mean.detach(), alpha=self.alpha)
                    self.std.mul_(1. - self.alpha).add_(std.detach(), alpha=self.alpha)
        else:
            centred, std = x - self.mean.view(shape), self.std
        y = centred * (self.gamma / self._divisor(std)).view(shape) + self.beta.view(shape)
        return y if self.nonlinearity is None else self.nonlinearity(y)

    def collect_statistics(self, start):
        """start=True: from now on, eval-mode passes normalise with their batch's statistics and
        add them up; start=False: the running statistics become those batches' averages (§9)."""
        if start:
            zeros = torch.zeros_like(self.mean)
            self.collecting = [0, zeros, zeros.clone()]
            return
        n, mean, stat = self.collecting
        self.collecting = None
        if n:
            with torch.no_grad():
                self.mean.copy_(mean / n)
                self.std.copy_(torch.sqrt(stat / n) if self.form == "var" else stat / n)

    def scale_shift(self):
        """The eval-mode layer as y = scale * x + shift per feature (before the nonlinearity),
        for folding it into a binary model's export."""
        scale = self.gamma / self._divisor(self.std)
        return scale, self.beta - scale * self.mean

    def extra_repr(self):
        return (f"{self.num_features}, epsilon={self.epsilon}, alpha={self.alpha}, "
                f"form={self.form}, "
                f"nonlinearity={getattr(self.nonlinearity, '__name__', self.nonlinearity)}")


class LasagneBatchNormLayer(nn.Module):
    """lasagne.layers.BatchNormLayer (§13.4), which BinaryNet used; its names, beta, gamma, mean
    and inv_std, and its defaults epsilon=1e-4, alpha=0.1. Normalises over every axis but 1.

    y = (x - mean) * (gamma * inv_std) + beta. Training: the batch's mean and inv_std =
    1 / sqrt(var + epsilon), var biased; the running `mean` and `inv_std` move by alpha toward
    the batch's, inv_std itself averaged (not the variance). Eval: the running ones. No
    nonlinearity: binary_net.BinaryTanh follows it as a layer of its own, as in the original.
    """

    def __init__(self, num_features, epsilon=1e-4, alpha=0.1):
        super().__init__()
        self.num_features = num_features
        self.epsilon = epsilon
        self.alpha = alpha
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("inv_std", torch.ones(num_features))

    def forward(self, x):
        x = x.to(self.gamma.dtype)  # as BatchNormLayer: the statistics in float32 under bf16
        shape = _feature_shape(x)
        if self.training:
            mean, centred, var = _batch_statistics(x)
            inv_std = 1. / torch.sqrt(var + self.epsilon)
            with torch.no_grad():  # Lasagne's default_update: training passes only
                self.mean.mul_(1. - self.alpha).add_(mean.detach(), alpha=self.alpha)
                self.inv_std.mul_(1. - self.alpha).add_(inv_std.detach(), alpha=self.alpha)
        else:
            centred, inv_std = x - self.mean.view(shape), self.inv_std
        return centred * (self.gamma * inv_std).view(shape) + self.beta.view(shape)

    def scale_shift(self):
        """The eval-mode layer as y = scale * x + shift per feature, for an export to fold."""
        scale = self.gamma * self.inv_std
        return scale, self.beta - scale * self.mean

    def extra_repr(self):
        return f"{self.num_features}, epsilon={self.epsilon}, alpha={self.alpha}"
