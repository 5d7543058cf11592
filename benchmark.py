"""Seconds per training epoch of a BinaryConnect network: this project's modules against a plain
eager PyTorch step of the same math (hand-written tensors, no modules), in one process.

    python benchmark.py                      # MNIST 3x2048 MLP, batch 100, on cuda if present
    python benchmark.py --net=cifar10        # the CIFAR-10 CNN, batch 50
    python benchmark.py --steps=20 --repeats=3 --device=cpu

The two are timed alternately, `repeats` times each, and the best of each is kept (these machines
are noisy; the ratio is what counts). An epoch is extrapolated from `steps` steps: 500 steps for
MNIST (50000/100), 900 for CIFAR-10 (45000/50).
"""
import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import binary_connect
from models import cnn, mlp

NETS = dict(mnist=dict(batch_size=100, steps_per_epoch=500, shape=(1, 28, 28)),
            cifar10=dict(batch_size=50, steps_per_epoch=900, shape=(3, 32, 32)),
            svhn=dict(batch_size=50, steps_per_epoch=11967, shape=(3, 32, 32)))


def build(net):
    if net == "mnist":
        return mlp(num_units=2048, n_hidden_layers=3)
    return cnn(widths=(128, 256, 512) if net == "cifar10" else (64, 128, 256))


def project_step(model, optimizer):
    def step(x, t):
        loss = binary_connect.squared_hinge_loss(model(x), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def plain_step(model, LR=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """The same math, written out: sample Wb, forward through conv/dense + the original's BN,
    squared hinge, gradients w.r.t. Wb applied to W, Lasagne Adam, scale, clip."""
    layers = list(model)
    W = [m.weight.detach().clone() for m in layers if hasattr(m, "W_LR_scale")]
    meta = [(m.H, m.W_LR_scale, m.seed) for m in layers if hasattr(m, "W_LR_scale")]
    others = [p.detach().clone().requires_grad_() for m in layers for n, p in m.named_parameters()
              if n != "weight"]
    gens = []
    for w, (H, _, seed) in zip(W, meta):
        g = torch.Generator(device=w.device)
        g.manual_seed(seed)
        gens.append(g)
    bn_stats = [(m.mean.clone(), m.std.clone(), m.alpha, m.epsilon, m.nonlinearity)
                for m in layers if hasattr(m, "gamma")]
    moments = [[torch.zeros_like(p), torch.zeros_like(p)] for p in W + others]
    t_step = [0]

    def step(x, target):
        Wb = []
        for w, (H, _, _), g in zip(W, meta, gens):
            p = torch.clamp((w / H + 1) / 2, 0, 1)
            Wb.append(torch.where(torch.rand(w.shape, generator=g, device=w.device) < p, H, -H)
                      .requires_grad_())
        h, wi, oi, bi = x, 0, 0, 0
        for m in layers:
            if hasattr(m, "W_LR_scale"):
                b = others[oi]
                oi += 1
                if isinstance(m, torch.nn.Conv2d):
                    h = F.conv2d(h, Wb[wi], b, padding=m.padding)
                else:
                    h = F.linear(h.flatten(1), Wb[wi], b)
                wi += 1
            elif hasattr(m, "gamma"):
                beta, gamma = others[oi], others[oi + 1]
                oi += 2
                mean_run, std_run, alpha, epsilon, nonlin = bn_stats[bi]
                bi += 1
                axes = [0] + list(range(2, h.dim()))
                shape = [1, -1] + [1] * (h.dim() - 2)
                mu = h.mean(axes, keepdim=True)
                sd = ((h - mu) ** 2).mean(axes, keepdim=True).sqrt()
                with torch.no_grad():
                    mean_run.mul_(1 - alpha).add_(alpha * mu.flatten())
                    std_run.mul_(1 - alpha).add_(alpha * sd.flatten())
                h = (h - mu) * gamma.view(shape) / (sd + epsilon) + beta.view(shape)
                h = h if nonlin is None else nonlin(h)
            elif isinstance(m, torch.nn.MaxPool2d):
                h = F.max_pool2d(h, 2)
        loss = torch.clamp(1 - target * h, min=0).pow(2).mean()
        grads = torch.autograd.grad(loss, Wb + others)
        t_step[0] += 1
        t = t_step[0]
        a_t = LR * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(W + others, grads)):
                m_, v_ = moments[i]
                m_.mul_(beta1).add_((1 - beta1) * g)
                v_.mul_(beta2).add_((1 - beta2) * g * g)
                if i < len(W):
                    H, scale, _ = meta[i]
                    p.sub_(scale * a_t * m_ / (v_.sqrt() + eps)).clamp_(-H, H)
                else:
                    p.sub_(a_t * m_ / (v_.sqrt() + eps))
        return loss.detach()
    return step


def time_steps(step, data, steps, device):
    x, t = data
    step(x[0], t[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(x[i % len(x)], t[i % len(t)])
    float(loss)  # one sync at the end, as the training loop does
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", choices=sorted(NETS), default="mnist")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = NETS[args.net]
    np.random.seed(1234)
    model = build(args.net).to(device)
    optimizer = binary_connect.make_optimizer(model, 1e-3)
    baseline = plain_step(model)
    model.train()
    g = torch.Generator(device=device).manual_seed(0)
    n = 8
    x = torch.randn((n, spec["batch_size"]) + spec["shape"], generator=g, device=device)
    labels = torch.randint(0, 10, (n, spec["batch_size"]), generator=g, device=device)
    t = 2 * F.one_hot(labels, 10).float() - 1
    ours, plain = [], []
    for _ in range(args.repeats):
        ours.append(time_steps(project_step(model, optimizer), (x, t), args.steps, device))
        plain.append(time_steps(baseline, (x, t), args.steps, device))
    per_epoch = spec["steps_per_epoch"]
    o, p = min(ours) * per_epoch, min(plain) * per_epoch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.net} on {device} ({name}), {torch.get_num_threads()} threads, batch "
          f"{spec['batch_size']}, {per_epoch} steps per epoch (training steps only):")
    print(f"  this project : {o:9.2f} s/epoch  ({min(ours) * 1e3:.2f} ms/step)")
    print(f"  plain eager  : {p:9.2f} s/epoch  ({min(plain) * 1e3:.2f} ms/step)")
    print(f"  ratio plain/project: {p / o:.3f}")


if __name__ == "__main__":
    main()
