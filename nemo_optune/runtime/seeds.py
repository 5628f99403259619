"""Stable seeds derived from integers: every random draw of a run is a function of
(seed, iteration, prompt, ...), which makes runs layout-independent and resumable."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes, unlike hash())."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF
