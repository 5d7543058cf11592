"""Milliseconds per batch of the exported 1-bit networks at inference, in one process on the CPU:
the packed path against the float paths, and against this machine's floor.

    python benchmark_inference.py      # BinaryConnect: MNIST 3x2048, 3x1024, CIFAR-10 CNN;
                                       # BinaryNet: MNIST 3x4096, CIFAR-10 CNN
    python benchmark_inference.py --nets=bnn_mnist --batches=1,100 --threads=1

For each net (freshly built and exported by export.py: timing needs no training) and batch size:
  packed      infer.predict on the packed bits (packed.c; BC_INFER_THREADS = --threads);
  numpy       infer.predict on the numpy float32 path (the +-1 matrices on numpy's BLAS);
  torch_f32   the same network as float32 matrices in torch (H folded in; one matmul or conv2d per
              layer, the affine and ReLU after it; torch.set_num_threads(--threads));
  torch_bf16  the same in bfloat16, weights and activations.
The variants alternate, `repeats` rounds; the fastest call of each is kept (the machine is shared;
--clock=cpu, one thread: the process's CPU time, which leaves out the waits for a core).

The floor of the packed path: max(weight bytes / memory bandwidth, adds / add rate + bits /
popcount rate), where the bytes are the model's arrays (the bits and the float32 scales, shifts,
biases and thresholds), the adds are one per weight and output position of the layers on real
inputs (batch x weights for dense layers, x Ho*Wo for convolutions), and the bits the same count
for BinaryNet's XNOR layers (each weight bit XOR-ed and counted once per output position). The
rates are measured here, with --threads threads: packed.c's bc_sum, float32 vector sums (8
independent accumulators) over a 512 MB buffer (bandwidth) and over 16 KB in L1 (add rate); its
bc_popsum, XOR + popcount over 4 KB in L1 on the XNOR path in use (BC_XNOR_PATH, else the
fastest this CPU runs).

One parseable line per case:
  INFER net=mnist2048 batch=1 threads=2 packed_ms=... numpy_ms=... torch_f32_ms=...
        torch_bf16_ms=... f32_over_packed=... floor_ms=... packed_over_floor=... ...
and a markdown table at the end.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# numpy's BLAS (the numpy path) reads its thread count once, at import: from the command line,
# --threads=N holds for it as for torch and packed.c.
for _arg in sys.argv[1:]:
    if _arg.startswith("--threads="):
        for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(_var, _arg.split("=", 1)[1])

import numpy as np  # noqa: E402

clock = time.perf_counter  # --clock=cpu: time.process_time

NETS = {"mnist2048": ("mnist", dict(num_units=2048)), "mnist1024": ("mnist", dict(num_units=1024)),
        "cifar10": ("cifar10", {}),
        # BinaryNet's networks (models.binarynet_mlp, binarynet_cnn): activations +-1 too
        "bnn_mnist": ("mnist", dict(network="binarynet")),
        "bnn_cifar10": ("cifar10", dict(network="binarynet"))}


def build_npz(net, folder):
    """The paper's network, untrained (seeded), exported as a deterministic-BC 1-bit .npz."""
    import importlib

    import torch

    import export
    from configurator import hyperparameters
    import models
    script, overrides = NETS[net]
    np.random.seed(1234)
    torch.manual_seed(1234)
    if overrides.get("network") == "binarynet":
        model = models.binarynet_mlp() if script == "mnist" else models.binarynet_cnn()
    else:
        mod = importlib.import_module(script)
        model = mod.build_model(dict(hyperparameters(vars(mod)), stochastic=False, **overrides))
    arrays = export.export_arrays(model, export.INPUT_SHAPES[script], dict(dataset=script))
    if script == "mnist":
        arrays["input_mean"] = np.zeros((1, 28, 28), np.float32)
    path = Path(folder) / f"{net}.npz"
    export.save_npz(path, arrays)
    return path


def torch_forward(float_model, dtype):
    """infer.predict's ops in torch, from the numpy path's +-1 matrices (times H)."""
    import torch
    import torch.nn.functional as F
    ops = []
    for op in float_model.layers:
        t = {k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in op.items()
             if k in ("W", "b", "a", "c", "T")}
        if "direction" in op:
            t["up"] = torch.from_numpy(op["direction"] > 0)
        if "W" in t:
            t["W"] = t["W"] * (1. if "T" in op else op["H"])  # a threshold compares s itself
            if "conv" in (op["op"], op.get("kind")):
                t["W"] = t["W"].reshape(op["shape"]).contiguous()
            else:
                t["W"] = t["W"].t().contiguous()  # x @ W: the layout torch's linear reads fastest
        ops.append((op, t))

    def forward(x):
        with torch.inference_mode():
            x = torch.from_numpy(x).to(dtype)
            for op, t in ops:
                kind = op["op"]
                if kind == "flatten":
                    x = x.reshape(len(x), -1)
                elif kind == "dense":
                    x = x @ t["W"] + t["b"] if "b" in t else x @ t["W"]
                elif kind == "conv":
                    x = F.conv2d(x, t["W"], t.get("b"), padding=tuple(op["padding"]))
                elif kind == "sign":
                    x = torch.where(x < 0, -1., 1.).to(dtype)
                elif kind == "xnor":  # the float network: a product, then BN + sign folded
                    s = (F.conv2d(x, t["W"], padding=tuple(op["padding"])) if op["kind"] == "conv"
                         else x @ t["W"])
                    if "T" not in t:
                        x = s
                        continue
                    shape = (1, -1) + (1,) * (s.dim() - 2)
                    up, T = t["up"].reshape(shape), t["T"].reshape(shape)
                    x = torch.where(torch.where(up, s >= T, s <= T), 1., -1.).to(dtype)
                    if op.get("pool"):
                        x = torch.where(up, F.max_pool2d(x, 2), -F.max_pool2d(-x, 2))
                elif kind == "maxpool":
                    x = F.max_pool2d(x, 2)
                elif kind == "affine":
                    shape = (1, -1) + (1,) * (x.dim() - 2)
                    x = x * t["a"].reshape(shape) + t["c"].reshape(shape)
                    if op["nonlinearity"] == "relu":
                        x = torch.relu(x)
            return x.float().numpy()
    return forward


def work(model, batch):
    """(bytes of the model's arrays, adds: one per weight and output position of the layers on
    real inputs, bits: the same count for the XNOR layers) of one batch."""
    nbytes, adds, bits = 0, 0, 0
    _, H, W = model.input_shape
    for op in model.layers:
        nbytes += sum(op[k].nbytes for k in ("b", "a", "c", "T") if k in op)
        if op["op"] in ("dense", "conv", "xnor"):
            n = int(np.prod(op["shape"]))
            nbytes += -(-n // 8)
            conv = "conv" in (op["op"], op.get("kind"))
            if op["op"] == "xnor":
                bits += batch * n * (H * W if conv else 1)
            else:
                adds += batch * n * (H * W if conv else 1)
        if op["op"] == "maxpool" or op.get("pool"):
            H, W = H // 2, W // 2
    return nbytes, adds, bits


def machine_rates(lib, threads):
    """(bytes/s read from memory, float32 adds/s, XOR + popcount bits/s on the XNOR path in
    use), the best of 3 timings each."""
    import packed
    big = np.ones(128 << 20, np.float32)  # 512 MB, far beyond the caches
    small = np.ones(4096, np.float32)
    words = np.arange(512, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # 4 KB of bits
    best_bw = best_add = best_pop = 0.
    for _ in range(3):
        t = clock()
        lib.bc_popsum(words.ctypes.data, words.size, 20000, threads, packed.xnor_path(lib))
        best_pop = max(best_pop, 64 * words.size * 20000 * threads / (clock() - t))
        t = clock()
        lib.bc_sum(big.ctypes.data, big.size, 2, threads)
        best_bw = max(best_bw, 2 * big.nbytes / (clock() - t))
        reps = 20000
        t = clock()
        lib.bc_sum(small.ctypes.data, small.size, reps, threads)
        best_add = max(best_add, small.size * reps * threads / (clock() - t))
    return best_bw, best_add, best_pop


def timed(fn, x, budget):
    """Seconds per call: the fastest of as many single calls as fit in `budget` seconds (at least
    1). On a machine shared with other processes a preempted call is slower, never faster; a mean
    over calls measured the load (10x on a 2-core machine at load 12)."""
    t = clock()
    fn(x)
    best = clock() - t
    for _ in range(max(0, min(200, int(budget / max(best, 1e-6))) - 1)):
        t = clock()
        fn(x)
        best = min(best, clock() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="mnist2048,mnist1024,cifar10")
    p.add_argument("--batches", default="1,16,100")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=3, help="rounds per case (best kept)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per variant per round")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time instead of the wall clock, with --threads=1 "
                        "only: on a machine shared with other processes it leaves out the time "
                        "the call waited for a core (the caches and memory stay shared)")
    p.add_argument("--max_call", type=float, default=5.,
                   help="skip a variant whose call the previous batch size predicts longer than "
                        "this many seconds (torch's bf16 on a CPU without bf16 units)")
    args = p.parse_args(argv)
    global clock
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock=cpu counts every thread's time: give --threads=1 with it")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    os.environ["BC_INFER_THREADS"] = str(args.threads)
    import torch

    import infer
    import packed
    torch.set_num_threads(args.threads)
    lib = packed.kernel()
    if lib is None:
        print("error: the packed kernel is unavailable (see the warning above)", file=sys.stderr)
        return 2
    bw, add_rate, pop_rate = machine_rates(lib, args.threads)
    print(f"MACHINE threads={args.threads} clock={args.clock} bandwidth_GBps={bw / 1e9:.1f} "
          f"add_rate_Gps={add_rate / 1e9:.1f} popcount_Gbitps={pop_rate / 1e9:.0f} "
          f"xnor_path={packed.XNOR_PATHS[packed.xnor_path(lib)]} avx2={lib.bc_avx2()} "
          f"torch={torch.__version__}")
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            pm = infer.load(build_npz(net, tmp))
            fm = infer.float_model(pm)
            variants = dict(packed=lambda x: infer.predict(pm, x),
                            numpy=lambda x: infer.predict(fm, x),
                            torch_f32=torch_forward(fm, torch.float32),
                            torch_bf16=torch_forward(fm, torch.bfloat16))
            per_image = {}
            for batch in map(int, args.batches.split(",")):
                x = rng.standard_normal((batch,) + pm.input_shape).astype(np.float32)
                ref = variants["numpy"](x)
                got = variants["packed"](x)
                rel = float(np.abs(got - ref).max() / np.abs(ref).max())
                run = {k: fn for k, fn in variants.items()
                       if per_image.get(k, 0) * batch <= args.max_call}
                best = {k: float("inf") for k in run}
                for _ in range(args.repeats):
                    for name, fn in run.items():
                        best[name] = min(best[name], timed(fn, x, args.budget))
                per_image.update({k: v / batch for k, v in best.items()})
                ms = {k: 1e3 * best.get(k, float("nan")) for k in variants}
                nbytes, adds, bits = work(pm, batch)
                floor = 1e3 * max(nbytes / bw, adds / add_rate + bits / pop_rate)
                fields = dict(net=net, batch=batch, threads=args.threads,
                              **{f"{k}_ms": f"{v:.3f}" for k, v in ms.items()},
                              f32_over_packed=f"{ms['torch_f32'] / ms['packed']:.2f}",
                              bf16_over_packed=f"{ms['torch_bf16'] / ms['packed']:.2f}",
                              numpy_over_packed=f"{ms['numpy'] / ms['packed']:.2f}",
                              floor_ms=f"{floor:.3f}",
                              packed_over_floor=f"{ms['packed'] / floor:.2f}",
                              bytes_ms=f"{1e3 * nbytes / bw:.3f}",
                              adds_ms=f"{1e3 * adds / add_rate:.3f}",
                              bits_ms=f"{1e3 * bits / pop_rate:.3f}", weight_bytes=nbytes,
                              adds=adds, bits=bits,
                              argmax_agrees=bool((got.argmax(1) == ref.argmax(1)).all()),
                              max_rel_diff=f"{rel:.1e}")
                print("INFER " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
                rows.append(fields)
    print("\n| net | batch | packed ms | numpy f32 ms | torch f32 ms | torch bf16 ms "
          "| f32 / packed | floor ms | packed / floor |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['batch']} | {r['packed_ms']} | {r['numpy_ms']} | "
              f"{r['torch_f32_ms']} | {r['torch_bf16_ms']} | {r['f32_over_packed']}x | "
              f"{r['floor_ms']} | {r['packed_over_floor']}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
