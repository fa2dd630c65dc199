"""Numbers of the RNG contract (docs/design.md §3) that code on every layer must agree on: the
32-bit word mask and the size of the uniforms' grid (a uniform is ((x >> 8) + 0.5) 2^-24, so
there are 2^24 of them). The generator itself is csrc/include/unlearn/philox.h, its pure-PyTorch
truth reference/rng.py; production code takes these numbers from here, never from the reference.
"""
MASK32 = 0xFFFFFFFF
UNIFORM_LEVELS = 1 << 24
