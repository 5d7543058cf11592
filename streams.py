"""The random streams that stochastic binarization draws its u ~ U[0, 1) from (§1.1).

A stochastic layer samples from one of two kinds of stream, both seeded by the layer's seed:
- "generator": the layer's own torch.Generator (the eager modules), as the original's
  MRG_RandomStreams was a stateful generator;
- "counter": a pure function of (seed, draw counter, element index), which is the same on every
  device, fuses into a compiled step, needs nothing registered in a CUDA graph, and checkpoints
  as one integer (fast_step.py).
"""
import math

import torch

_M32 = 0xFFFFFFFF


def pcg_hash(x):
    """Jarzynski & Olano's PCG hash (JCGT 9(3), 2020), a bijection of 32-bit values, on values
    below 2**32 held in int64: every product stays below 2**63, so no signed overflow anywhere
    (ATen, C++ or Triton)."""
    s = (x * 747796405 + 2891336453) & _M32
    w = (((s >> ((s >> 28) + 4)) ^ s) * 277803737) & _M32
    return (w >> 22) ^ w


def counter_uniform(seed, counter, shape, device):
    """U[0, 1) draws of 24 bits (float32's resolution, as the original's MRG floats), a pure
    function of (the layer's seed, the draw counter, the element's index).

    Two keys derived from (seed, counter) drive two keyed rounds of the PCG hash over the flat
    element index. Being a function of a counter rather than a generator's hidden state, the
    stream is the same on every device, fuses into a compiled step, needs nothing registered in
    a CUDA graph, and checkpoints as one integer.
    """
    k1 = pcg_hash(pcg_hash(counter & _M32) ^ seed)
    k2 = pcg_hash(k1 ^ 0x5BD1E995 ^ (counter >> 32))
    n = math.prod(shape)
    x = pcg_hash(pcg_hash(torch.arange(n, device=device) ^ k1) ^ k2)
    return ((x >> 8).to(torch.float32) * 2. ** -24).view(shape)


def uniform_like(W, stream):
    """W-shaped U[0, 1) draws from a layer's stream: a torch.Generator, or a counter stream
    given as (seed, counter) (see counter_uniform)."""
    if isinstance(stream, tuple):
        return counter_uniform(*stream, W.shape, W.device).to(W.dtype)
    return torch.rand(W.shape, generator=stream, device=W.device, dtype=W.dtype)
