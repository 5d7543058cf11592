"""Milliseconds per batch of the exported 1-bit networks at inference, in one process on the CPU:
the packed path against the float paths, and against this machine's floor.

    python benchmark_inference.py                       # MNIST 3x2048, 3x1024, CIFAR-10 CNN
    python benchmark_inference.py --nets=mnist2048 --batches=1,100 --threads=1

For each net (freshly built and exported by export.py: timing needs no training) and batch size:
  packed      infer.predict on the packed bits (packed.c; BC_INFER_THREADS = --threads);
  numpy       infer.predict on the numpy float32 path (the +-1 matrices on numpy's BLAS);
  torch_f32   the same network as float32 matrices in torch (H folded in; one matmul or conv2d per
              layer, the affine and ReLU after it; torch.set_num_threads(--threads));
  torch_bf16  the same in bfloat16, weights and activations.
The variants alternate, `repeats` rounds; the best round of each is kept (the machine is shared).

The floor of the packed path: max(weight bytes / memory bandwidth, adds / add rate), where the
bytes are the model's arrays (the bits and the float32 scales, shifts and biases) and the adds are
one per weight and output position (batch x weights for dense layers, x Ho*Wo for convolutions).
Both rates are measured here, with --threads threads, by packed.c's bc_sum: float32 vector sums
(8 independent accumulators) over a 512 MB buffer (bandwidth) and over 16 KB in L1 (add rate).

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

NETS = {"mnist2048": ("mnist", dict(num_units=2048)), "mnist1024": ("mnist", dict(num_units=1024)),
        "cifar10": ("cifar10", {})}


def build_npz(net, folder):
    """The paper's network, untrained (seeded), exported as a deterministic-BC 1-bit .npz."""
    import importlib

    import torch

    import export
    from configurator import hyperparameters
    script, overrides = NETS[net]
    mod = importlib.import_module(script)
    np.random.seed(1234)
    torch.manual_seed(1234)
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
             if k in ("W", "b", "a", "c")}
        if "W" in t:
            t["W"] = t["W"] * op["H"]
            if op["op"] == "conv":
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
    """(bytes of the model's arrays, adds: one per weight and output position) of one batch."""
    nbytes, adds = 0, 0
    _, H, W = model.input_shape
    for op in model.layers:
        nbytes += sum(op[k].nbytes for k in ("b", "a", "c") if k in op)
        if op["op"] in ("dense", "conv"):
            n = int(np.prod(op["shape"]))
            nbytes += -(-n // 8)
            adds += batch * n * (H * W if op["op"] == "conv" else 1)
        elif op["op"] == "maxpool":
            H, W = H // 2, W // 2
    return nbytes, adds


def machine_rates(lib, threads):
    """(bytes/s read from memory, float32 adds/s), the best of 3 timings each."""
    big = np.ones(128 << 20, np.float32)  # 512 MB, far beyond the caches
    small = np.ones(4096, np.float32)
    best_bw = best_add = 0.
    for _ in range(3):
        t = time.perf_counter()
        lib.bc_sum(big.ctypes.data, big.size, 2, threads)
        best_bw = max(best_bw, 2 * big.nbytes / (time.perf_counter() - t))
        reps = 20000
        t = time.perf_counter()
        lib.bc_sum(small.ctypes.data, small.size, reps, threads)
        best_add = max(best_add, small.size * reps * threads / (time.perf_counter() - t))
    return best_bw, best_add


def timed(fn, x, budget):
    """Seconds per call: the mean over as many calls as fit in `budget` seconds (at least 1)."""
    t = time.perf_counter()
    fn(x)
    first = time.perf_counter() - t
    n = max(1, min(200, int(budget / max(first, 1e-6))))
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="mnist2048,mnist1024,cifar10")
    p.add_argument("--batches", default="1,16,100")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=3, help="rounds per case (best kept)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per variant per round")
    p.add_argument("--max_call", type=float, default=5.,
                   help="skip a variant whose call the previous batch size predicts longer than "
                        "this many seconds (torch's bf16 on a CPU without bf16 units)")
    args = p.parse_args(argv)
    os.environ["BC_INFER_THREADS"] = str(args.threads)
    import torch

    import infer
    import packed
    torch.set_num_threads(args.threads)
    lib = packed.kernel()
    if lib is None:
        print("error: the packed kernel is unavailable (see the warning above)", file=sys.stderr)
        return 2
    bw, add_rate = machine_rates(lib, args.threads)
    print(f"MACHINE threads={args.threads} bandwidth_GBps={bw / 1e9:.1f} "
          f"add_rate_Gps={add_rate / 1e9:.1f} avx2={lib.bc_avx2()} torch={torch.__version__}")
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
                nbytes, adds = work(pm, batch)
                floor = 1e3 * max(nbytes / bw, adds / add_rate)
                fields = dict(net=net, batch=batch, threads=args.threads,
                              **{f"{k}_ms": f"{v:.3f}" for k, v in ms.items()},
                              f32_over_packed=f"{ms['torch_f32'] / ms['packed']:.2f}",
                              bf16_over_packed=f"{ms['torch_bf16'] / ms['packed']:.2f}",
                              numpy_over_packed=f"{ms['numpy'] / ms['packed']:.2f}",
                              floor_ms=f"{floor:.3f}",
                              packed_over_floor=f"{ms['packed'] / floor:.2f}",
                              bytes_ms=f"{1e3 * nbytes / bw:.3f}",
                              adds_ms=f"{1e3 * adds / add_rate:.3f}", weight_bytes=nbytes,
                              adds=adds, argmax_agrees=bool((got.argmax(1) == ref.argmax(1)).all()),
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
