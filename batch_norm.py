"""The original's batch_norm.py (Jan Schlueter's early Lasagne BN), §3 of ../shared/SPEC.md.

Not torch.nn.BatchNorm: epsilon is added to the *biased std* (not inside the sqrt of the
variance) and the running statistic is that std, not an unbiased variance.
"""
import torch
import torch.nn as nn


class BatchNormLayer(nn.Module):
    """Normalises over every axis but 1: per unit for (N, C), per channel for (N, C, H, W).

    Training: y = (x - mean_B) * gamma / (std_B + epsilon) + beta, with the batch's biased std,
    and the running statistics move by alpha toward the batch's (std without epsilon).
    Eval: the running `mean` and `std` replace the batch's. The nonlinearity comes last, inside
    the layer, as in the original (ReLU for hidden layers, identity for the output).
    """

    def __init__(self, num_features, epsilon=1e-4, alpha=0.1, nonlinearity=None, form="std"):
        super().__init__()
        if form != "std":
            raise ValueError(f"form={form!r}: not implemented yet")
        self.form = form
        self.num_features = num_features
        self.epsilon = epsilon
        self.alpha = alpha
        self.nonlinearity = nonlinearity
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x):
        axes = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=axes)
            centred = x - mean.view(shape)
            # Theano's std: sqrt of the two-pass biased variance (ddof = 0).
            std = torch.sqrt(torch.square(centred).mean(dim=axes))
            with torch.no_grad():
                # A Theano default_update: only training passes move the running statistics.
                self.mean.mul_(1. - self.alpha).add_(mean.detach(), alpha=self.alpha)
                self.std.mul_(1. - self.alpha).add_(std.detach(), alpha=self.alpha)
        else:
            centred, std = x - self.mean.view(shape), self.std
        y = centred * (self.gamma / (std + self.epsilon)).view(shape) + self.beta.view(shape)
        return y if self.nonlinearity is None else self.nonlinearity(y)

    def scale_shift(self):
        """The eval-mode layer as y = scale * x + shift per feature (before the nonlinearity),
        for folding it into a binary model's export."""
        scale = self.gamma / (self.std + self.epsilon)
        return scale, self.beta - scale * self.mean

    def extra_repr(self):
        return (f"{self.num_features}, epsilon={self.epsilon}, alpha={self.alpha}, "
                f"nonlinearity={getattr(self.nonlinearity, '__name__', self.nonlinearity)}")
