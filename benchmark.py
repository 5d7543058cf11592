"""Milliseconds per training step of the paper's networks, this project's training step against a
plain eager PyTorch step of the same math, in one process on one device.

    python benchmark.py                          # the three nets, on cuda if present, else cpu
    python benchmark.py --nets=mnist --steps=20 --repeats=3 --device=cpu
    python benchmark.py --nets=cifar10 --precisions=fp32,tf32,bf16

For each net (MNIST 3x2048 MLP, batch 100; CIFAR-10 CNN, batch 50; SVHN CNN, batch 50) it times:
  plain       the same math written out as plain tensors (no modules): the reference;
  eager       this project's modules, run eagerly (--compile=false);
  fast-<p>    this project's fast step (--compile=true: compiled; on CUDA also captured as a CUDA
              graph) in precision p (fp32, tf32, bf16);
  fast_fp32_autotuned  (CUDA, --autotune) the fp32 fast step with inductor's and cuDNN's
              deterministic modes off (kernels chosen by timing): what determinism costs.
Each variant is built afresh from the same seed, warmed up (compiling included there, not in the
timing) and timed `repeats` times over `steps` steps; the best time of each is kept (these
machines are noisy: the ratios are what count). Dynamo is reset before each variant: its guards
do not cover inductor's settings (the deterministic mode), so without the reset a variant could
run the code compiled for the one before it; each variant is therefore timed right after its
own warm-up, before the next reset. An evaluation
pass over validation + test images is timed too, to project the minutes of a full run: epochs x
(steps per epoch x step time + evaluation of both sets; the test set is evaluated only on
improving epochs, so this overestimates).

The last line for each net is a parseable summary:
  SUMMARY net=mnist device=cpu plain_ms=... eager_ms=... fast_fp32_ms=... ratio_fast_fp32=...
"""
import argparse
import contextlib
import importlib
import io
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import binary_connect
import fast_step
import training
from configurator import ConfigError, hyperparameters, parse_value, select_device

# What a full run of each script does: steps per epoch, epochs, images evaluated per epoch.
NETS = dict(mnist=dict(steps_per_epoch=500, epochs=250, eval_images=20000),
            cifar10=dict(steps_per_epoch=900, epochs=500, eval_images=15000),
            svhn=dict(steps_per_epoch=11967, epochs=200, eval_images=32032))


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One way of running the training step, on its own fresh copy of the network."""

    def __init__(self, name, net, device, data, steps, mode=None, precision="fp32",
                 deterministic=True, settings=()):
        self.name, self.device, self.steps, self.precision = name, device, steps, precision
        self.deterministic = deterministic
        c = net_config(net, settings)
        script = importlib.import_module(net)
        np.random.seed(c["seed"])
        self.model = script.build_model(c).to(device)
        self.batch_size = c["batch_size"]
        X, t = data
        if mode is None:  # the plain reference
            self.model.train()
            plain = plain_step(self.model)
            batches = list(zip(X.split(self.batch_size), t.split(self.batch_size)))
            self.run = lambda: [plain(x, y) for x, y in batches]
            return
        with contextlib.redirect_stdout(io.StringIO()):  # the layers' W_LR_scale / H lines
            optimizer = binary_connect.make_optimizer(self.model, c["LR_start"])
        split = fast_step.Split(X.cpu().numpy(), t.cpu().numpy(), device)
        fast_step.set_stream_kind(self.model, "generator" if mode == "eager" else "counter")
        self.step = fast_step.TrainStep(self.model, optimizer, split, self.batch_size,
                                       mode=mode, precision=precision)
        self.model.train()
        order = np.arange(split.n)

        def run():
            self.model.train()
            self.step.start_epoch(order)
            for _ in range(self.steps):
                self.step()
        self.run = run

    def warm_up(self):
        """Two runs: compiling and, on CUDA, capturing happen here, in the variant's own
        arithmetic (what is captured keeps the precision it was captured in)."""
        fast_step.set_precision(self.precision, self.device, self.deterministic)
        self.run()
        self.run()
        _sync(self.device)

    def time(self):
        """Seconds per step over `steps` steps (one sync at the end, as the training loop)."""
        fast_step.set_precision(self.precision, self.device, self.deterministic)
        _sync(self.device)
        start = time.perf_counter()
        self.run()
        _sync(self.device)
        return (time.perf_counter() - start) / self.steps

    def eval_seconds_per_image(self, X, t):
        if not hasattr(self, "step"):
            return None
        split = fast_step.Split(X.cpu().numpy(), t.cpu().numpy(), self.device)
        fast_step.set_precision(self.precision, self.device, self.deterministic)
        with fast_step.autocast(self.precision, self.device):
            training.evaluate(self.model, split, self.batch_size, forward=self.step.forward)
            _sync(self.device)
            start = time.perf_counter()
            training.evaluate(self.model, split, self.batch_size, forward=self.step.forward)
            _sync(self.device)
        return (time.perf_counter() - start) / split.n


def net_config(net, settings=()):
    """The script's hyperparameters with --set's KEY=VALUE pairs applied (typed as its own
    command line types them); a key the script does not have is refused."""
    c = hyperparameters(vars(importlib.import_module(net)))
    for item in settings:
        key, _, text = item.partition("=")
        if key not in c:
            raise ConfigError(f"--set {item}: {net}.py has no hyperparameter {key!r}")
        c[key] = parse_value(key, text, c[key])
    return c


def benchmark(net, device, steps, repeats, precisions, autotune=False, settings=()):
    spec = NETS[net]
    c = net_config(net, settings)
    shape = (1, 28, 28) if net == "mnist" else (3, 32, 32)
    g = torch.Generator().manual_seed(0)
    n = steps * c["batch_size"]
    X = torch.randn((n,) + shape, generator=g)
    t = 2 * F.one_hot(torch.randint(0, 10, (n,), generator=g), 10).float() - 1
    X_eval = torch.randn((2 * training.EVAL_ROWS,) + shape, generator=g)
    t_eval = 2 * F.one_hot(torch.randint(0, 10, (len(X_eval),), generator=g), 10).float() - 1
    variants = [Variant("plain", net, device, (X.to(device), t.to(device)), steps,
                        settings=settings),
                Variant("eager", net, device, (X, t), steps, mode="eager", settings=settings)]
    fast = "graph" if device.type == "cuda" else "compiled"
    for p in precisions:
        variants.append(Variant(f"fast_{p}", net, device, (X, t), steps, mode=fast, precision=p,
                                settings=settings))
    if autotune and device.type == "cuda":  # what inductor's deterministic mode costs
        variants.append(Variant("fast_fp32_autotuned", net, device, (X, t), steps, mode=fast,
                                deterministic=False, settings=settings))
    best = {v.name: math.inf for v in variants}
    eval_per_image = {}
    for v in variants:
        torch._dynamo.reset()  # v compiles its own code, under its own settings
        start = time.perf_counter()
        v.warm_up()
        print(f"  {net}: {v.name} warmed up in {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(repeats):
            best[v.name] = min(best[v.name], v.time())
        eval_per_image[v.name] = v.eval_seconds_per_image(X_eval, t_eval)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{net} on {device} ({name}), {torch.get_num_threads()} threads, batch "
          f"{c['batch_size']}, {spec['steps_per_epoch']} steps per epoch, {spec['epochs']} epochs:")
    print(f"  {'variant':<20}{'ms/step':>9}{'plain/this':>12}{'full run (min)':>16}")
    summary = [f"SUMMARY net={net} device={device.type}"]
    for v in variants:
        ms = best[v.name] * 1e3
        ratio = best["plain"] / best[v.name]
        per_image = eval_per_image[v.name] if eval_per_image[v.name] is not None else \
            eval_per_image["eager"]
        minutes = spec["epochs"] * (spec["steps_per_epoch"] * best[v.name]
                                    + spec["eval_images"] * per_image) / 60
        print(f"  {v.name:<20}{ms:9.2f}{ratio:12.3f}{minutes:16.1f}")
        summary += [f"{v.name}_ms={ms:.3f}", f"ratio_{v.name}={ratio:.3f}",
                    f"full_run_min_{v.name}={minutes:.1f}"]
    print(" ".join(summary), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The summary line per net: SUMMARY net=... device=... <variant>_ms=... "
               "ratio_<variant>=... full_run_min_<variant>=...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nets", default="mnist,cifar10,svhn",
                        help="comma-separated, among mnist, cifar10, svhn")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per variant (best kept)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a hyperparameter of the nets' scripts, e.g. --set num_units=1024 "
                             "(the paper's own MNIST width; repeatable)")
    parser.add_argument("--autotune", action="store_true",
                        help="on CUDA, also time the fp32 fast step with inductor's and cuDNN's "
                             "deterministic modes off")
    parser.add_argument("--precisions", default="auto",
                        help="comma-separated among fp32, tf32, bf16; auto: fp32 on the CPU, all "
                             "three on CUDA")
    args = parser.parse_args(argv)
    nets = args.nets.split(",")
    if unknown := [n for n in nets if n not in NETS]:
        parser.error(f"--nets: unknown {', '.join(unknown)}; choose among {', '.join(NETS)}")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    try:
        device = select_device(args.device)
    except ConfigError as e:
        parser.error(str(e))
    if args.precisions == "auto":
        args.precisions = "fp32,tf32,bf16" if device.type == "cuda" else "fp32"
    precisions = args.precisions.split(",")
    if unknown := [p for p in precisions if p not in ("fp32", "tf32", "bf16")]:
        parser.error(f"--precisions: unknown {', '.join(unknown)}; choose among fp32, tf32, bf16")
    for net in nets:
        try:
            benchmark(net, device, args.steps, args.repeats, precisions, args.autotune, args.set)
        except ConfigError as e:
            parser.error(str(e).removeprefix("error: "))


if __name__ == "__main__":
    main()
