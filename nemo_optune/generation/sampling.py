"""Token sampling as a pure function of logits and pre-drawn uniform noise."""

import torch


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Draw one token per row of `logits` [B, V] using `uniform` [B, V] noise in (0, 1).

    Gumbel-max: argmax(logits / T + Gumbel) is an exact sample of softmax(logits / T). Taking
    the noise as an input makes each row's draw depend only on its own seed."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    return (scores + gumbel).argmax(dim=-1)



# Counter-based noise. Constants as signed integers: torch has no unsigned 32/64-bit
# arithmetic, but signed multiplication and addition wrap like unsigned.
def _signed(x: int, bits: int) -> int:
    return x - (1 << bits) if x >= 1 << (bits - 1) else x


_GOLDEN64 = _signed(0x9E3779B97F4A7C15, 64)
_MIX64 = (_signed(0xBF58476D1CE4E5B9, 64), _signed(0x94D049BB133111EB, 64))
_GOLDEN32 = _signed(0x9E3779B9, 32)
_MIX32 = (_signed(0x7FEB352D, 32), _signed(0x846CA68B, 32))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift (torch's >> is arithmetic on signed integers)."""
    width = 64 if x.dtype == torch.int64 else 32
    return (x >> bits) & ((1 << (width - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of 64-bit words."""
    x = (x ^ _shr(x, 30)) * _MIX64[0]
    x = (x ^ _shr(x, 27)) * _MIX64[1]
    return x ^ _shr(x, 31)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' lowbias32): 32-bit multiplies vectorise on CPU,
    64-bit ones do not."""
    x = (x ^ _shr(x, 16)) * _MIX32[0]
    x = (x ^ _shr(x, 15)) * _MIX32[1]
    return x ^ _shr(x, 16)


def counter_uniform(seeds, sample_index, step: int, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [B, vocab] float32, a pure function of (seeds[b],
    sample_index[b], step, vocab index).

    Counter-based: a decoding step draws only the noise it uses, for the rows still active,
    and a row's noise depends on nothing else (not its batch, its position in it or its rank).
    (seed, sample, step) hash to a 32-bit stream key (64-bit mixing, B values); entry v is
    lowbias32(key + (v + 1) * golden), whose top 24 bits give (k + 0.5) / 2^24 (exact in float32)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    sample_index = torch.as_tensor(sample_index, dtype=torch.int64, device=seeds.device)
    key = _splitmix64(_splitmix64(_splitmix64(seeds * _GOLDEN64 + 1) ^ (sample_index + 1)) ^ (int(step) + 1))
    key32 = (_shr(key, 32) - (1 << 31)).to(torch.int32)  # the top 32 bits, as a signed word
    counters = torch.arange(1, vocab + 1, dtype=torch.int32, device=seeds.device) * _GOLDEN32
    bits = _shr(_lowbias32(key32[:, None] + counters), 8)
    return (bits.float() + 0.5) * (1.0 / (1 << 24))
